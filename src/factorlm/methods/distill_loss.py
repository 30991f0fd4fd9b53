"""Pure loss functions of low-rank feature distillation (Lillama, Sy et al. 2024).

Per token, with ``a`` the student's block output and ``y`` the teacher's (vectors of size d)::

    L(a, y) = mean_d |a - y| - log sigmoid(cos(a, y))

averaged over the (non-padding) tokens. The L1 term matches magnitudes, the cosine term
directions; the cosine of a zero vector is taken as 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cosine", "feature_loss", "token_loss"]


def cosine(a: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity along the last dimension.

    Computed as ``<a, y> / sqrt(max(<a, a> <y, y>, eps^2))`` so that ``cosine(a, a)`` is exactly 1
    (the square root of a correctly rounded square is exact), which a normalise-then-dot formula
    does not give. The clamp sits inside the square root: a zero vector has cosine 0 and finite
    gradients.
    """
    dot = (a * y).sum(-1)
    den = ((a * a).sum(-1) * (y * y).sum(-1)).clamp_min(eps * eps).sqrt()
    return dot / den


def token_loss(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean_d |a - y| - log sigmoid(cos(a, y))`` for every token: shape ``a.shape[:-1]``.

    ``a`` (the student) and ``y`` (the target) must have the same shape; both are promoted to at
    least float32 so that a bf16 student still gets an accurate loss.
    """
    if a.shape != y.shape:
        raise ValueError(f"student output {tuple(a.shape)} and target {tuple(y.shape)} differ")
    dtype = torch.promote_types(torch.promote_types(a.dtype, y.dtype), torch.float32)
    a, y = a.to(dtype), y.to(dtype)
    return (a - y).abs().mean(-1) - F.logsigmoid(cosine(a, y))


def feature_loss(
    a: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of :func:`token_loss` over tokens; ``mask`` (``a.shape[:-1]``, nonzero = keep) drops
    padding tokens. A mask that keeps nothing gives a zero loss (still differentiable).

    The average over tokens is accumulated in float64 (a vector of one value per token: cheap), so
    it is exact for equal per-token losses: ``feature_loss(a, a) == -log sigmoid(1)`` exactly.
    """
    per_token = token_loss(a, y)
    dtype = per_token.dtype
    per_token = per_token.double()
    if mask is None:
        return per_token.mean().to(dtype)
    if mask.shape != per_token.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(per_token.shape)}")
    mask = mask.to(device=per_token.device, dtype=per_token.dtype)
    return ((per_token * mask).sum() / mask.sum().clamp_min(1.0)).to(dtype)
