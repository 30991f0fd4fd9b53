"""NSVD (Lu et al., 2025): nested activation-aware decomposition.

Rank k = k1 + k2 with k1 = round(k1_share * k). Stage 1: W1 = trunc_k1(W L) L^-1 (SVD-LLM whitening;
variant "I" Cholesky, "II" eigendecomposition). Stage 2: W2 = trunc_k2(W - W1) by plain SVD of the
residual of the original weight. The factors are [A1 | A2] and [B1 ; B2], one rank-k pair.
"""

from __future__ import annotations

import torch

from factorlm.calibration.stats import LayerStats
from factorlm.errors import CalibrationError, ConfigError
from factorlm.methods.base import Decomposition, MethodSpec, register
from factorlm.methods.linalg import ThinSVD, check_finite, split_factors, whitening


def decompose_nsvd(
    W: torch.Tensor, stats: LayerStats | None, variant: str = "I", k1_share: float = 0.95
) -> Decomposition:
    if stats is None or stats.gram is None:
        raise CalibrationError("nsvd needs the Gram matrix of the calibration inputs")
    variant = str(variant).upper()
    if variant not in ("I", "II"):
        raise ConfigError(f"nsvd variant must be 'I' or 'II', got {variant!r}")
    if not 0 < k1_share <= 1:
        raise ConfigError(f"nsvd k1_share must be in (0, 1], got {k1_share}")
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


register(
    MethodSpec(
        "nsvd",
        decompose_nsvd,
        needs=frozenset({"gram"}),
        options=("variant", "k1_share"),
        doc="nested SVD",
    )
)
