"""``densify``: a compressed model back to the plain dense architecture (exactly the same function).

Low-rank pairs become A @ B; slot linears (attention as modules) their full weight with zeros
outside the kept slots; pruned MLP linears are zero-padded back to the original width (the
removed channels then contribute exactly nothing); unfused experts are fused again.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from factorlm.arch.modules import Conv1D, linear_bias, linear_weight
from factorlm.io import format as fmt
from factorlm.io.structure import skeleton
from factorlm.nn.experts import UnfusedExperts
from factorlm.nn.lowrank import LowRankLinear
from factorlm.nn.slots import SlotLinear


def _row_slots(kept: int, full: int, fused: bool) -> torch.Tensor:
    """Where the kept output rows go: the first ``kept`` rows, or for a fused [gate; up] matrix the
    first kept/2 rows of each half (so the model's split at full/2 still separates gate from up)."""
    if not fused or kept == full:
        return torch.arange(kept)
    half, w = full // 2, kept // 2
    return torch.cat([torch.arange(w), half + torch.arange(w)])


def _fused_gate_up_names(model: nn.Module) -> set[str]:
    from factorlm.arch.match import match
    from factorlm.arch.modules import get_blocks, get_spec

    spec = get_spec(model)
    pats = [p for u in spec.mlp_units if u.fused_gate_up for p in u.inputs]
    out = set()
    for i, block in enumerate(get_blocks(model, spec)):
        for rel, _ in block.named_modules():
            if any(match(p, rel) for p in pats):
                out.add(f"{spec.blocks}.{i}.{rel}")
    return out


def _dense_linear_state(
    mod: nn.Module, ref: nn.Module, prefix: str, fused: bool = False
) -> dict[str, torch.Tensor]:
    W = linear_weight(mod).detach()
    bias = linear_bias(mod)
    is_conv = isinstance(ref, Conv1D)
    out_f, in_f = (
        (ref.weight.shape[1], ref.weight.shape[0])
        if is_conv
        else (ref.out_features, ref.in_features)
    )
    full = torch.zeros(out_f, in_f, dtype=W.dtype)
    rows = _row_slots(W.shape[0], out_f, fused)
    full[rows, : W.shape[1]] = W
    state = {f"{prefix}weight": full.t().contiguous() if is_conv else full}
    if getattr(ref, "bias", None) is not None:
        b = torch.zeros(out_f, dtype=W.dtype)
        if bias is not None:
            b[_row_slots(bias.shape[0], out_f, fused)] = bias.detach()
        state[f"{prefix}bias"] = b
    return state


def densify(model: nn.Module, config=None) -> nn.Module:
    """A new model of the original class with dense weights computing the same function.

    ``config`` (default: the model's own) is the target architecture: a config whose MLP width is
    the pruned width keeps pruned linears at their size instead of zero-padding them back.
    """
    target_config = model.config if config is None else config
    ref = skeleton(target_config, type(model))
    state: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    fused_names = _fused_gate_up_names(model)
    for name, mod in model.named_modules():
        if isinstance(mod, UnfusedExperts) and not _under(name, handled):
            fused = ref.get_submodule(name)
            inter = fused.gate_up_proj.shape[1] // 2
            gu = torch.zeros(fused.gate_up_proj.shape, dtype=torch.float32)
            dn = torch.zeros(fused.down_proj.shape, dtype=torch.float32)
            for e, ex in enumerate(mod):
                g, u, d = (
                    linear_weight(ex.gate_proj).detach(),
                    linear_weight(ex.up_proj).detach(),
                    linear_weight(ex.down_proj).detach(),
                )
                w = g.shape[0]
                gu[e, :w], gu[e, inter : inter + w], dn[e, :, :w] = g, u, d
            state[f"{name}.gate_up_proj"], state[f"{name}.down_proj"] = gu, dn
            handled.add(name + ".")
        elif isinstance(mod, (LowRankLinear, SlotLinear, nn.Linear)) and not _under(name, handled):
            try:
                r = ref.get_submodule(name)
            except AttributeError:
                continue
            if (
                isinstance(mod, (LowRankLinear, SlotLinear))
                or type(r) is not nn.Linear
                or r.weight.shape != mod.weight.shape
            ):
                state.update(_dense_linear_state(mod, r, name + ".", fused=name in fused_names))
                handled.add(name + ".")
    for k, v in model.state_dict().items():
        if not _under(k, handled):
            state[k] = v
    dtype = next(model.parameters()).dtype
    config = copy.deepcopy(target_config)
    fmt.strip(config)
    dense = type(model)(config).to(dtype)
    missing, unexpected = dense.load_state_dict(
        {k: v.to(dtype) for k, v in state.items()}, strict=False
    )
    tied = (
        {k for k in missing if k.endswith("lm_head.weight")}
        if getattr(config, "tie_word_embeddings", False)
        else set()
    )
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"densify: state mismatch, missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if tied:
        dense.tie_weights()
    return dense.eval()


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)
