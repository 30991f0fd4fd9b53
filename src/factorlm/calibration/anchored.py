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

from factorlm.calibration.stats import Hooks, LayerStats, PreHooks, accumulate, check_stats_finite
from factorlm.errors import CalibrationError, NumericalError
from factorlm.utils import autocast_off


class InputTap(PreHooks):
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

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._seen.clear()


class InputLog(PreHooks):
    """Context manager: ``inputs[name]`` = the (tokens x n) inputs of each module, one per forward,
    kept on ``to`` (e.g. o_proj's inputs of every batch before q/k/v are compressed)."""

    def __init__(self, modules: dict[str, nn.Module], to=None) -> None:
        self.modules = modules
        self.to = to
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def _hook(self, name: str):
        def hook(_mod, args):
            self.inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).to(self.to))

        return hook


def add_cross(stats: LayerStats, x: torch.Tensor, x_tilde: torch.Tensor, chunk: int = 4096) -> None:
    """stats.cross += x^T x~ over the tokens (rows) of ``x`` and ``x_tilde`` (pure tensor math)."""
    if x.shape != x_tilde.shape:
        raise CalibrationError(
            f"the two streams disagree: dense input {tuple(x.shape)}, compressed {tuple(x_tilde.shape)}"
        )
    n = x.shape[1]
    if stats.cross is None:
        stats.cross = torch.zeros(n, n, dtype=torch.float64, device=x_tilde.device)
    with autocast_off(x_tilde.device):
        for i in range(0, x.shape[0], chunk):
            a = x[i : i + chunk].to(device=x_tilde.device, dtype=torch.float32)
            b = x_tilde[i : i + chunk].to(torch.float32)
            stats.cross += (a.T @ b).to(torch.float64)


class CrossCollector(PreHooks):
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

    def __exit__(self, exc_type, *exc) -> None:
        super().__exit__(exc_type, *exc)
        self._seen.clear()
        self._dense = {}
        if exc_type is None:
            for name, st in self.stats.items():
                check_stats_finite(st, f"{self.prefix}{name}")
                if st.cross is not None and not bool(torch.isfinite(st.cross.diagonal()).all()):
                    raise NumericalError(
                        f"{self.prefix}{name}: dense-stream input activations contain NaN or Inf"
                    )


class StopEarly(Exception):
    """Raised by :class:`EarlyStop` to end a forward whose remaining work nobody reads."""


