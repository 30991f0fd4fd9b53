"""Activation-aware SVD (Yuan et al., 2023): column scaling S = diag(s_j^alpha).

s is the mean absolute input activation (``scale="abs"``, default) or its max (``scale="absmax"``).
Decompose W S, then B <- B S^-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from factorlm.calibration.stats import LayerStats
from factorlm.errors import CalibrationError
from factorlm.methods.base import Decomposition, register
from factorlm.methods.config import FactorizeConfig
from factorlm.methods.linalg import ThinSVD, check_finite, split_factors


def column_scaled(W: torch.Tensor, s: torch.Tensor) -> Decomposition:
    """Decompose W diag(s) and fold diag(s)^-1 back into B (shared by asvd and LoRAP attention)."""
    W = W.to(torch.float64)
    s = s.to(torch.float64)
    pos = s[s > 0]
    floor = float(pos.min()) * 1e-3 if pos.numel() else 1.0
    notes = (
        [f"{int((s <= 0).sum())} dead input channels (scale floored)"]
        if bool((s <= 0).any())
        else []
    )
    s = s.clamp_min(floor)
    svd = ThinSVD(W * s[None, :])

    def factors(r: int):
        A, B = split_factors(svd, r)
        return A, B / s[None, :]

    return Decomposition(spectrum=svd.S, factors=factors, notes=notes)


@dataclass(frozen=True, kw_only=True)
class ASVDConfig(FactorizeConfig):
    """``alpha``: exponent of the input-channel scaling; ``scale``: ``"abs"`` (mean |x|) or
    ``"absmax"`` (max |x|)."""

    method: ClassVar[str] = "asvd"
    alpha: float = 0.5
    scale: str = "abs"

    def validate(self) -> None:
        self.check_number("alpha", 0, 2)
        self.check_choice("scale", ("abs", "absmax"))


def decompose_asvd(
    W: torch.Tensor, stats: LayerStats | None, *, alpha: float, scale: str
) -> Decomposition:
    if stats is None:
        raise CalibrationError("asvd needs calibration statistics")
    check_finite(W, "weight")
    s = stats.abs_mean if scale == "abs" else stats.abs_max
    check_finite(s, "activation scale")
    return column_scaled(W, s.pow(alpha))


register(ASVDConfig, decompose=decompose_asvd, needs={"abs", "absmax"}, doc="activation-aware SVD")
