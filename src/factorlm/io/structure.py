"""The structure record of a compressed model: which modules differ from the original skeleton."""

from __future__ import annotations

import torch
from torch import nn

from factorlm.arch.modules import get_spec, model_targets
from factorlm.nn.experts import UnfusedExperts
from factorlm.nn.lowrank import LowRankLinear
from factorlm.nn.quantized import QuantLinear
from factorlm.nn.slots import SlotLinear


def describe_module(m: nn.Module) -> dict | None:
    if isinstance(m, LowRankLinear):
        return {
            "type": "lowrank",
            "in": m.in_features,
            "out": m.out_features,
            "rank": m.rank,
            "bias": m.bias is not None,
        }
    if isinstance(m, SlotLinear):
        return {
            "type": "slots",
            "in": m.in_features,
            "out": m.out_features,
            "in_kept": None if m.in_slots is None else len(m.in_slots),
            "out_kept": None if m.out_slots is None else len(m.out_slots),
            "bias": m.bias is not None,
        }
    if isinstance(m, (nn.Linear, QuantLinear)):  # a quantized one: its table says how
        return {
            "type": "linear",
            "in": m.in_features,
            "out": m.out_features,
            "bias": m.bias is not None,
        }
    return None


def skeleton(config, cls=None) -> nn.Module:
    """The original architecture on the meta device (no memory, no init)."""
    from factorlm.nn.modeling_factorlm import _model_class

    with torch.device("meta"):
        return (cls or _model_class(config))(config)


def structure_of(model: nn.Module) -> dict:
    """{"unfused_experts": [...], "modules": {name: spec}} relative to a fresh skeleton."""
    spec = get_spec(model)
    ref = skeleton(model.config, type(model))
    unfused = [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    modules = {}
    for name, m in model_targets(model, spec).items():
        d = describe_module(m)
        if d is None:
            continue
        try:
            orig = ref.get_submodule(name)
        except AttributeError:
            orig = None  # inside unfused experts
        if (
            d["type"] == "linear"
            and isinstance(orig, nn.Linear)
            and (orig.in_features, orig.out_features) == (d["in"], d["out"])
        ):
            continue
        modules[name] = d
    return {"unfused_experts": unfused, "modules": modules}
