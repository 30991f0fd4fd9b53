"""Plain truncated SVD: W ~ U_r S_r V_r^T (Eckart-Young optimal in the Frobenius norm of W)."""

from __future__ import annotations

import torch

from factorlm.calibration.stats import LayerStats
from factorlm.methods.base import Decomposition, MethodSpec, register
from factorlm.methods.linalg import ThinSVD, check_finite, split_factors


def decompose_svd(W: torch.Tensor, stats: LayerStats | None = None) -> Decomposition:
    check_finite(W, "weight")
    svd = ThinSVD(W)
    return Decomposition(spectrum=svd.S, factors=lambda r: split_factors(svd, r))


register(MethodSpec("svd", decompose_svd, needs=frozenset(), doc="truncated SVD of W"))
