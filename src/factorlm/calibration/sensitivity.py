"""How much the LM loss cares about each block's output: one blockwise forward + backward.

For calibration sequences, the dense model runs block by block (inputs kept on the offload device,
as in the pipeline); the LM loss is computed from the last block's output (final norm + LM head);
then the gradient goes back block by block, each block recomputed from its stored input with
autograd (one block on the compute device at a time, parameters frozen). Per block the probe sums

    κ_i = Σ_t |∂L/∂h_i,t|^2 |Δ_i,t|^2 / d      (Δ_i = h_i - h_(i-1), the block's residual update)

which is what :func:`factorlm.rank.loss_aware.loss_aware_ratios` needs: to second order, a
relative error ε of the block's update raises the loss by about ½ ε² κ_i (ZS-SVD / SVD-LLM V2 use
the same first-order information per singular component).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from factorlm.arch.modules import get_blocks, get_submodule
from factorlm.arch.registry import ArchSpec
from factorlm.calibration.pipeline import capture_block_inputs
from factorlm.errors import CalibrationError
from factorlm.utils import to_device

log = logging.getLogger(__name__)


def _out(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def block_sensitivities(
    model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor], device, offload="cpu"
) -> list[float]:
    """κ_i per block (see the module docstring), summed over the tokens of ``batches``."""
    if spec.final_norm is None:
        raise CalibrationError("loss-aware allocation needs the architecture's final norm")
    head = model.get_output_embeddings()
    norm = get_submodule(model, spec.final_norm)
    blocks = get_blocks(model, spec)
    streams = capture_block_inputs(model, spec, batches, device, offload)
    req = {p: p.requires_grad for p in model.parameters()}
    for p in req:
        p.requires_grad_(False)
    kappa = [0.0] * len(blocks)
    try:
        for j, ids in enumerate(batches):
            h, kw = streams.student[j], streams.kwargs[j]
            inputs = []
            with torch.no_grad():  # forward, keeping every block's input
                for block in blocks:
                    inputs.append(h)
                    block.to(device)
                    h = _out(block(h.to(device), **to_device(kw, device))).to(offload)
                    block.to(offload)
            norm.to(device)
            head.to(device)
            x = h.to(device).requires_grad_(True)
            logits = head(norm(x)).float()
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1).to(device),
                reduction="sum",
            )
            (grad,) = torch.autograd.grad(loss, x)
            norm.to(offload)
            head.to(offload)
            out = h
            for i in range(len(blocks) - 1, -1, -1):
                block = blocks[i].to(device)
                inp = inputs[i].to(device).requires_grad_(True)
                y = _out(block(inp, **to_device(kw, device)))
                delta = (out.to(device) - inp).detach()
                g2 = grad.float().square().sum(-1)
                kappa[i] += float((g2 * delta.float().square().sum(-1)).sum()) / delta.shape[-1]
                (grad,) = torch.autograd.grad(y, inp, grad_outputs=grad)
                block.to(offload)
                out = inputs[i]
    finally:
        for p, r in req.items():
            p.requires_grad_(r)
    if not all(torch.isfinite(torch.tensor(kappa))):
        raise CalibrationError("block sensitivities are not finite (NaN/Inf in the backward pass)")
    return kappa
