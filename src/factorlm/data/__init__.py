"""Small real English text samples bundled with factorlm (no network, no ``../shared`` needed).

Both files are plain UTF-8 text from the Brown corpus (free redistribution, see the Brown corpus
manual), one sentence per line, documents separated by a blank line, no header:

* ``calib_sample.txt``: 20 whole documents (~235 KB) spread evenly over the 450 calibration
  documents (every genre is represented). Use it for calibration / distillation.
* ``eval_sample.txt``: 5 whole documents (~60 KB) spread evenly over the 50 held-out documents
  (disjoint from the calibration documents). Use it for evaluation only.
"""

from __future__ import annotations

import atexit
import contextlib
import re
from importlib import resources
from pathlib import Path

__all__ = [
    "CALIBRATION_SAMPLE",
    "EVAL_SAMPLE",
    "calibration_sample",
    "calibration_sample_path",
    "eval_sample",
    "eval_sample_path",
    "split_documents",
]

CALIBRATION_SAMPLE = "calib_sample.txt"
EVAL_SAMPLE = "eval_sample.txt"

_DOC_SEPARATOR = re.compile(r"\n[ \t]*\n")
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def _resource_path(name: str) -> Path:
    """Return a filesystem path to the bundled resource ``name`` (extracted if zipped)."""
    ref = resources.files(__name__) / name
    if isinstance(ref, Path):
        return ref
    # Zipped install: extract once, kept until interpreter exit.
    return _extracted.enter_context(resources.as_file(ref))


def split_documents(text: str) -> list[str]:
    """Split ``text`` into documents on blank lines; strips them and drops empty ones."""
    return [d.strip() for d in _DOC_SEPARATOR.split(text) if d.strip()]


def calibration_sample_path() -> Path:
    """Path of the bundled calibration text (Brown corpus, 20 documents)."""
    return _resource_path(CALIBRATION_SAMPLE)


def eval_sample_path() -> Path:
    """Path of the bundled evaluation text (Brown corpus, 5 held-out documents)."""
    return _resource_path(EVAL_SAMPLE)


def calibration_sample() -> list[str]:
    """The bundled calibration documents, in file order."""
    return split_documents(calibration_sample_path().read_text(encoding="utf-8"))


def eval_sample() -> list[str]:
    """The bundled evaluation documents, in file order."""
    return split_documents(eval_sample_path().read_text(encoding="utf-8"))
