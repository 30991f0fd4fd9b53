"""The first-order target of an MLP's refit output linear that cancels the attention's error.

A block of the common form h + a + m(h + a) whose attention output a became ã outputs its dense
value again, to first order, when the MLP's output linear also produces the difference a - ã
(the dense MLP on h + a is not run: that term, m(h + a) - m(h + ã), is left out; the exact target
is :class:`factorlm.calibration.anchored.ResidualTarget`'s). The least-squares output linear on
the kept channels of the MLP's input H̃ towards Y = W H̃ + (a - ã) needs the cross-sum
Y H̃^T = W G̃ + E, E = Σ (a - ã) H̃^T, which :class:`AttentionError` accumulates during the MLP's
statistics pass; a is the attention's output linear applied, as it was before compression, to its
input logged in the attention's pass (:class:`factorlm.calibration.anchored.InputLog`).
:func:`attention_is_additive` checks per block that the attention's output reaches the block's
output unchanged (a norm after the attention, as in Gemma 2/3, fails it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from factorlm.calibration.stats import Hooks
from factorlm.errors import CalibrationError, NumericalError


class AttentionError(Hooks):
    """Context manager: ``cross`` = Σ (a - ã) H̃^T (m x I, float64) over the tokens of the batches
    run between :meth:`set_batch` and :meth:`end_batch`.

    ã: the output of ``attn_out`` (the attention's output linear) now; a = ``dense(j)``, its output
    before compression on batch j (tokens x m); H̃: the input of ``mlp_out`` (the MLP's output
    linear) in the same forward. Its pre-hook must run before an early stop at ``mlp_out``.
    """

    def __init__(
        self,
        attn_out: nn.Module,
        mlp_out: nn.Module,
        dense: Callable[[int], torch.Tensor],
        chunk: int = 4096,
    ) -> None:
        self.attn_out = attn_out
        self.mlp_out = mlp_out
        self.dense = dense
        self.chunk = chunk
        self.cross: torch.Tensor | None = None
        self._j: int | None = None
        self._diff: torch.Tensor | None = None

    def set_batch(self, j: int) -> None:
        self._j, self._diff = j, None

    def end_batch(self) -> None:
        self._j, self._diff = None, None

    def _post(self, _mod, _args, y):
        if self._j is None:
            return None
        y = y.detach().reshape(-1, y.shape[-1]).float()
        a = self.dense(self._j).to(device=y.device, dtype=torch.float32)
        if a.shape != y.shape:
            raise CalibrationError(
                f"the attention's output {tuple(y.shape)} and its logged dense output "
                f"{tuple(a.shape)} disagree"
            )
        self._diff = a - y
        return None

    def _pre(self, _mod, args):
        if self._j is None:
            return
        if self._diff is None:
            raise CalibrationError("the MLP's output linear ran before the attention's output")
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        d, self._diff = self._diff, None
        if x.shape[0] != d.shape[0]:
            raise CalibrationError(
                f"the MLP saw {x.shape[0]} tokens, the attention {d.shape[0]}: no per-token target"
            )
        if self.cross is None:
            self.cross = torch.zeros(d.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        for i in range(0, x.shape[0], self.chunk):
            xi = x[i : i + self.chunk].to(torch.float32)
            self.cross += (d[i : i + self.chunk].to(xi.device).T @ xi).to(torch.float64)

    def _register(self) -> list:
        return [
            self.attn_out.register_forward_hook(self._post),
            self.mlp_out.register_forward_pre_hook(self._pre),
        ]

    def __exit__(self, exc_type, *exc) -> None:
        super().__exit__(exc_type, *exc)
        self.end_batch()
        if exc_type is None and self.cross is not None:
            if not bool(torch.isfinite(self.cross).all()):
                raise NumericalError("the attention's output error contains NaN or Inf")


def attention_is_additive(
    fn: Callable[[], torch.Tensor], attn_out: nn.Module, mlp_out: nn.Module, tol: float = 1e-3
) -> bool:
    """Whether the block (``fn``: one forward of it, run twice here outside any statistics hooks)
    adds the attention's output to its own: a random perturbation of ``attn_out``'s output, with
    ``mlp_out``'s output held at its unperturbed value, must move the block's output by exactly
    that perturbation."""
    held: dict[str, torch.Tensor | None] = {"y": None, "a": None, "delta": None}

    def post_attn(_mod, _args, a):
        if held["delta"] is not None:
            return a + held["delta"].to(a.dtype)
        held["a"] = a.detach()
        return None

    def post_mlp(_mod, _args, y):
        if held["delta"] is not None:
            return held["y"]
        held["y"] = y.detach()
        return None

    handles = [
        attn_out.register_forward_hook(post_attn),
        mlp_out.register_forward_hook(post_mlp),
    ]
    try:
        out = fn()
        a = held["a"]
        if a is None or held["y"] is None:
            raise CalibrationError("the block's forward did not call both output linears")
        g = torch.Generator(device="cpu").manual_seed(0)
        delta = torch.randn(a.shape, generator=g).to(device=a.device, dtype=a.dtype)
        held["delta"] = delta * (a.float().std() + 1e-3)
        moved = fn().to(a.device).float() - out.to(a.device).float()
        delta = held["delta"].float()
    finally:
        for h in handles:
            h.remove()
    return moved.numel() == delta.numel() and float(
        (moved.reshape(delta.shape) - delta).norm()
    ) <= tol * float(delta.norm())
