"""Evaluation text sources: lists of strings, text / JSONL files, folders, HF dataset shortcuts.

Every loader returns a list of documents (non-empty strings). Perplexity joins them with
``"\\n\\n"`` (see ``docs/METHODS.md``, "Perplexity protocol").
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factorlm.errors import EvaluationError

logger = logging.getLogger(__name__)

__all__ = ["DATASETS", "DatasetSpec", "describe_source", "load_texts", "split_documents"]


@dataclass(frozen=True)
class DatasetSpec:
    """How a dataset shortcut maps onto :func:`datasets.load_dataset`."""

    path: str
    name: str | None
    split: str
    field: str
    data_files: dict[str, str] | None = None
    max_docs: int | None = None  # c4: the usual 1100-document validation subset


DATASETS: dict[str, DatasetSpec] = {
    "wikitext2": DatasetSpec("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": DatasetSpec("ptb-text-only/ptb_text_only", "penn_treebank", "test", "sentence"),
    "c4": DatasetSpec(
        "allenai/c4",
        None,
        "validation",
        "text",
        data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
        max_docs=1100,
    ),
}
_ALIASES = {"wikitext-2": "wikitext2", "wikitext": "wikitext2", "wiki2": "wikitext2"}

_TEXT_SUFFIXES = {".txt", ".jsonl"}
_DOC_SEPARATOR = re.compile(r"\n[ \t]*\n")


def split_documents(text: str) -> list[str]:
    """Split ``text`` into documents on blank lines (``"\\n\\n"``, optionally with spaces/tabs
    on the blank line); strips each document and drops empty ones."""
    return [d.strip() for d in _DOC_SEPARATOR.split(text.replace("\r\n", "\n")) if d.strip()]


def describe_source(source: Any) -> str:
    """A short, stable name of ``source`` for result keys and messages."""
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, Sequence):
        return f"{len(source)} texts"
    return type(source).__name__


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise EvaluationError(f"{path}: cannot read ({e.strerror or e})") from e


def _load_jsonl(path: Path, text_field: str) -> list[str]:
    docs: list[str] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from e
        if isinstance(row, str):
            value: Any = row
        elif isinstance(row, dict):
            if text_field not in row:
                fields = ", ".join(map(repr, list(row)[:8])) or "none"
                raise EvaluationError(
                    f"{path}, line {lineno}: no field {text_field!r} (fields: {fields}); "
                    "pass text_field=<name>"
                )
            value = row[text_field]
        else:
            raise EvaluationError(
                f"{path}, line {lineno}: expected a JSON object with field {text_field!r}, "
                f"got {type(row).__name__}"
            )
        if not isinstance(value, str):
            raise EvaluationError(
                f"{path}, line {lineno}: field {text_field!r} is {type(value).__name__}, "
                "not a string"
            )
        if value.strip():
            docs.append(value)
    return docs


def _load_file(path: Path, text_field: str) -> list[str]:
    if path.suffix.lower() == ".jsonl":
        return _load_jsonl(path, text_field)
    return split_documents(_read_text(path))


def _load_folder(path: Path, text_field: str) -> list[str]:
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise EvaluationError(f"{path}: folder holds no .txt or .jsonl file")
    docs: list[str] = []
    for f in files:
        docs.extend(_load_file(f, text_field))
    logger.debug("%s: %d documents from %d files", path, len(docs), len(files))
    return docs


def _load_dataset(key: str, split: str | None) -> list[str]:
    spec = DATASETS[key]
    try:
        import datasets
    except ImportError as e:
        raise EvaluationError(
            f"dataset {key!r} needs the 'datasets' package (pip install 'factorlm[eval]'); "
            "or pass a local text file"
        ) from e
    split = split or spec.split
    kwargs: dict[str, Any] = {"split": split}
    if spec.data_files:
        kwargs["data_files"] = {split: spec.data_files.get(split, f"en/c4-{split}.00000-*")}
    logger.info("loading dataset %s (%s, split %s)", key, spec.path, split)
    try:
        ds = datasets.load_dataset(spec.path, spec.name, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure mode of the hub becomes one message
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EvaluationError(
            f"could not download {key!r} (offline?): pass a local text file [{first}]"
        ) from e
    if spec.field not in ds.column_names:
        raise EvaluationError(
            f"dataset {key!r} has no column {spec.field!r} (columns: {ds.column_names})"
        )
    rows = ds[spec.field] if spec.max_docs is None else ds[: spec.max_docs][spec.field]
    return [t for t in rows if isinstance(t, str) and t.strip()]


def load_texts(
    source: str | os.PathLike | Sequence[str],
    text_field: str = "text",
    split: str | None = None,
) -> list[str]:
    """Documents of an evaluation (or calibration) source.

    Args:
        source: a list of strings; a ``.txt`` file (documents separated by blank lines); a
            ``.jsonl`` file (one JSON object per line, text in ``text_field``); a folder (every
            ``.txt`` / ``.jsonl`` inside, recursively, in sorted path order); or one of the
            dataset shortcuts ``"wikitext2"``, ``"c4"``, ``"ptb"`` (downloaded with
            :func:`datasets.load_dataset`; needs network or a populated HF cache).
        text_field: field of the JSONL objects holding the text.
        split: dataset split for the shortcuts (default: test; c4: validation).

    Returns:
        The non-empty documents, in order.

    Raises:
        EvaluationError: missing path, unreadable / malformed file (naming the line and
            field), unavailable dataset, or no text at all.
    """
    if isinstance(source, str | os.PathLike):
        text = os.fspath(source)
        if not text.strip():
            raise EvaluationError("empty text source name")
        path = Path(text).expanduser()
        if path.is_dir():
            docs = _load_folder(path, text_field)
        elif path.is_file():
            docs = _load_file(path, text_field)
        elif path.exists():
            raise EvaluationError(f"{text}: not a regular file or folder")
        elif text.lower() in DATASETS or text.lower() in _ALIASES:
            key = _ALIASES.get(text.lower(), text.lower())
            docs = _load_dataset(key, split)
        elif isinstance(source, os.PathLike) or os.sep in text or path.suffix:
            raise EvaluationError(f"no such file or directory: {text}")
        else:
            raise EvaluationError(
                f"unknown text source {text!r}: not a file or folder, and not one of the "
                f"datasets {', '.join(DATASETS)}"
            )
    elif isinstance(source, Sequence):
        bad = [i for i, t in enumerate(source) if not isinstance(t, str)]
        if bad:
            raise EvaluationError(
                f"a list of texts must hold strings: item {bad[0]} is "
                f"{type(source[bad[0]]).__name__}"
            )
        docs = [t for t in source if t.strip()]
    else:
        raise EvaluationError(f"unsupported text source of type {type(source).__name__}")
    if not docs:
        raise EvaluationError(f"text source {describe_source(source)} contains no text")
    return docs
