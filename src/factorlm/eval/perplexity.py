"""Token perplexity with the paper protocol (``docs/METHODS.md``, "Perplexity protocol").

Join the documents with ``"\\n\\n"``, tokenize once (no special tokens), cut into non-overlapping
windows of ``seqlen`` tokens (the final partial window is dropped), and average the token negative
log-likelihood over every predicted token of every window (``seqlen - 1`` per window). A window
with non-finite logits or loss is an error, never skipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from factorlm.errors import ConfigError, EvaluationError
from factorlm.eval.sources import describe_source, load_texts

logger = logging.getLogger(__name__)

__all__ = ["default_seqlen", "max_positions", "model_device", "perplexity", "tokenize_joined"]

DEFAULT_SEQLEN = 2048
_LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (where its inputs go)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def place_model(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """Move ``model`` to ``device`` when one is given and differs; return the input device."""
    current = model_device(model)
    if device is None:
        return current
    target = torch.device(device)
    if target.type != current.type or (
        target.index is not None and current.index is not None and target.index != current.index
    ):
        logger.info("moving the model from %s to %s", current, target)
        model.to(target)
    return model_device(model)


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's maximum sequence length from its config, or None when it has none."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_seqlen(model: torch.nn.Module) -> int:
    """``min(2048, model maximum)`` (2048 when the model states no maximum)."""
    limit = max_positions(model)
    return DEFAULT_SEQLEN if limit is None else min(DEFAULT_SEQLEN, limit)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout) for the block, restore the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def quiet_tokenizer(tokenizer: Any) -> Iterator[None]:
    """Silence the tokenizer's "sequence length is longer than the maximum" warning."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    old_flag = flags.get(_LENGTH_WARNING) if isinstance(flags, dict) else None
    if isinstance(flags, dict):
        flags[_LENGTH_WARNING] = True
    tf_logger = logging.getLogger("transformers.tokenization_utils_base")
    old_level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tf_logger.setLevel(old_level)
        if isinstance(flags, dict):
            if old_flag is None:
                flags.pop(_LENGTH_WARNING, None)
            else:
                flags[_LENGTH_WARNING] = old_flag


def _encode(tokenizer: Any, text: str) -> list[int]:
    with quiet_tokenizer(tokenizer):
        enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return list(ids)


