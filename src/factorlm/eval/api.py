"""One call for every evaluation: perplexity on text sources, zero-shot tasks, speed."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from factorlm.eval.perplexity import perplexity
from factorlm.eval.sources import describe_source
from factorlm.eval.speed import measure_speed
from factorlm.eval.zeroshot import zeroshot

logger = logging.getLogger(__name__)

__all__ = ["evaluate"]

PplSource = str | os.PathLike | Sequence[str]


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    ppl: PplSource | Sequence[PplSource] | None = None,
    tasks: str | Sequence[str] | None = None,
    speed: bool | dict[str, Any] = False,
    seqlen: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` (dense or compressed).

    Args:
        ppl: one text source or a list of them (files, folders, JSONL, "wikitext2"/"c4"/"ptb";
            a list of plain strings counts as one source only when passed inside a list:
            ``ppl=[["doc 1", "doc 2"]]``).
        tasks: zero-shot tasks: multiple-choice JSONL files / folders, or lm-eval task names.
        speed: True for :func:`measure_speed` with its defaults, or a dict of its keyword
            arguments (``batch_size``, ``prompt_len``, ``gen_len``, ``repeats``, ...).
        seqlen, max_tokens: perplexity window length and token budget per source.
        batch_size: windows (perplexity) / sequences (zero-shot) per forward pass.
        limit: first ``limit`` examples per zero-shot task.

    Returns:
        ``{"perplexity": {source name: result}, "zeroshot": {task: result},
        "speed": result or {}}``; source names are the paths / dataset names as given.
    """
    out: dict[str, Any] = {"perplexity": {}, "zeroshot": {}, "speed": {}}
    if ppl is not None:
        sources = [ppl] if isinstance(ppl, str | os.PathLike) else list(ppl)
        for src in sources:
            name = describe_source(src)
            out["perplexity"][name] = perplexity(
                model,
                tokenizer,
                src,
                seqlen=seqlen,
                batch_size=batch_size,
                max_tokens=max_tokens,
                progress=progress,
            )
    if tasks:
        task_list = [tasks] if isinstance(tasks, str) else list(tasks)
        out["zeroshot"] = zeroshot(
            model, tokenizer, task_list, limit=limit, batch_size=batch_size, progress=progress
        )
    if speed:
        kwargs = dict(speed) if isinstance(speed, dict) else {}
        kwargs.setdefault("progress", progress)
        out["speed"] = measure_speed(model, **kwargs)
    return out
