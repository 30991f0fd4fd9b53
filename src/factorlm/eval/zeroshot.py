"""Zero-shot multiple-choice accuracy: local JSONL tasks, or lm-eval tasks by name (online).

A local task is a JSONL file, one example per line::

    {"context": "Q: ... \\nA:", "choices": ["...", "..."], "gold": 1}

Each choice is scored like lm-eval scores ``loglikelihood`` requests: continuation =
``" " + choice`` (unless the choice already starts with whitespace; trailing whitespace of the
context moves to the continuation), context and continuation are encoded separately (no special
tokens) and their ids concatenated, and the score is the sum of the log-probabilities of the
continuation tokens. ``acc`` takes the argmax of the score, ``acc_norm`` the argmax of the score
divided by the length of the choice in UTF-8 bytes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from factorlm.errors import ConfigError, EvaluationError
from factorlm.eval.perplexity import _logits, eval_mode, max_positions, model_device

logger = logging.getLogger(__name__)

__all__ = ["encode_pair", "load_mc_task", "loglikelihoods", "score_mc_task", "zeroshot"]


def load_mc_task(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """The examples of a local multiple-choice JSONL file (first ``limit`` of them).

    Raises:
        EvaluationError: unreadable file, invalid JSON, or a line without a string ``context``,
            a non-empty list of string ``choices`` and an integer ``gold`` index into them.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{p}: cannot read ({e})") from e
    out: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{p}, line {lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise EvaluationError(f"{p}, line {lineno}: expected a JSON object")
        for key in ("context", "choices", "gold"):
            if key not in row:
                raise EvaluationError(
                    f"{p}, line {lineno}: no field {key!r} (a multiple-choice line needs "
                    '{"context": str, "choices": [str, ...], "gold": int})'
                )
        ctx, choices, gold = row["context"], row["choices"], row["gold"]
        if not isinstance(ctx, str):
            raise EvaluationError(f"{p}, line {lineno}: field 'context' is not a string")
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise EvaluationError(
                f"{p}, line {lineno}: field 'choices' must be a non-empty list of non-empty strings"
            )
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise EvaluationError(
                f"{p}, line {lineno}: field 'gold' must be an index into the {len(choices)} choices"
            )
        out.append({"context": ctx, "choices": choices, "gold": gold})
    if not out:
        raise EvaluationError(f"{p}: no examples")
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer: Any, context: str, choice: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` of one choice (see module docstring)."""
    continuation = choice if choice[:1].isspace() else " " + choice
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    ctx_ids = _encode(tokenizer, context)
    if not ctx_ids:  # nothing to condition on: start from BOS / EOS like lm-eval
        start = getattr(tokenizer, "bos_token_id", None)
        if start is None:
            start = getattr(tokenizer, "eos_token_id", None)
        if start is None:
            raise EvaluationError("empty context and the tokenizer has no BOS/EOS token")
        ctx_ids = [int(start)]
    return ctx_ids, _encode(tokenizer, continuation)


def loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[float]:
    """Sum of log-probabilities of each continuation given its context.

    ``requests`` are ``(context ids, continuation ids)``; sequences longer than the model's
    maximum keep their rightmost tokens. Batches are built from requests of similar length
    (longest first) and right-padded, so padding never influences a scored position. Log-probs
    are computed with ``log_softmax`` in float32.

    Raises:
        EvaluationError: an empty continuation, or non-finite log-probs.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    limit = max_positions(model)
    seqs: list[tuple[list[int], int]] = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise EvaluationError(f"request {i}: the continuation encodes to no token")
        full = (list(ctx) + list(cont))[:-1]  # inputs; the last token is only predicted
        if limit is not None and len(full) > limit:
            full = full[-limit:]
        if len(cont) > len(full):
            raise EvaluationError(f"request {i}: continuation longer than the model maximum")
        seqs.append((full, len(cont)))
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][0]))
    scores = [0.0] * len(seqs)
    dev = model_device(model)
    bar = tqdm(total=len(seqs), desc=desc, unit="req", disable=not progress)
    with eval_mode(model), torch.no_grad(), bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = len(seqs[idx[0]][0])
            batch = torch.zeros(len(idx), width, dtype=torch.long)
            for row, k in enumerate(idx):
                inp = seqs[k][0]
                batch[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            logits = _logits(model(batch.to(dev)))
            for row, k in enumerate(idx):
                inp, n_cont = seqs[k]
                cont = requests[k][1]
                last = len(inp)  # positions last-n_cont .. last-1 predict the continuation
                lp = torch.log_softmax(logits[row, last - n_cont : last].float(), dim=-1)
                target = torch.tensor(cont, dtype=torch.long, device=lp.device).unsqueeze(-1)
                value = float(lp.gather(-1, target).double().sum())
                if value != value or value in (float("inf"), float("-inf")):
                    raise EvaluationError(f"request {k}: non-finite log-probability ({value})")
                scores[k] = value
            bar.update(len(idx))
    return scores


def score_mc_task(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    batch_size: int = 8,
    progress: bool = False,
    name: str = "task",
) -> dict[str, Any]:
    """acc / acc_norm of ``model`` on multiple-choice ``examples`` (see module docstring)."""
    requests: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        for choice in ex["choices"]:
            requests.append(encode_pair(tokenizer, ex["context"], choice))
    scores = loglikelihoods(model, requests, batch_size=batch_size, progress=progress, desc=name)
    correct = correct_norm = 0
    pos = 0
    for ex in examples:
        choices = ex["choices"]
        s = scores[pos : pos + len(choices)]
        pos += len(choices)
        norm = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(s, choices, strict=True)]
        correct += int(max(range(len(s)), key=s.__getitem__) == ex["gold"])
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == ex["gold"])
    n = len(examples)
    return {"task": name, "acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def _local_files(task: str) -> list[Path] | None:
    p = Path(task).expanduser()
    if p.is_file() and p.suffix.lower() == ".jsonl":
        return [p]
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if not files:
            raise EvaluationError(f"{task}: folder holds no .jsonl multiple-choice file")
        return files
    if p.suffix.lower() in (".jsonl", ".json") or os.sep in task:
        raise EvaluationError(f"no such multiple-choice file or folder: {task}")
    return None


def _lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None,
    batch_size: int,
) -> dict[str, dict[str, Any]]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise EvaluationError(
            f"lm-eval tasks {tasks} need the 'lm_eval' package (pip install 'factorlm[eval]'); "
            "or pass local multiple-choice JSONL files"
        ) from e
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    except Exception as e:  # noqa: BLE001 - unknown task, offline dataset, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise EvaluationError(
            f"lm-eval failed on {', '.join(tasks)} (unknown task, or dataset unavailable "
            f"offline?): {type(e).__name__}: {first}"
        ) from e
    if not out or "results" not in out:
        raise EvaluationError(f"lm-eval returned no results for {', '.join(tasks)}")
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        if task not in out["results"]:
            raise EvaluationError(f"lm-eval returned no result for task {task!r}")
        metrics = out["results"][task]
        res: dict[str, Any] = {"task": task, "source": "lm-eval"}
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if isinstance(value, int | float) and metric not in res:
                res[metric] = value
        n = (out.get("n-samples") or {}).get(task, {})
        res["n"] = n.get("effective") if isinstance(n, dict) else None
        results[task] = res
    return results


def zeroshot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy on each task.

    Args:
        tasks: each an existing ``.jsonl`` multiple-choice file, a folder of them (one result
            per file), or an lm-eval task name (run with ``lm_eval.simple_evaluate`` on the
            in-memory model; needs the datasets online or in the HF cache).
        limit: first ``limit`` examples of each task.
        batch_size: sequences per forward pass.

    Returns:
        ``{task: {"task", "acc", "acc_norm", "n", ...}}``; keys are the task strings as given
        (for a folder: the path of each file in it).

    Raises:
        EvaluationError: malformed local file, missing path, or lm-eval failure.
    """
    if tokenizer is None:
        raise EvaluationError("zero-shot evaluation needs a tokenizer")
    if isinstance(tasks, str):
        tasks = [tasks]
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    results: dict[str, dict[str, Any]] = {}
    remote: list[str] = []
    for task in tasks:
        files = _local_files(task)
        if files is None:
            remote.append(task)
            continue
        for f in files:
            key = task if len(files) == 1 and Path(task).is_file() else str(f)
            examples = load_mc_task(f, limit)
            res = score_mc_task(model, tokenizer, examples, batch_size, progress, name=f.stem)
            res["source"] = str(f)
            logger.info(
                "zero-shot %s: acc %.4f acc_norm %.4f (n=%d)",
                f.stem,
                res["acc"],
                res["acc_norm"],
                res["n"],
            )
            results[key] = res
    if remote:
        results.update(_lm_eval(model, tokenizer, remote, limit, batch_size))
    return results
