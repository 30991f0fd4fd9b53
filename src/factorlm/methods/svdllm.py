"""SVD-LLM (Wang et al., ICLR 2025): truncation-aware data whitening.

L L^T = G (Gram matrix of the calibration inputs). Decompose W L = U S V^T and keep rank r:
A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T L^-1. Truncating singular value i costs exactly S_i^2 of
calibration output error ||W X - A B X||_F^2 (with G the *mean* Gram, per token), so the rank-r
result is optimal on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from factorlm.calibration.stats import LayerStats
from factorlm.errors import CalibrationError
from factorlm.methods.base import Decomposition, register
from factorlm.methods.config import FactorizeConfig
from factorlm.methods.linalg import ThinSVD, check_finite, split_factors, whitening


@dataclass(frozen=True, kw_only=True)
class SVDLLMConfig(FactorizeConfig):
    """``whiten``: factor of the Gram matrix, ``"cholesky"`` (the paper) or ``"eig"``."""

    method: ClassVar[str] = "svd-llm"
    whiten: str = "cholesky"

    def validate(self) -> None:
        self.check_choice("whiten", ("cholesky", "eig"))


def decompose_svdllm(W: torch.Tensor, stats: LayerStats | None, *, whiten: str) -> Decomposition:
    if stats is None or stats.gram is None:
        raise CalibrationError("svd-llm needs the Gram matrix of the calibration inputs")
    W = W.to(torch.float64)
    check_finite(W, "weight")
    wh = whitening(stats.gram_mean, kind=whiten)
    svd = ThinSVD(W @ wh.L)

    def factors(r: int):
        A, B = split_factors(svd, r)
        return A, wh.right_inverse(B)

    return Decomposition(spectrum=svd.S, factors=factors, notes=list(wh.notes))


register(SVDLLMConfig, decompose=decompose_svdllm, needs={"gram"}, doc="whitened SVD")
