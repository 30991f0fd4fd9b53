"""How much the LM loss cares about each block's output: one blockwise forward + backward.

For calibration sequences, the dense model runs block by block (inputs kept on the offload device,
as in the pipeline); the LM loss is computed from the last block's output (final norm + LM head);
then the gradient goes back block by block, each block recomputed from its stored input with
autograd (one block on the compute device at a time, parameters frozen). Per block the probe sums

    κ_i = Σ_t |∂L/∂h_i,t|^2 |Δ_i,t|^2 / d      (Δ_i = h_i - h_(i-1), the block's residual update)

which is what :func:`factorlm.rank.loss_aware.loss_aware_ratios` needs: to second order, a
relative error ε of the block's update raises the loss by about ½ ε² κ_i (ZS-SVD / SVD-LLM V2 use
the same first-order information per singular component).

The same probe splits a block into its sub-layers (attention, MLP): for the output linears of a
sub-layer (:func:`sublayer_outputs`: the ``o`` role, the MLP units' outputs), whose outputs y are
what the sub-layer adds to the residual stream,

    κ_i,s = Σ_t |∂L/∂y_t|^2 |y_t|^2 / d_y      (summed over the sub-layer's output linears)

so a relative error ε of the sub-layer's output costs about ½ ε² κ_i,s.

With ``out_grams``, the probe also sums, for each of those output linears, the Gram matrix of the
loss's gradient at its output over the same tokens, F = Σ_t (∂L/∂y_t)(∂L/∂y_t)^T (d_y x d_y,
float32): to second order the loss rises by ½ Δy^T F Δy for an output error Δy, so F is the metric
in which a fit of that linear should measure its error (``modular``'s ``loss_metric``).

Tokens whose block update is massive (|Δ_i,t|² above ``outlier`` times the median over the batch's
tokens: the first position's attention sink, delimiter tokens) are left out of both sums. The
least-squares fits are dominated by such tokens and reproduce their updates almost exactly, so
their relative error is far below the block's average, not ε; counted, one such token per sequence
can make up 99 % of a block's κ (SmolLM2's block 11) and strip that block of its budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from factorlm.arch.match import match
from factorlm.arch.modules import block_targets, get_blocks, get_submodule
from factorlm.arch.registry import ArchSpec
from factorlm.calibration.pipeline import capture_block_inputs
from factorlm.calibration.stats import Hooks
from factorlm.errors import CalibrationError
from factorlm.utils import to_device

log = logging.getLogger(__name__)


def _out(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def sublayer_outputs(spec: ArchSpec) -> dict[str, tuple[str, ...]]:
    """Patterns of the linears whose outputs a sub-layer adds to the residual stream, per group.

    Attention: the ``o`` role; MLP: the units' output linears. A group without such linears (e.g.
    a state-space block) is left out: it is not split from the rest of its block.
    """
    out: dict[str, tuple[str, ...]] = {}
    o = spec.roles.get("o")
    if o is not None and spec.group_of(o) == "attn":
        out["attn"] = (o,)
    downs = tuple(u.output for u in spec.mlp_units if spec.group_of(u.output) == "mlp")
    if downs:
        out["mlp"] = downs
    return out


@dataclass
class Sensitivities:
    """κ per block, and per sub-layer where the block's sub-layers were all found (else {})."""

    block: list[float]
    sublayer: list[dict[str, float]] = field(default_factory=list)
    # per block: an output linear's relative name -> F, the Gram of the loss's gradient at its
    # output (with ``out_grams``; linears whose output is not one row per token are left out)
    out_grams: list[dict[str, torch.Tensor]] = field(default_factory=list)


class _OutputTap(Hooks):
    """Forward hooks keeping the outputs (in the autograd graph) of some linears of one block."""

    def __init__(self, mods: dict[str, list[nn.Module]]) -> None:
        self.mods = mods
        self.outputs: dict[str, list[torch.Tensor]] = {g: [] for g in mods}

    def _register(self) -> list:
        return [
            m.register_forward_hook(lambda _m, _a, y, g=g: self.outputs[g].append(y))
            for g, mods in self.mods.items()
            for m in mods
        ]


