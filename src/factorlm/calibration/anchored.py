"""Statistics of two streams of the same tokens: the dense model's and the compressed model's.

An anchored fit (see :mod:`factorlm.methods.anchored`) targets the dense model's output W X from
the compressed model's input X̃, so it needs, per linear, G̃ = X̃ X̃^T and the cross-Gram
C = X X̃^T. The two inputs of one batch exist at different times (the dense stream runs through
the dense block, the compressed stream through the partly compressed block), so the work is split:

* :class:`InputTap` records the inputs of chosen modules during one forward (the dense stream);
* :class:`CrossCollector` accumulates G̃, the mean square of X̃ and C during a second forward (the
  compressed stream), reading the recorded X of the same batch.

Both own their hooks and always remove them. Modules that receive the very same input tensor in one
forward (q/k/v, gate/up) share one record and one accumulator, as in
:class:`factorlm.calibration.stats.StatsCollector`. Sums are float64 (chunks of tokens in float32),
so they add across batches and processes like every other statistic.
"""

from __future__ import annotations

import torch
from torch import nn

from factorlm.calibration.stats import LayerStats, accumulate, check_stats_finite
from factorlm.errors import CalibrationError, NumericalError


class InputTap:
    """Context manager: ``inputs[name]`` = the (tokens x n) input of each module in the last forward.

    ``to`` / ``dtype``: where and how the recorded inputs are kept (e.g. CPU, to hold several
    batches); shared inputs are stored once.
    """

    def __init__(self, modules: dict[str, nn.Module], to=None, dtype=None) -> None:
        self.modules = modules
        self.to = to
        self.dtype = dtype
        self.inputs: dict[str, torch.Tensor] = {}
        self._seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(x) -> (x alive, kept)
        self._handles: list = []

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[0] is x:
                kept = seen[1]
            else:
                kept = x.detach().reshape(-1, x.shape[-1])
                if self.to is not None or self.dtype is not None:
                    kept = kept.to(device=self.to, dtype=self.dtype)
                self._seen[id(x)] = (x, kept)
            self.inputs[name] = kept

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The inputs recorded since the last call (and forget them)."""
        out, self.inputs, self._seen = self.inputs, {}, {}
        return out

    def __enter__(self) -> InputTap:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()


def add_cross(stats: LayerStats, x: torch.Tensor, x_tilde: torch.Tensor, chunk: int = 4096) -> None:
    """stats.cross += x^T x~ over the tokens (rows) of ``x`` and ``x_tilde`` (pure tensor math)."""
    if x.shape != x_tilde.shape:
        raise CalibrationError(
            f"the two streams disagree: dense input {tuple(x.shape)}, compressed {tuple(x_tilde.shape)}"
        )
    n = x.shape[1]
    if stats.cross is None:
        stats.cross = torch.zeros(n, n, dtype=torch.float64, device=x_tilde.device)
    for i in range(0, x.shape[0], chunk):
        a = x[i : i + chunk].to(device=x_tilde.device, dtype=torch.float32)
        b = x_tilde[i : i + chunk].to(torch.float32)
        stats.cross += (a.T @ b).to(torch.float64)


class CrossCollector:
    """Context manager: hooks accumulating G̃ (+ ``need``) and C for ``modules`` ({name: module}).

    Call :meth:`set_dense` with the dense stream's recorded inputs of a batch before running that
    batch's compressed stream, and :meth:`end_batch` after it: outside that window the hooks do
    nothing (the dense stream may run through the same modules). ``cross_for`` limits the
    cross-Gram to some modules (the others only get the statistics of ``need``).
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        need: frozenset[str] | set[str] = frozenset({"gram"}),
        cross_for: set[str] | None = None,
        prefix: str = "",
    ) -> None:
        self.modules = modules
        self.need = frozenset(need)
        self.cross_for = set(modules) if cross_for is None else set(cross_for)
        self.prefix = prefix
        self.stats: dict[str, LayerStats] = {name: LayerStats() for name in modules}
        self._dense: dict[str, torch.Tensor] = {}
        self._armed = False
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles: list = []

    def set_dense(self, inputs: dict[str, torch.Tensor]) -> None:
        self._dense = inputs
        self._seen.clear()
        self._armed = True

    def end_batch(self) -> None:
        self._dense = {}
        self._seen.clear()
        self._armed = False

    def _hook(self, name: str):
        def hook(_mod, args):
            if not self._armed:
                return
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[0] is x:  # same input as an earlier module: share
                if self.stats[name] is not self.stats[seen[1]]:
                    self.stats[name] = self.stats[seen[1]]
                return
            self._seen[id(x)] = (x, name)
            st = self.stats[name]
            flat = x.detach().reshape(-1, x.shape[-1])
            accumulate(st, flat, self.need)
            if name in self.cross_for:
                if name not in self._dense:
                    raise CalibrationError(
                        f"{self.prefix}{name}: no dense-stream input recorded for the anchored fit"
                    )
                add_cross(st, self._dense[name], flat)

        return hook

    def __enter__(self) -> CrossCollector:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        self._dense = {}
        if exc_type is None:
            for name, st in self.stats.items():
                check_stats_finite(st, f"{self.prefix}{name}")
                if st.cross is not None and not bool(torch.isfinite(st.cross.diagonal()).all()):
                    raise NumericalError(
                        f"{self.prefix}{name}: dense-stream input activations contain NaN or Inf"
                    )
