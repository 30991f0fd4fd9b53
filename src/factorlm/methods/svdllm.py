"""SVD-LLM (Wang et al., ICLR 2025): truncation-aware data whitening.

L L^T = G (Gram matrix of the calibration inputs). Decompose W L = U S V^T and keep rank r:
A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T L^-1. Truncating singular value i costs exactly S_i^2 of
calibration output error ||W X - A B X||_F^2 (with G the *mean* Gram, per token), so the rank-r
result is optimal on the calibration data.
"""

from __future__ import annotations

import torch

from factorlm.calibration.stats import LayerStats
from factorlm.errors import CalibrationError, ConfigError
from factorlm.methods.base import Decomposition, MethodSpec, register
from factorlm.methods.linalg import ThinSVD, check_finite, split_factors, whitening


def decompose_svdllm(
    W: torch.Tensor, stats: LayerStats | None, whiten: str = "cholesky"
) -> Decomposition:
    if stats is None or stats.gram is None:
        raise CalibrationError("svd-llm needs the Gram matrix of the calibration inputs")
    if whiten not in ("cholesky", "eig"):
        raise ConfigError(f"whiten must be 'cholesky' or 'eig', got {whiten!r}")
    W = W.to(torch.float64)
    check_finite(W, "weight")
    wh = whitening(stats.gram_mean, kind=whiten)
    svd = ThinSVD(W @ wh.L)

    def factors(r: int):
        A, B = split_factors(svd, r)
        return A, wh.right_inverse(B)

    return Decomposition(spectrum=svd.S, factors=factors, notes=list(wh.notes))


register(
    MethodSpec(
        "svd-llm",
        decompose_svdllm,
        needs=frozenset({"gram"}),
        options=("whiten",),
        doc="whitened SVD",
    )
)
