"""Fisher-weighted SVD (Hsu et al., 2022): row weights d_i = sqrt(sum_j F_ij).

Decompose diag(d) W, then un-scale A by diag(d)^-1. F is the (empirical) Fisher information of the
LM loss w.r.t. W: the sum over calibration batches of the squared gradient.
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


def decompose_fwsvd(W: torch.Tensor, stats: LayerStats | None, eps: float = 1e-12) -> Decomposition:
    if stats is None or stats.fisher_rows is None:
        raise CalibrationError("fwsvd needs Fisher information (gradients on calibration data)")
    W = W.to(torch.float64)
    check_finite(W, "weight")
    F = stats.fisher_rows.to(torch.float64)
    check_finite(F, "Fisher information")
    d = F.clamp_min(0).sqrt()
    d = torch.where(d > 0, d, torch.full_like(d, max(float(d.max()) * eps, eps)))
    svd = ThinSVD(d[:, None] * W)

    def factors(r: int):
        A, B = split_factors(svd, r)
        return A / d[:, None], B

    return Decomposition(spectrum=svd.S, factors=factors)


@dataclass(frozen=True, kw_only=True)
class FWSVDConfig(FactorizeConfig):
    """``fisher_batches``: calibration batches whose gradients estimate the row importances."""

    method: ClassVar[str] = "fwsvd"
    pipeline_options: ClassVar[tuple[str, ...]] = ("min_rank", "fisher_batches")
    fisher_batches: int | None = 4  # None: every batch

    def validate(self) -> None:
        self.check_int("fisher_batches", none=True)


register(FWSVDConfig, decompose=decompose_fwsvd, needs={"fisher"}, doc="Fisher-weighted SVD")
