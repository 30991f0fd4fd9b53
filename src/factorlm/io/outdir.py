"""Output directories never overlap their input: a command writing ``--out`` must not replace
(``--overwrite`` deletes the directory first) or write into the model it reads.

:func:`check_out_apart` is the one check every command that writes an output directory calls,
before any heavy work, whatever ``--overwrite`` says.
"""

from __future__ import annotations

import os
from pathlib import Path

from factorlm.errors import ConfigError


def check_out_apart(out: str | os.PathLike, source: str | os.PathLike, what: str = "--out") -> None:
    """Raise :class:`ConfigError` when ``out`` is the local model ``source`` (a directory or a
    file), lies inside it, or contains it (replacing ``out`` would delete the input). A source
    that is not on disk (a hub id, the embedded default's name) passes."""
    src = Path(source).expanduser()
    if not src.exists():
        return
    src = src.resolve()
    target = Path(out).expanduser().resolve()
    if target == src or src in target.parents:
        raise ConfigError(f"{what} {out} is the input model {source} or inside it: choose another")
    if target in src.parents:
        raise ConfigError(f"{what} {out} contains the input model {source}: choose another")