def _sublayer_modules(block: nn.Module, spec: ArchSpec) -> dict[tuple[str, str], list[nn.Module]]:
    """(sub-layer, relative name) -> [the output linear] of each sub-layer's output linears."""
    pats = sublayer_outputs(spec)
    targets = block_targets(block, spec)
    mods = {
        g: [(r, m) for r, m in targets.items() if any(match(p, r) for p in ps)]
        for g, ps in pats.items()
    }
    if len(mods) < 2 or not all(mods.values()):
        return {}  # nothing to split
    return {(g, r): [m] for g, rms in mods.items() for r, m in rms}


def _token_mask(keep: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """``keep`` laid out as the rows of a linear's output ``y`` (OPT's MLP runs on the flattened
    tokens); None where ``y`` is not one row per token (a routed expert's tokens)."""
    if y.shape[:-1] == keep.shape:
        return keep
    if y.shape[:-1].numel() == keep.numel():
        return keep.reshape(y.shape[:-1])
    return None


def _add_gram(grams: dict[str, torch.Tensor], rel: str, grad: torch.Tensor, keep: torch.Tensor):
    """grams[rel] += Σ_t keep_t g_t g_t^T (float32, on the host); ``keep`` is laid out as the rows
    of ``grad`` (:func:`_token_mask`)."""
    g = (grad.float() * keep.unsqueeze(-1)).reshape(-1, grad.shape[-1])
    gram = (g.T @ g).cpu()
    if rel in grams:
        grams[rel] += gram
    else:
        grams[rel] = gram


def _ordinary(delta2: torch.Tensor, outlier: float | None) -> torch.Tensor:
    """1 for the tokens whose update energy ``delta2`` is within ``outlier`` times the median, 0
    for the massive ones (every token when ``outlier`` is None or 0)."""
    if not outlier:
        return torch.ones_like(delta2)
    return (delta2 <= outlier * delta2.median()).to(delta2.dtype)


def block_sensitivities(
    model: nn.Module,
    spec: ArchSpec,
    batches: list[torch.Tensor],
    device,
    offload="cpu",
    outlier: float | None = None,
    out_grams: bool = False,
) -> Sensitivities:
    """κ_i per block and per sub-layer (see the module docstring), summed over the tokens of
    ``batches`` (without the massive-update tokens when ``outlier`` is set), and with
    ``out_grams`` the gradient Grams of the sub-layers' output linears."""
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
    subs = [_sublayer_modules(b, spec) for b in blocks]
    kappa_sub = [{g: 0.0 for g, _ in m} for m in subs]
    grams: list[dict[str, torch.Tensor]] = [{} for _ in blocks]
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
                with _OutputTap(subs[i]) as tap:
                    y = _out(block(inp, **to_device(kw, device)))
                delta = (out.to(device) - inp).detach()
                g2 = grad.float().square().sum(-1)
                d2 = delta.float().square().sum(-1)
                keep = _ordinary(d2, outlier)
                kappa[i] += float((keep * g2 * d2).sum()) / delta.shape[-1]
                ys = [(key, t) for key, ts in tap.outputs.items() for t in ts]
                grads = torch.autograd.grad(
                    y, [inp, *(t for _, t in ys)], grad_outputs=grad, allow_unused=True
                )
                grad = grads[0]
                for ((g, rel), t), gt in zip(ys, grads[1:], strict=True):
                    if gt is not None:
                        prod = gt.float().square().sum(-1) * t.detach().float().square().sum(-1)
                        # a routed expert's rows (not one per token): all counted, no Gram
                        mask = _token_mask(keep, t)
                        kept = prod if mask is None else mask * prod
                        kappa_sub[i][g] += float(kept.sum()) / t.shape[-1]
                        if out_grams and mask is not None:
                            _add_gram(grams[i], rel, gt, mask)
                block.to(offload)
                out = inputs[i]
    finally:
        for p, r in req.items():
            p.requires_grad_(r)
    flat = kappa + [k for d in kappa_sub for k in d.values()]
    if not all(torch.isfinite(torch.tensor(flat))):
        raise CalibrationError("block sensitivities are not finite (NaN/Inf in the backward pass)")
    if out_grams:
        for gram in (g for d in grams for g in d.values()):
            if not bool(torch.isfinite(gram).all()):
                raise CalibrationError("an output-gradient Gram is not finite (NaN/Inf)")
    return Sensitivities(kappa, kappa_sub, grams if out_grams else [])
