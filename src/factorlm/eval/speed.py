"""Inference speed (prefill / decode tokens per second) and memory of causal LMs.

* prefill: the first step of ``generate``: one forward pass over ``batch_size x prompt_len``
  random token ids that fills the KV cache and computes the logits of the last position only
  (``logits_to_keep=1`` where the model's forward takes it, as ``generate`` passes it).
* decode: greedy decoding of ``gen_len`` tokens with the KV cache (manual loop over
  ``past_key_values``; models without one, e.g. Mamba, use ``model.generate`` and subtract the
  prefill time), timed separately from the prefill that fills the cache.
* memory: ``peak_mem_bytes = model_bytes + overhead`` where ``model_bytes`` are the parameter
  and buffer bytes and ``overhead`` the peak memory above the level before the run (CUDA:
  ``torch.cuda.max_memory_allocated`` after a reset; CPU: the process peak RSS, reset through
  ``/proc/self/clear_refs`` on Linux, else ``resource.getrusage``). The raw process / device
  peak is reported too (``raw_peak_bytes``), but it includes everything else in the process.

Timings are medians over ``repeats``; :func:`compare_speed` interleaves the repeats of several
models so that machine noise hits them alike, and reports ratios to the first model.
``compile=True`` runs prefill and decode through ``torch.compile(model.forward)`` with a
transformers ``StaticCache`` (fixed shapes: one graph for the prompt, one for a decode step; the
compilation happens in the warm-up runs). :func:`speed_table` runs the grid batch sizes x
{eager, compiled} for several models side by side.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from factorlm.errors import ConfigError, EvaluationError
from factorlm.eval.perplexity import _logits, eval_mode, max_positions, place_model

logger = logging.getLogger(__name__)

__all__ = ["compare_speed", "measure_speed", "model_bytes", "speed_table"]


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _rss_bytes() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) of this process from /proc (Linux), or (None, None)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward argument taking the KV cache (``cache`` since transformers 5.2x)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output: Any) -> Any:
    """The KV cache of a model output, or None (read without touching deprecated attributes)."""
    if isinstance(output, dict):  # transformers ModelOutput is an OrderedDict of set fields
        for key in ("cache", "past_key_values"):
            if output.get(key) is not None:
                return output[key]
        return None
    return getattr(output, "past_key_values", None)


# every model measured side by side compiles the same transformers forward code (one dynamo cache
# entry per model, shape and grad mode): past dynamo's default limit of 8 the rest would silently
# run eager under a "compile" label
RECOMPILE_LIMIT = 256


def _allow_recompiles() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)


class _Bench:
    """One model's prefill / decode runs on fixed random prompts."""

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        prompt_len: int,
        gen_len: int,
        device: str | torch.device | None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.device = place_model(model, device)
        self.batch_size, self.prompt_len, self.gen_len = batch_size, prompt_len, gen_len
        limit = max_positions(model)
        if limit is not None and prompt_len + gen_len > limit:
            raise ConfigError(
                f"prompt_len + gen_len = {prompt_len + gen_len} exceeds the model's maximum of "
                f"{limit} positions"
            )
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1000
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, int(vocab), (batch_size, prompt_len), generator=g).to(
            self.device
        )
        self.use_generate = False
        self.cache_kw = _cache_kwarg(model)
        self.compiled = compile
        self.forward: Callable[..., Any] = model
        self.static_cache = None
        if compile:
            _allow_recompiles()
            self.forward = torch.compile(model.forward, dynamic=False)
            self.static_cache = _static_cache(model, prompt_len + gen_len + 1)
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self.pass_positions = "position_ids" in params
        keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.keep_last = {keep: 1} if keep else {}

    def _step_kwargs(self, start: int, length: int) -> dict[str, Any]:
        if not self.pass_positions:
            return {}
        pos = torch.arange(start, start + length, device=self.device)
        return {"position_ids": pos.unsqueeze(0).expand(self.batch_size, -1)}

    def _prefill(self) -> tuple[Any, Any]:
        """``generate``'s first step: (logits of the last position, the filled cache or None)."""
        if self.static_cache is not None:
            self.static_cache.reset()
            out = self.forward(
                self.ids,
                **{self.cache_kw: self.static_cache},
                use_cache=True,
                **self.keep_last,
                **self._step_kwargs(0, self.prompt_len),
            )
            return _logits(out)[:, -1:], self.static_cache
        out = self.model(self.ids, use_cache=True, **self.keep_last)
        return _logits(out)[:, -1:], _cache_of(out)

    def prefill(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self._prefill()
        _sync(self.device)
        return time.perf_counter() - t0

    def decode(self) -> float:
        """Seconds to decode ``gen_len`` tokens per sequence, prefill excluded."""
        _sync(self.device)
        t0 = time.perf_counter()
        last, past = self._prefill()
        nxt = last[:, -1].argmax(-1, keepdim=True)
        _sync(self.device)
        t_prefill = time.perf_counter() - t0
        if past is None or self.use_generate:
            if self.compiled:
                raise ConfigError("compile=True needs a model with a KV cache")
            self.use_generate = True
            return self._decode_generate(t_prefill)
        t0 = time.perf_counter()
        for i in range(self.gen_len):
            out = self.forward(
                nxt,
                **{self.cache_kw: past},
                use_cache=True,
                **self._step_kwargs(self.prompt_len + i, 1),
            )
            if self.static_cache is None:
                past = _cache_of(out)
            nxt = _logits(out)[:, -1].argmax(-1, keepdim=True)
        _sync(self.device)
        return time.perf_counter() - t0

    def _decode_generate(self, t_prefill: float) -> float:
        config = getattr(self.model, "config", None)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = getattr(config, "eos_token_id", None)
        if isinstance(pad, list):
            pad = pad[0] if pad else None
        _sync(self.device)
        t0 = time.perf_counter()
        self.model.generate(
            self.ids,
            attention_mask=torch.ones_like(self.ids),
            max_new_tokens=self.gen_len + 1,
            min_new_tokens=self.gen_len + 1,
            do_sample=False,
            pad_token_id=0 if pad is None else pad,
        )
        _sync(self.device)
        # generate = prefill (first token) + gen_len decode steps
        return max(time.perf_counter() - t0 - t_prefill, 1e-9)

    def memory(self) -> dict[str, int | str | None]:
        """Peak memory of one prefill + decode run (see module docstring)."""
        weights = model_bytes(self.model)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.prefill()
            self.decode()
            raw = torch.cuda.max_memory_allocated(self.device)
            kind = "cuda max_memory_allocated"
        else:
            before, _ = _rss_bytes()
            if before is not None and _reset_rss_peak():
                self.prefill()
                self.decode()
                base, raw = before, _rss_bytes()[1]
                kind = "process peak RSS (VmHWM)"
            else:
                base = _ru_maxrss()
                self.prefill()
                self.decode()
                raw = _ru_maxrss()
                kind = "process peak RSS (ru_maxrss)"
        overhead = max(0, (raw or 0) - base)
        return {
            "peak_mem_bytes": weights + overhead,
            "mem_overhead_bytes": overhead,
            "raw_peak_bytes": raw,
            "mem_kind": kind,
            "model_bytes": weights,
        }


def _static_cache(model: torch.nn.Module, max_len: int):
    try:
        from transformers import StaticCache
    except ImportError as e:  # pragma: no cover - very old transformers
        raise ConfigError("compile=True needs transformers' StaticCache") from e
    return StaticCache(config=model.config, max_cache_len=max_len)


def _check(batch_size: int, prompt_len: int, gen_len: int, warmup: int, repeats: int) -> None:
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("prompt_len", prompt_len, 1),
        ("gen_len", gen_len, 1),
        ("warmup", warmup, 0),
        ("repeats", repeats, 1),
    ):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")


