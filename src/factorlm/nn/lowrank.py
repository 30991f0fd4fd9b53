"""LowRankLinear: y = A (B x) + bias, with A (out x r) and B (r x in) stored as two plain linears."""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """A rank-``r`` replacement for ``nn.Linear(in_features, out_features)``.

    The factors are the weights of two bias-free ``nn.Linear`` modules, ``B`` (``in -> r``) and
    ``A`` (``r -> out``), so the state dict holds ``<name>.B.weight`` (r x in),
    ``<name>.A.weight`` (out x r) and optionally ``<name>.bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.B = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.A = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def rank(self) -> int:
        return self.B.out_features

    @classmethod
    def from_factors(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None = None,
        like: torch.Tensor | None = None,
    ) -> LowRankLinear:
        """Build from factors ``A`` (out x r), ``B`` (r x in); dtype/device follow ``like`` if given."""
        dtype = like.dtype if like is not None else A.dtype
        device = like.device if like is not None else A.device
        mod = cls(
            B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, dtype=dtype, device=device
        )
        with torch.no_grad():
            mod.A.weight.copy_(A.to(dtype=dtype, device=device))
            mod.B.weight.copy_(B.to(dtype=dtype, device=device))
            if bias is not None:
                mod.bias.copy_(bias.to(dtype=dtype, device=device))
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.A(self.B(x))
        if self.bias is not None:
            y = y + self.bias
        return y

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight A @ B (out x in)."""
        return self.A.weight @ self.B.weight

    @property
    def weight(self) -> torch.Tensor:
        """A @ B, differentiable: for parent modules that read ``.weight`` directly (Mamba's dt_proj)."""
        return self.dense_weight()

    def num_parameters(self) -> int:
        n = self.rank * (self.in_features + self.out_features)
        return n + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
