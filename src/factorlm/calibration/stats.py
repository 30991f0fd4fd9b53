"""Per-layer calibration statistics, accumulated as sums (so they add across batches and processes).

:class:`StatsCollector` owns the forward hooks and always removes them. Modules that receive the
very same input tensor in a forward pass (q/k/v, gate/up) share one accumulator, so the Gram
matrix of a shared input is computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from factorlm.errors import NumericalError
from factorlm.utils import autocast_off

STAT_KINDS = frozenset({"gram", "abs", "sq", "absmax"})
# the tensor fields of LayerStats (all sums, except abs_max: a maximum)
STAT_FIELDS = ("gram", "abs_sum", "sq_sum", "abs_max", "fisher_rows", "cross", "gram_dense")


@dataclass
class LayerStats:
    """Sums over calibration tokens of one linear layer's input x (n features)."""

    n_tokens: int = 0
    gram: torch.Tensor | None = None  # sum x x^T, float64 (n x n)
    abs_sum: torch.Tensor | None = None  # sum |x|, float64 (n)
    sq_sum: torch.Tensor | None = None  # sum x^2, float64 (n)
    abs_max: torch.Tensor | None = None  # max |x| (n)
    fisher_rows: torch.Tensor | None = (
        None  # sum over batches of squared gradient, summed per row (m)
    )
    # anchored fits (two streams of the same tokens): x the dense model's input, x~ the compressed
    # model's (then ``gram`` and ``sq_sum`` are of x~)
    cross: torch.Tensor | None = None  # sum x x~^T, float64 (n x n)
    gram_dense: torch.Tensor | None = None  # sum x x^T, float64 (n x n)

    @property
    def gram_mean(self) -> torch.Tensor:
        return self.gram / max(self.n_tokens, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n_tokens, 1)

    @property
    def sq_mean(self) -> torch.Tensor:
        return self.sq_sum / max(self.n_tokens, 1)

    def add(self, other: LayerStats) -> LayerStats:
        """Sum of two accumulations (used to merge processes / batches)."""

        def _add(a, b):
            if a is None:
                return b
            return a if b is None else a + b

        def _max(a, b):
            if a is None:
                return b
            return a if b is None else torch.maximum(a, b)

        return LayerStats(
            n_tokens=self.n_tokens + other.n_tokens,
            gram=_add(self.gram, other.gram),
            abs_sum=_add(self.abs_sum, other.abs_sum),
            sq_sum=_add(self.sq_sum, other.sq_sum),
            abs_max=_max(self.abs_max, other.abs_max),
            fisher_rows=_add(self.fisher_rows, other.fisher_rows),
            cross=_add(self.cross, other.cross),
            gram_dense=_add(self.gram_dense, other.gram_dense),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k in STAT_FIELDS if (v := getattr(self, k)) is not None}


def _add_gram(acc: torch.Tensor, x: torch.Tensor, split_at: int = 1024) -> None:
    """acc += x^T x, computing each off-diagonal block once for wide inputs (3/4 of the FLOPs)."""
    n = x.shape[1]
    if n < split_at:
        acc += (x.T @ x).to(acc.dtype)
        return
    h = n // 2
    a, b = x[:, :h], x[:, h:]
    acc[:h, :h] += (a.T @ a).to(acc.dtype)
    acc[h:, h:] += (b.T @ b).to(acc.dtype)
    acc[:h, h:] += (a.T @ b).to(acc.dtype)
    acc[h:, :h] = acc[:h, h:].T