class EarlyStop(PreHooks):
    """Context manager ending a block's forward once the last of ``modules`` has seen its input.

    A pass that only accumulates statistics of some linears does not need the rest of the block
    (e.g. the MLP after the attention's statistics). The first forward runs whole and records the
    order in which ``modules`` are called; when each was called exactly once, later forwards raise
    :class:`StopEarly` in the pre-hook of the last one, after the hooks registered before this
    context (the statistics') have run. Otherwise (a module called twice or never, e.g. routed
    experts) every forward runs whole. Call :meth:`run` around each forward to be cut: outside it
    the hooks do nothing (another stream may run through the same modules).
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self._order: list[str] = []
        self._last: str | None = None
        self._learning = True
        self._armed = False

    def _hook(self, name: str):
        def hook(_mod, _args):
            if not self._armed:
                return
            if self._learning:
                self._order.append(name)
            elif name == self._last:
                raise StopEarly

        return hook

    def run(self, fn):
        """fn() (a forward); its result, or None when the forward was stopped."""
        self._armed = True
        try:
            out = fn()
        except StopEarly:
            return None
        finally:
            self._armed = False
        if self._learning:
            self._learning = False
            if self._order and sorted(self._order) == sorted(self.modules):  # each called once
                self._last = self._order[-1]
        return out


class ResidualTarget(Hooks):
    """Context manager: what one output linear must produce for its block to output a target.

    For a block that adds the linear's output y (bias b included) to its own output, the block
    outputs ``target`` when the linear outputs Y = target - out + y (``out``: the block's output
    now). :meth:`run` runs a forward of the block and accumulates the float64 cross-sum
    ``cross`` += (Y - b) H̃^T (m x I) over its tokens, H̃ the linear's input, after :meth:`check`
    has shown that the block really adds y to its output (a perturbation of y must reach the
    output unchanged; a norm after the MLP, as in Gemma 2/3, fails it). After :meth:`keep_to`,
    :meth:`run` also keeps, per batch, the linear's input H̃ and the rest of the block's output
    (``out - y``, float32) in ``kept``: the block's output with a new linear is then that rest
    plus the new linear's output, without another forward of the block.
    """

    def __init__(self, module: nn.Module, bias: torch.Tensor | None, tol: float = 1e-3) -> None:
        self.module = module
        self.bias = None if bias is None else bias.detach()
        self.tol = tol
        self.cross: torch.Tensor | None = None
        self.additive: bool | None = None
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._keep_to = None
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._delta: torch.Tensor | None = None

    def _pre(self, _mod, args):
        self._x = args[0].detach()

    def _post(self, _mod, _args, y):
        if self._delta is not None:
            return y + self._delta.to(y.dtype)
        self._y = y.detach()
        return None

    def check(self, fn) -> bool:
        """Whether the block adds the linear's output to its own: ``fn`` (a forward of the block,
        run twice here, outside any statistics hooks) with a random perturbation of the linear's
        output must move the block's output by exactly that perturbation."""
        with self:
            out = fn()
            y = self._y
            if y is None:
                raise CalibrationError("the block's forward did not call the linear of the target")
            g = torch.Generator(device="cpu").manual_seed(0)
            delta = torch.randn(y.shape, generator=g).to(device=y.device, dtype=y.dtype)
            self._delta = delta * (y.float().std() + 1e-3)
            try:
                moved = fn().to(y.device).float() - out.to(y.device).float()
            finally:
                delta, self._delta = self._delta.float(), None
                self._x = self._y = None
        # a bf16 output (the calibration's autocast) rounds y + delta by up to half an ulp
        tol = max(self.tol, 4 * torch.finfo(y.dtype).eps)
        self.additive = moved.numel() == delta.numel() and float(
            (moved.reshape(delta.shape) - delta).norm()
        ) <= tol * float(delta.norm())
        return self.additive

    def keep_to(self, to) -> None:
        """From now on :meth:`run` keeps each batch's (H̃, out - y) on ``to``, in ``kept``."""
        self.kept, self._keep_to = [], to

    def run(self, fn, target: torch.Tensor) -> torch.Tensor:
        """out = fn() (the block's output); accumulates the cross-sum against ``target`` (after a
        :meth:`check` that found the block additive)."""
        if not self.additive:
            raise CalibrationError("ResidualTarget.run needs a successful check() first")
        out = fn()
        x, y = self._x, self._y
        self._x = self._y = None
        if y is None:
            raise CalibrationError("the block's forward did not call the linear of the target")
        m = y.shape[-1]
        Y = (target.to(y.device).float() - out.to(y.device).float()).reshape(-1, m)
        Y = Y + y.reshape(-1, m).float()
        if self.bias is not None:
            Y = Y - self.bias.to(Y.device).float()
        if self.kept is not None:
            rest = out.to(y.device).float() - y.float().reshape(out.shape)  # (OPT: y is 2-D)
            self.kept.append((x.to(self._keep_to), rest.to(self._keep_to)))
        X = x.reshape(-1, x.shape[-1])
        if self.cross is None:
            self.cross = torch.zeros(m, X.shape[1], dtype=torch.float64, device=X.device)
        with autocast_off(X.device):
            for i in range(0, X.shape[0], 4096):
                self.cross += (Y[i : i + 4096].T @ X[i : i + 4096].float()).to(torch.float64)
        return out

    def _register(self) -> list:
        return [
            self.module.register_forward_pre_hook(self._pre),
            self.module.register_forward_hook(self._post),
        ]
