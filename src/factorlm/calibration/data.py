"""Calibration data: text (strings, files, folders, JSONL, HF datasets) or token ids -> batches.

Sampling: documents joined with "\\n\\n", tokenized once, cut into non-overlapping windows of
``seqlen`` tokens; ``n_samples`` windows are drawn without replacement with ``seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from factorlm.errors import CalibrationError, FactorLMError

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    batches: list[torch.Tensor]  # LongTensor (b, seqlen) each
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(b.numel() for b in self.batches)


def _texts(source: Any, text_field: str) -> tuple[list[str], str]:
    if source is None:
        from factorlm.data import calibration_sample

        return calibration_sample(), "bundled sample (Brown corpus)"
    if (
        isinstance(source, str)
        or hasattr(source, "__fspath__")
        or (isinstance(source, Sequence) and source and isinstance(source[0], str))
    ):
        from factorlm.eval.sources import load_texts

        try:
            texts = load_texts(
                source if not hasattr(source, "__fspath__") else str(source), text_field=text_field
            )
        except FactorLMError as e:
            raise CalibrationError(f"calibration source: {e}") from e
        name = (
            str(source)
            if isinstance(source, str) or hasattr(source, "__fspath__")
            else f"{len(source)} strings"
        )
        return texts, name
    raise CalibrationError(f"unsupported calibration source of type {type(source).__name__}")


def _as_token_batches(source: Any) -> list[torch.Tensor] | None:
    if isinstance(source, torch.Tensor):
        return [source.long().reshape(-1, source.shape[-1])]
    if isinstance(source, Sequence) and source and isinstance(source[0], torch.Tensor):
        return [t.long().reshape(-1, t.shape[-1]) for t in source]
    return None


def build_calibration(
    source: Any,
    tokenizer=None,
    n_samples: int = 64,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    text_field: str = "text",
    apply_chat_template: bool = False,
) -> CalibrationSet:
    """Turn ``source`` into token batches of shape (<= batch_size, seqlen)."""
    if not isinstance(n_samples, int) or n_samples < 1:
        raise CalibrationError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise CalibrationError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    pre = _as_token_batches(source)
    if pre is not None:
        rows = (
            torch.cat([b for b in pre if b.numel()], dim=0)
            if pre
            else torch.empty(0, 0, dtype=torch.long)
        )
        if rows.numel() == 0:
            raise CalibrationError("calibration token batches are empty")
        rows = rows[:n_samples]
        batches = list(rows.split(batch_size))
        return CalibrationSet(
            batches,
            {
                "source": "token batches",
                "n_samples": rows.shape[0],
                "seqlen": rows.shape[1],
                "seed": seed,
                "tokens": rows.numel(),
            },
        )
    if tokenizer is None:
        raise CalibrationError("text calibration data needs a tokenizer (pass tokenizer=...)")
    texts, name = _texts(source, text_field)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError(f"calibration source {name} contains no text")
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False)
            for t in texts
        ]
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False)[
        "input_ids"
    ]
    ids = torch.tensor(ids, dtype=torch.long)
    n_windows = ids.numel() // seqlen
    if n_windows < n_samples:
        raise CalibrationError(
            f"calibration source {name} has {ids.numel():,} tokens: too short for {n_samples} samples x "
            f"{seqlen} tokens ({n_samples * seqlen:,} needed); lower n_samples/seqlen or add text"
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[:n_samples].sort().values
    rows = ids[: n_windows * seqlen].view(n_windows, seqlen)[pick]
    summary = {
        "source": name,
        "n_samples": n_samples,
        "seqlen": seqlen,
        "seed": seed,
        "tokens": rows.numel(),
        "source_tokens": ids.numel(),
    }
    log.info("calibration: %d x %d tokens from %s", n_samples, seqlen, name)
    return CalibrationSet(list(rows.split(batch_size)), summary)
