"""Loss-aware per-block ratios (pure): spend the budget where the calibration loss rises least.

A block's compression perturbs its residual update Δ_i by a relative error ε_i; to second order the
LM loss rises by about ½ ε_i² κ_i with κ_i = Σ_t |g_i,t|² |Δ_i,t|² / d (g_i,t = ∂L/∂h_i at token t,
see :mod:`factorlm.calibration.sensitivity`). With ε_i² growing like ρ_i^p in the block's ratio,
minimising Σ κ_i ρ_i^p under the parameter budget Σ P_i ρ_i = ρ Σ P_i gives
ρ_i ∝ κ_i^(-1/(p-1)); ``gamma`` = 1/(p-1) sets how strongly the ratios follow the sensitivities
(0: uniform). Ratios are clipped to [``low`` ρ, ``high``] and rescaled to meet the budget exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from factorlm.errors import ConfigError


def loss_aware_ratios(
    kappa: Sequence[float],
    params: Sequence[int],
    ratio: float,
    gamma: float = 0.5,
    low: float = 0.25,
    high: float = 0.9,
) -> list[float]:
    """Per-block ratios with Σ params_i ρ_i = ratio Σ params_i (bisection on a common scale)."""
    if len(kappa) != len(params) or not kappa:
        raise ConfigError("loss-aware allocation needs one sensitivity and one size per block")
    if not all(math.isfinite(k) and k >= 0 for k in kappa):
        raise ConfigError(f"block sensitivities must be finite and >= 0, got {list(kappa)}")
    if not 0 < ratio < high:
        raise ConfigError(f"ratio {ratio} is outside (0, {high}) for the loss-aware allocation")
    pos = [k for k in kappa if k > 0]
    ref = math.exp(sum(math.log(k) for k in pos) / len(pos)) if pos else 1.0
    floor = ref * 1e-6
    w = [(max(k, floor) / ref) ** (-gamma) for k in kappa]
    lo_r, total = low * ratio, float(sum(params))

    def spent(scale: float) -> float:
        return sum(p * min(high, max(lo_r, scale * wi)) for p, wi in zip(params, w, strict=True))

    a, b = 0.0, 1.0
    while spent(b) < ratio * total and b < 1e12:
        b *= 2
    for _ in range(100):
        mid = 0.5 * (a + b)
        if spent(mid) < ratio * total:
            a = mid
        else:
            b = mid
    return [min(high, max(lo_r, b * wi)) for wi in w]
