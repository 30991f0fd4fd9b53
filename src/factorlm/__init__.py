"""factorlm: post-training low-rank compression of causal language models."""

from __future__ import annotations

__version__ = "0.1.0"
