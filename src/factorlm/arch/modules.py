"""Finding blocks and target linears of a model through its :class:`ArchSpec`."""

from __future__ import annotations

import logging

import torch
from torch import nn

# transformers' GPT-2 style Conv1D: y = x @ W + b with W stored (in x out)
from transformers.pytorch_utils import Conv1D

from factorlm.arch.match import match
from factorlm.arch.registry import ARCHITECTURES, ArchSpec, supported_model_types
from factorlm.nn.experts import UnfusedExperts, is_fused_experts
from factorlm.nn.lowrank import LowRankLinear
from factorlm.nn.quantized import QuantLinear
from factorlm.nn.slots import SlotLinear

log = logging.getLogger(__name__)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LowRankLinear, QuantLinear, Conv1D, SlotLinear))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out x in), whatever the storage convention (Conv1D is transposed)."""
    if isinstance(module, (LowRankLinear, SlotLinear)):
        return module.dense_weight()
    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias over the full output width (a slot linear's kept biases in their slots)."""
    if isinstance(module, SlotLinear):
        return module.dense_bias()
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear-like module."""
    if isinstance(module, (LowRankLinear, SlotLinear)):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = get_submodule(root, parent_path)
    if isinstance(parent, nn.ModuleList) and leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """``set_submodule``, then hand back the clean memory-mapped pages of the weights it dropped
    (see :mod:`factorlm.pages`): without that, compressing a model loaded from safetensors keeps
    the dense original resident beside its factors. Pages written to since loading, and weights
    another tensor still shares, are kept."""
    from factorlm.pages import release_dropped_pages

    old = get_submodule(root, path)
    set_submodule(root, path, new)
    if old is new:
        return
    kept = {t.untyped_storage().data_ptr() for t in new.parameters()}
    release_dropped_pages(
        [p for p in old.parameters() if p.untyped_storage().data_ptr() not in kept]
    )


def _fallback_spec(model: nn.Module) -> ArchSpec:
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(
        model.config, "n_layer", None
    )
    best = None
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.ModuleList)
            and len(mod) > 0
            and (n_layers is None or len(mod) == n_layers)
        ):
            if best is None or len(list(mod.parameters())) > len(list(best[1].parameters())):
                best = (name, mod)
    if best is None:
        from factorlm.errors import ConfigError

        raise ConfigError(
            f"unsupported architecture {getattr(model.config, 'model_type', '?')!r}: no list of decoder "
            f"blocks found. Supported: {', '.join(supported_model_types())}"
        )
    name, blocks = best
    linears = [n for n, m in blocks[0].named_modules() if n and is_linear_like(m)]
    # the A/B halves of an already factorized layer are not targets of their own
    rels = tuple(n for n in linears if not any(n.startswith(p + ".") for p in linears))
    return ArchSpec(blocks=name, groups={"all": rels}, single_pass=False)  # unknown call structure


def get_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        spec = _fallback_spec(model)
        log.warning(
            "model_type %r has no adapter (supported: %s); falling back to every nn.Linear inside %s (%d per block)",
            model_type,
            ", ".join(supported_model_types()),
            spec.blocks,
            len(spec.groups["all"]),
        )
    return spec


def get_blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or get_spec(model)
    return get_submodule(model, spec.blocks)


def unfuse_experts(model: nn.Module, spec: ArchSpec | None = None) -> list[str]:
    """Replace fused 3D expert modules by :class:`UnfusedExperts`; returns the full paths replaced."""
    spec = spec or get_spec(model)
    done = []
    for i, block in enumerate(get_blocks(model, spec)):
        for rel in spec.fused_experts:
            try:
                mod = get_submodule(block, rel)
            except AttributeError:
                continue
            if is_fused_experts(mod):
                set_submodule(block, rel, UnfusedExperts.from_fused(mod))
                done.append(f"{spec.blocks}.{i}.{rel}")
    return done


def block_targets(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """Targeted linear modules of one block, in module order: {relative name: module}."""
    pats = spec.patterns()
    return {
        n: m
        for n, m in block.named_modules()
        if n and is_linear_like(m) and any(match(p, n) for p in pats)
    }


def model_targets(model: nn.Module, spec: ArchSpec | None = None) -> dict[str, nn.Module]:
    """All targeted linears of the model: {full name: module}."""
    spec = spec or get_spec(model)
    out = {}
    for i, block in enumerate(get_blocks(model, spec)):
        for rel, m in block_targets(block, spec).items():
            out[f"{spec.blocks}.{i}.{rel}"] = m
    return out


def count_params(module: nn.Module) -> int:
    """Parameters counted once even when tied."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def target_params(model: nn.Module, spec: ArchSpec | None = None) -> int:
    total = 0
    for m in model_targets(model, spec).values():
        if isinstance(m, LowRankLinear):
            total += m.num_parameters()
        else:
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total