def accumulate(
    stats: LayerStats,
    x: torch.Tensor,
    need: frozenset[str],
    chunk: int = 4096,
    gram_dtype=torch.float32,
) -> None:
    """Add the tokens of ``x`` (..., n) into ``stats`` (pure tensor math, no hooks).

    The Gram matrix is computed per chunk of tokens in ``gram_dtype`` (fast) and summed in float64.
    """
    x = x.detach().reshape(-1, x.shape[-1])
    n = x.shape[1]
    dev = x.device
    if "gram" in need:
        if stats.gram is None:
            stats.gram = torch.zeros(n, n, dtype=torch.float64, device=dev)
        # the hooks run inside the calibration passes' autocast (calib_dtype): without this every
        # x^T x would be a bf16 matmul (~3 significant digits, Grams no longer positive definite)
        with autocast_off(dev):
            for i in range(0, x.shape[0], chunk):
                _add_gram(stats.gram, x[i : i + chunk].to(gram_dtype))
    if "abs" in need:
        if stats.abs_sum is None:
            stats.abs_sum = torch.zeros(n, dtype=torch.float64, device=dev)
        for i in range(0, x.shape[0], chunk):
            stats.abs_sum += x[i : i + chunk].float().abs().sum(0).to(torch.float64)
    if "sq" in need:
        if stats.sq_sum is None:
            stats.sq_sum = torch.zeros(n, dtype=torch.float64, device=dev)
        for i in range(0, x.shape[0], chunk):  # fp32 partial sums per chunk, float64 across chunks
            stats.sq_sum += x[i : i + chunk].float().square().sum(0).to(torch.float64)
    if "absmax" in need:
        m = x.abs().amax(0).to(torch.float64)
        stats.abs_max = m if stats.abs_max is None else torch.maximum(stats.abs_max, m)
    stats.n_tokens += x.shape[0]


def check_stats_finite(stats: LayerStats, name: str) -> None:
    """NaN/Inf in a layer's inputs shows in its sums (x^2 on the Gram diagonal): one cheap check."""
    parts = [stats.gram.diagonal() if stats.gram is not None else None]
    parts += [stats.abs_sum, stats.sq_sum, stats.abs_max]
    for t in parts:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise NumericalError(f"{name}: input activations contain NaN or Inf")


class Hooks:
    """Context manager owning module hooks: :meth:`_register` returns their handles on entry;
    every one is removed on exit, error or not."""

    def _register(self) -> list:
        raise NotImplementedError

    def __enter__(self):
        self._handles = self._register()
        return self

    def __exit__(self, *exc) -> None:
        for h in getattr(self, "_handles", ()):
            h.remove()
        self._handles = []


class PreHooks(Hooks):
    """Hooks: a forward pre-hook ``self._hook(name)`` on each module of ``self.modules``."""

    modules: dict[str, nn.Module]

    def _hook(self, name: str):
        raise NotImplementedError

    def _register(self) -> list:
        return [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]


class StatsCollector(PreHooks):
    """Context manager: hooks on ``modules`` ({name: module}) accumulating :class:`LayerStats`.

    >>> with StatsCollector(targets, need={"gram"}) as col:
    ...     for h in batches: block(h); col.new_batch()
    >>> col.stats["self_attn.q_proj"].gram
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        need: frozenset[str] | set[str],
        check_finite: bool = True,
        gram_dtype=torch.float32,
        prefix: str = "",
    ) -> None:
        self.modules = modules
        self.need = frozenset(need) & STAT_KINDS
        self.check_finite = check_finite
        self.gram_dtype = gram_dtype
        self.prefix = prefix  # prepended to module names in error messages (e.g. "model.layers.3.")
        self.stats: dict[str, LayerStats] = {name: LayerStats() for name in modules}
        self._batch_seen: dict[
            int, tuple[torch.Tensor, str]
        ] = {}  # id(x) -> (x kept alive, owner name)

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0]
            if self.check_finite and not self.need and not torch.isfinite(x).all():
                raise NumericalError(f"{self.prefix}{name}: input activations contain NaN or Inf")
            seen = self._batch_seen.get(id(x))
            if seen is not None and seen[0] is x:
                owner = seen[1]
                if self.stats[name] is not self.stats[owner]:
                    if self.stats[name].n_tokens == 0:
                        self.stats[name] = self.stats[owner]  # share the accumulator from now on
                    else:  # pragma: no cover - sharing pattern changed between batches
                        accumulate(self.stats[name], x, self.need, gram_dtype=self.gram_dtype)
                return
            self._batch_seen[id(x)] = (x, name)
            if self.need:
                accumulate(self.stats[name], x, self.need, gram_dtype=self.gram_dtype)
            else:
                self.stats[name].n_tokens += x.reshape(-1, x.shape[-1]).shape[0]

        return hook

    def new_batch(self) -> None:
        self._batch_seen.clear()

    def __exit__(self, exc_type, *exc) -> None:
        super().__exit__(exc_type, *exc)
        self._batch_seen.clear()
        if exc_type is None and self.check_finite:  # the sums carry any NaN/Inf of the inputs
            for name, st in self.stats.items():
                check_stats_finite(st, f"{self.prefix}{name}")
