"""The loss's metric for ``modular``'s output errors (``loss_metric``): pure float64 math.

To second order, an error Δy of a linear's output raises the LM loss by about ½ Δy^T F Δy, with
F = Σ_t g_t g_t^T the Gram matrix of the loss's gradient g at that output over the calibration
tokens (:func:`factorlm.calibration.sensitivity.block_sensitivities` with ``out_grams``). The
fits measure their errors in this metric instead of the Euclidean one, so that the directions
of the residual stream the loss reads are kept first. F comes from a few calibration sequences;
it can be shrunk towards the identity (at its own scale), M = (1 - s) F / mean(diag F) + s I
(``loss_metric_shrink`` s; eigenvalues below 1e-8 of the largest are floored there, in
:func:`factorlm.methods.linalg.metric_roots`).

For the MLP's output linear, M weighs the channel selection's refit error: the greedy elimination
(or the energy score) runs on M^1/2 W. The least-squares refit itself does not depend on the
output metric (each output row is fitted on its own).

v_proj's error reaches the loss through the attention and o_proj: query head h mixes the values
of its key/value head g over the tokens, and o_proj's columns W_o,h map the result into the
residual stream. Taking the token mixing as the identity and the heads' errors as independent,
the metric of v's output, per key/value head, is the block Σ_(h reads g) W_o,h^T M_o W_o,h.
"""

from __future__ import annotations

import torch

from factorlm.arch.heads import HeadLayout
from factorlm.errors import NumericalError


def shrunk_metric(gram: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 - s) F / mean(diag F) + s I for the gradient Gram ``gram`` = F (float64)."""
    F = gram.to(torch.float64)
    F = 0.5 * (F + F.T)
    scale = float(F.diagonal().mean())
    eye = torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
    if not scale > 0:
        raise NumericalError("the loss's gradient Gram is zero")
    return (1.0 - shrink) * F / scale + shrink * eye


def value_metric(Wo: torch.Tensor, metric_o: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    """The metric of v_proj's output (kv_heads x head_dim x head_dim blocks) from o_proj's weight
    ``Wo`` (hidden x heads·head_dim) and the metric ``metric_o`` of o_proj's output."""
    hd, kv, g = layout.head_dim, layout.kv_heads, layout.group
    W = Wo.to(torch.float64)
    per_head = W.reshape(W.shape[0], layout.heads, hd).permute(1, 0, 2)  # heads x hidden x hd
    M = metric_o.to(device=W.device, dtype=torch.float64)
    blocks = torch.einsum("hmd,mn,hne->hde", per_head, M, per_head)
    return blocks.reshape(kv, g, hd, hd).sum(1)
