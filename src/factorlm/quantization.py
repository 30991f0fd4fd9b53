"""``factorlm.quantize``: weight-only int8 / int4 quantization of the decoder blocks' linears.

Every targeted linear (dense or pruned) and both factors of every low-rank layer become a
:class:`~factorlm.nn.quantized.QuantLinear`; embeddings, norms and the LM head stay in float.
The saved directory records which linears are quantized (``quantization`` in the factorlm block,
format version 2) and stores the integer weights and scales as plain safetensors tensors; loading
rebuilds the same modules before the strict weight load.
"""

from __future__ import annotations

import logging

from torch import nn

from factorlm.errors import ConfigError
from factorlm.nn.lowrank import LowRankLinear
from factorlm.nn.quantized import QuantLinear, pick_group

log = logging.getLogger(__name__)

SCHEMES = {"int8": (8, None), "int4": (4, 32)}  # bits, default group size (None: one per row)

__all__ = ["SCHEMES", "check_scheme", "quantization_of", "quantize"]


def check_scheme(scheme: str | None) -> str | None:
    if scheme is None or scheme in SCHEMES:
        return scheme
    raise ConfigError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Full names of the plain linears to quantize: dense targets and low-rank factors."""
    from factorlm.arch.modules import model_targets
    from factorlm.nn.fused import is_fused

    if is_fused(model):
        raise ConfigError("quantize the model before fusing its linears (factorlm.nn.fused.fuse)")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ConfigError("the model is already quantized")
    out: dict[str, nn.Linear] = {}
    for name, m in model_targets(model).items():
        if isinstance(m, LowRankLinear):
            out.update({f"{name}.B": m.B, f"{name}.A": m.A})
        elif type(m) is nn.Linear:
            out[name] = m
        else:
            log.warning("%s (%s) is not a plain linear: left unquantized", name, type(m).__name__)
    return {k: m for k, m in out.items() if type(m) is nn.Linear}


def quantize(model: nn.Module, scheme: str = "int8", group_size: int | None = None) -> int:
    """Quantize the decoder blocks' linears of ``model`` in place (weight-only, round to nearest).

    ``scheme``: ``"int8"`` (symmetric, one scale per row unless ``group_size``) or ``"int4"``
    (asymmetric, groups of ``group_size`` = 32 input columns by default). A group size that does
    not divide a layer's input width is halved until it does (down to 8), else one group per row.
    Returns the number of linears quantized.
    """
    from factorlm.arch.modules import set_submodule

    check_scheme(scheme)
    bits, default_group = SCHEMES[scheme]
    group_size = default_group if group_size is None else group_size
    if group_size is not None and (not isinstance(group_size, int) or group_size < 2):
        raise ConfigError(f"group_size must be an integer >= 2, got {group_size!r}")
    targets = _linears(model)
    if not targets:
        raise ConfigError("no linear layers to quantize were found in the decoder blocks")
    for name, m in targets.items():
        g = pick_group(m.in_features, group_size)
        set_submodule(model, name, QuantLinear.from_linear(m.weight, m.bias, bits, g))
    log.info("quantized %d linears to %s", len(targets), scheme)
    return len(targets)


def quantization_of(model: nn.Module) -> dict | None:
    """The ``quantization`` record of the factorlm block, or None for an unquantized model."""
    mods = {
        n: {
            "in": m.in_features,
            "out": m.out_features,
            "bits": m.bits,
            "group": m.group_size,
            "bias": m.bias is not None,
        }
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    if not mods:
        return None
    bits = sorted({d["bits"] for d in mods.values()})
    return {"scheme": "+".join(f"int{b}" for b in bits), "modules": mods}
