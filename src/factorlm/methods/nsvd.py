"""NSVD (Lu et al., 2025): nested activation-aware decomposition.

Rank k = k1 + k2 with k1 = round(k1_share * k). Stage 1: W1 = trunc_k1(W L) L^-1 (SVD-LLM whitening;
variant "I" Cholesky, "II" eigendecomposition). Stage 2: W2 = trunc_k2(W - W1) by plain SVD of the
residual of the original weight. The factors are [A1 | A2] and [B1 ; B2], one rank-k pair.
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
class NSVDConfig(FactorizeConfig):
    """``variant``: ``"I"`` (Cholesky whitening) or ``"II"`` (eigendecomposition); ``k1_share``:
    share of the rank in the whitened stage."""

    method: ClassVar[str] = "nsvd"
    variant: str = "I"
    k1_share: float = 0.95

    def validate(self) -> None:
        if isinstance(self.variant, str):
            self._set("variant", self.variant.upper())
        self.check_choice("variant", ("I", "II"))
        self.check_number("k1_share", 0, 1, low_open=True)


def decompose_nsvd(
    W: torch.Tensor, stats: LayerStats | None, *, variant: str, k1_share: float
) -> Decomposition:
    if stats is None or stats.gram is None:
        raise CalibrationError("nsvd needs the Gram matrix of the calibration inputs")
    W = W.to(torch.float64)
    check_finite(W, "weight")
    wh = whitening(stats.gram_mean, kind="cholesky" if variant == "I" else "eig")
    svd = ThinSVD(W @ wh.L)

    def factors(k: int):
        k1 = min(k, max(1, round(k1_share * k)))
        A1, B1 = split_factors(svd, k1)
        B1 = wh.right_inverse(B1)
        k2 = k - k1
        if k2 == 0:
            return A1, B1
        svd2 = ThinSVD(W - A1 @ B1)
        A2, B2 = split_factors(svd2, k2)
        return torch.cat([A1, A2], dim=1), torch.cat([B1, B2], dim=0)

    return Decomposition(spectrum=svd.S, factors=factors, notes=list(wh.notes))


register(NSVDConfig, decompose=decompose_nsvd, needs={"gram"}, doc="nested SVD")
