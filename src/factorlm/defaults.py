"""Defaults shared by the API and the command line (importable without torch)."""

from __future__ import annotations

#: the method ``compress`` runs when none is named: the recommended training-free recipe
DEFAULT_METHOD = "modular"
