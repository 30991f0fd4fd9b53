"""Plain truncated SVD: W ~ U_r S_r V_r^T (Eckart-Young optimal in the Frobenius norm of W)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from factorlm.calibration.stats import LayerStats
from factorlm.methods.base import Decomposition, register
from factorlm.methods.config import FactorizeConfig
from factorlm.methods.linalg import ThinSVD, check_finite, split_factors


def decompose_svd(W: torch.Tensor, stats: LayerStats | None = None) -> Decomposition:
    check_finite(W, "weight")
    svd = ThinSVD(W)
    return Decomposition(spectrum=svd.S, factors=lambda r: split_factors(svd, r))


@dataclass(frozen=True, kw_only=True)
class SVDConfig(FactorizeConfig):
    """Plain truncated SVD: no options."""

    method: ClassVar[str] = "svd"


register(SVDConfig, decompose=decompose_svd, doc="truncated SVD of W")