def compare_speed(
    models: dict[str, torch.nn.Module],
    batch_size: int = 1,
    prompt_len: int = 128,
    gen_len: int = 32,
    device: str | torch.device | None = None,
    warmup: int = 1,
    repeats: int = 3,
    progress: bool = False,
    compile: bool = False,
    memory: bool = True,
) -> dict[str, dict[str, Any]]:
    """:func:`measure_speed` of several models, repeats interleaved, with ratios to the first.

    Returns ``{name: result}`` in the order of ``models``; each result has the keys of
    :func:`measure_speed` plus ``prefill_ratio`` / ``decode_ratio`` (tokens/s relative to the
    first model: > 1 is faster), ``mem_ratio`` and ``model_bytes_ratio``. ``memory=False`` skips
    the extra prefill + decode run that measures peak memory (``peak_mem_bytes`` is then None).
    """
    if not models:
        raise ConfigError("compare_speed needs at least one model")
    _check(batch_size, prompt_len, gen_len, warmup, repeats)
    benches = {
        name: _Bench(m, batch_size, prompt_len, gen_len, device, compile)
        for name, m in models.items()
    }
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in benches}
    results: dict[str, dict[str, Any]] = {}
    try:
        with contextlib.ExitStack() as stack, torch.inference_mode():
            for b in benches.values():
                stack.enter_context(eval_mode(b.model))
            for _ in range(warmup):
                for b in benches.values():
                    b.prefill()
                    b.decode()
            steps: list[tuple[str, Callable[[], float], str]] = []
            for _ in range(repeats):
                for name, b in benches.items():
                    steps += [(name, b.prefill, "prefill"), (name, b.decode, "decode")]
            for name, fn, kind in tqdm(steps, desc="speed", disable=not progress):
                times[name][kind].append(fn())
            for name, b in benches.items():
                results[name] = _result(b, times[name], memory)
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        raise EvaluationError(f"speed measurement failed: {type(e).__name__}: {e}") from e
    first = next(iter(results.values()))
    for res in results.values():
        res["prefill_ratio"] = res["prefill_tok_s"] / first["prefill_tok_s"]
        res["decode_ratio"] = res["decode_tok_s"] / first["decode_tok_s"]
        if memory:
            res["mem_ratio"] = res["peak_mem_bytes"] / max(1, first["peak_mem_bytes"])
        res["model_bytes_ratio"] = res["model_bytes"] / max(1, first["model_bytes"])
    return results