def tokenize_joined(
    tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None, margin: int = 256
) -> list[int]:
    """Token ids of ``"\\n\\n".join(texts)`` (no special tokens), truncated to ``max_tokens``.

    With ``max_tokens`` only a prefix of the text is tokenized: the prefix grows until it yields
    at least ``max_tokens + margin`` tokens, so the kept tokens are those of the whole text
    (tokenizers only change tokens near the cut) without tokenizing megabytes for a few
    thousand tokens.
    """
    text = "\n\n".join(texts)
    if max_tokens is None:
        return _encode(tokenizer, text)
    if max_tokens <= 0:
        raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
    n_chars = max(4096, 8 * (max_tokens + margin))
    while True:
        if n_chars >= len(text):
            return _encode(tokenizer, text)[:max_tokens]
        ids = _encode(tokenizer, text[:n_chars])
        if len(ids) >= max_tokens + margin:
            return ids[:max_tokens]
        n_chars *= 2


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple | list):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise EvaluationError(f"the model returned no logits ({type(output).__name__})")
    return logits


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum of token NLL of one window: ``logits`` (T, V) predict ``ids[1:]`` (log_softmax in
    float32, sum in float64)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    target = ids[1:].to(logp.device).unsqueeze(-1)
    return float(-logp.gather(-1, target).double().sum())


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    source: str | os.PathLike | Sequence[str],
    seqlen: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    text_field: str = "text",
) -> dict[str, Any]:
    """Token perplexity of ``model`` on ``source`` (paper protocol, see module docstring).

    Args:
        model: a causal LM returning ``.logits`` (dense or compressed).
        tokenizer: its tokenizer (called with ``add_special_tokens=False``).
        source: anything :func:`factorlm.eval.load_texts` accepts.
        seqlen: window length; default ``min(2048, model maximum positions)``.
        batch_size: windows per forward pass.
        max_tokens: evaluate only the first ``max_tokens`` tokens of the joined text.
        device: move the model there first (default: leave it where it is); inputs always go
            to the device of the model's first parameter.
        progress: show a tqdm bar over windows.
        text_field: JSONL field holding the text.

    Returns:
        ``{"ppl", "nll", "n_tokens" (predicted tokens), "n_windows", "seqlen", "source",
        "max_tokens"}``; ``nll`` is the mean token NLL (nats), ``ppl = exp(nll)``.

    Raises:
        EvaluationError: no tokenizer, unreadable source, fewer tokens than one window, or a
            window with non-finite logits / loss (naming the window).
        ConfigError: invalid ``seqlen`` / ``batch_size`` / ``max_tokens``.
    """
    if tokenizer is None:
        raise EvaluationError("perplexity needs a tokenizer (the model was loaded without one)")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    limit = max_positions(model)
    if seqlen is None:
        seqlen = default_seqlen(model)
    if seqlen < 2:
        raise ConfigError(f"seqlen must be >= 2, got {seqlen}")
    if limit is not None and seqlen > limit:
        raise ConfigError(f"seqlen {seqlen} exceeds the model's maximum of {limit} positions")
    name = describe_source(source)
    texts = load_texts(source, text_field=text_field)
    ids = tokenize_joined(tokenizer, texts, max_tokens)
    n_windows = len(ids) // seqlen
    if n_windows == 0:
        raise EvaluationError(
            f"{name}: {len(ids)} tokens, fewer than one window of {seqlen}; "
            "lower seqlen or use more text"
        )
    dev = place_model(model, device)
    # the logits of a batch are (batch, seqlen, vocab) floats: keep them under ~1 GiB
    vocab = int(getattr(model.config, "vocab_size", 0) or 0) if hasattr(model, "config") else 0
    if vocab:
        batch_size = max(1, min(batch_size, (1 << 30) // (seqlen * vocab * 4)))
    data = torch.tensor(ids[: n_windows * seqlen], dtype=torch.long).view(n_windows, seqlen)
    logger.info("perplexity on %s: %d tokens, %d windows of %d", name, len(ids), n_windows, seqlen)
    total = 0.0
    bar = tqdm(total=n_windows, desc="perplexity", unit="win", disable=not progress)
    with eval_mode(model), torch.no_grad(), bar:
        for start in range(0, n_windows, batch_size):
            batch = data[start : start + batch_size].to(dev)
            logits = _logits(model(batch, use_cache=False))
            for j in range(batch.shape[0]):
                idx = start + j
                what = None if bool(torch.isfinite(logits[j]).all()) else "logits"
                nll = window_nll(logits[j], batch[j]) if what is None else math.nan
                if what is None and not math.isfinite(nll):
                    what = "loss"
                if what is not None:
                    raise EvaluationError(
                        f"{name}: window {idx} of {n_windows} (0-based; tokens "
                        f"{idx * seqlen}-{(idx + 1) * seqlen - 1}) has non-finite {what} "
                        "(NaN/Inf); the model is numerically broken (windows are never skipped)"
                    )
                total += nll
            bar.update(batch.shape[0])
    n_tokens = n_windows * (seqlen - 1)
    mean = total / n_tokens
    ppl = math.exp(mean) if mean < 709.0 else math.inf
    logger.info("perplexity on %s: %.4f (mean NLL %.5f over %d tokens)", name, ppl, mean, n_tokens)
    return {
        "ppl": ppl,
        "nll": mean,
        "n_tokens": n_tokens,
        "n_windows": n_windows,
        "seqlen": seqlen,
        "source": name,
        "max_tokens": max_tokens,
    }
