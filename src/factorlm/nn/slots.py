"""SlotLinear: a linear that keeps a subset of a wider layer's output rows or input columns.

Attention compressed as modules (``modular:attention=modules``) removes head dimensions: v_proj
keeps ``r`` of each value head's rows, o_proj the matching input columns, q_proj / k_proj the
rows of the kept rotary pairs. transformers' attention views q/k/v with one ``head_dim``, so the
layer still *presents* its full width: the kept outputs are written into their slots of a zero
tensor (``out_slots``), the kept inputs are read from theirs (``in_slots``). Only the kept weights
are stored; the removed slots carry exact zeros, which the attention passes on unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SlotLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` restricted to ``out_slots`` rows / ``in_slots``
    columns (either or both). State dict: ``weight`` (kept rows x kept columns), optional
    ``bias`` (kept rows), and the integer buffers ``out_slots`` / ``in_slots``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_kept: int | None = None,
        out_kept: int | None = None,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_kept is None and out_kept is None:
            raise ValueError("a SlotLinear keeps a subset of its rows, its columns or both")
        self.in_features, self.out_features = in_features, out_features
        rows = out_features if out_kept is None else out_kept
        cols = in_features if in_kept is None else in_kept
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(rows, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        for name, kept in (("in_slots", in_kept), ("out_slots", out_kept)):
            buf = None if kept is None else torch.arange(kept, device=device)
            self.register_buffer(name, buf)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        in_features: int,
        out_features: int,
        in_slots: torch.Tensor | None = None,
        out_slots: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        like: torch.Tensor | None = None,
    ) -> SlotLinear:
        """Build from the kept weight (kept rows x kept columns); dtype/device follow ``like``."""
        dtype = like.dtype if like is not None else weight.dtype
        device = like.device if like is not None else weight.device
        mod = cls(
            in_features,
            out_features,
            None if in_slots is None else len(in_slots),
            None if out_slots is None else len(out_slots),
            bias=bias is not None,
            dtype=dtype,
            device=device,
        )
        with torch.no_grad():
            mod.weight.copy_(weight.to(dtype=dtype, device=device))
            if bias is not None:
                mod.bias.copy_(bias.to(dtype=dtype, device=device))
            for name, slots in (("in_slots", in_slots), ("out_slots", out_slots)):
                if slots is not None:
                    getattr(mod, name).copy_(slots.to(device=device, dtype=torch.long))
        mod.check()
        return mod

    def check(self) -> None:
        """Slots strictly increasing and inside the full width (what the save format relies on)."""
        for name, full in (("in_slots", self.in_features), ("out_slots", self.out_features)):
            s = getattr(self, name)
            if s is None or s.is_meta or s.numel() == 0:
                continue
            if int(s.min()) < 0 or int(s.max()) >= full or not bool((s[1:] > s[:-1]).all()):
                raise ValueError(f"{name} must be increasing positions below {full}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_slots is not None:
            x = x.index_select(-1, self.in_slots)
        y = F.linear(x, self.weight, self.bias)
        if self.out_slots is None:
            return y
        out = y.new_zeros(*y.shape[:-1], self.out_features)
        return out.index_copy_(-1, self.out_slots, y)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent full weight (out x in), zeros outside the slots."""
        W = self.weight
        full = W.new_zeros(self.out_features, self.in_features)
        rows = self.out_slots if self.out_slots is not None else torch.arange(self.out_features)
        cols = self.in_slots if self.in_slots is not None else torch.arange(self.in_features)
        full[rows.unsqueeze(1).to(W.device), cols.unsqueeze(0).to(W.device)] = W
        return full

    def dense_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        if self.out_slots is None:
            return self.bias
        return self.bias.new_zeros(self.out_features).index_copy(0, self.out_slots, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kept={tuple(self.weight.shape)}, bias={self.bias is not None}"
        )