def _result(b: _Bench, times: dict[str, list[float]], memory: bool = True) -> dict[str, Any]:
    prefill_s = statistics.median(times["prefill"])
    decode_s = statistics.median(times["decode"])
    res: dict[str, Any] = {
        "device": str(b.device),
        "dtype": str(next(b.model.parameters()).dtype).replace("torch.", ""),
        "batch_size": b.batch_size,
        "prompt_len": b.prompt_len,
        "gen_len": b.gen_len,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tok_s": b.batch_size * b.prompt_len / prefill_s,
        "decode_tok_s": b.batch_size * b.gen_len / decode_s,
        "decode_method": "generate" if b.use_generate else "kv-cache loop",
        "mode": "compile+static-cache" if b.compiled else "eager",
        "repeats": len(times["prefill"]),
    }
    if memory:
        res.update(b.memory())
    else:
        res.update(peak_mem_bytes=None, model_bytes=model_bytes(b.model))
    logger.info(
        "speed: prefill %.1f tok/s, decode %.1f tok/s, peak memory %s MiB",
        res["prefill_tok_s"],
        res["decode_tok_s"],
        "?" if res["peak_mem_bytes"] is None else f"{res['peak_mem_bytes'] / 2**20:.1f}",
    )
    return res


def measure_speed(
    model: torch.nn.Module,
    batch_size: int = 1,
    prompt_len: int = 128,
    gen_len: int = 32,
    device: str | torch.device | None = None,
    warmup: int = 1,
    repeats: int = 3,
    progress: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Prefill / decode throughput and peak memory of ``model`` (see module docstring).

    Returns:
        ``{"device", "dtype", "batch_size", "prompt_len", "gen_len", "prefill_tok_s",
        "decode_tok_s", "prefill_s", "decode_s", "peak_mem_bytes", "mem_overhead_bytes",
        "raw_peak_bytes", "mem_kind", "model_bytes", "decode_method", "repeats"}``.

    Raises:
        ConfigError: invalid sizes (or prompt + generation longer than the model maximum).
        EvaluationError: the model failed to run.
    """
    res = compare_speed(
        {"model": model},
        batch_size=batch_size,
        prompt_len=prompt_len,
        gen_len=gen_len,
        device=device,
        warmup=warmup,
        repeats=repeats,
        progress=progress,
        compile=compile,
    )["model"]
    for key in ("prefill_ratio", "decode_ratio", "mem_ratio", "model_bytes_ratio"):
        res.pop(key, None)
    return res


def speed_table(
    models: dict[str, torch.nn.Module],
    batch_sizes: tuple[int, ...] = (1, 8),
    compile_modes: tuple[bool, ...] = (False,),
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`compare_speed` for every batch size and mode (eager / compiled): one row per model,
    with ``model``, ``batch_size``, ``mode`` and the ratios to the first model of its run."""
    rows = []
    for compiled in compile_modes:
        for bs in batch_sizes:
            res = compare_speed(models, batch_size=bs, compile=compiled, **kwargs)
            rows += [{"model": name, **r} for name, r in res.items()]
    return rows
