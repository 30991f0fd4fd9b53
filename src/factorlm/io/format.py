"""The factorlm save format: the schema of ``config.json``'s ``factorlm`` block, its version, dtype
names and the migration of blocks written by older versions.

A saved model is a normal Hugging Face directory whose ``config.json`` carries, under
:data:`CONFIG_KEY`, a block::

    {"format_version": 1,                       # 2 when there is a "quantization" table
     "dtype": "bfloat16",                       # dtype of the saved weights
     "unfused_experts": ["model.layers.0.mlp.experts", ...],
     "modules": {"model.layers.0.self_attn.q_proj": {"type": "lowrank", "in": 64, "out": 64,
                                                     "rank": 16, "bias": false},
                 "model.layers.0.mlp.gate_proj": {"type": "linear", "in": 64, "out": 96,
                                                  "bias": false}},
     # written by factorlm.save when a report / recipe is given (informational for loading):
     "method": ..., "ratio": ..., "achieved_ratio": ..., "allocation": ..., "options": {...},
     "config": {...}, "run": {...}, "ranks": {...}, "pruned_widths": {...},
     "calibration": {...}, "params_total": ..., "recipe": {...},
     # version 2: weight-only int8 / int4 QuantLinear modules
     "quantization": {"scheme": "int8", "modules": {name: {"in": 64, "out": 64, "bits": 8,
                                                          "group": 64, "bias": false}}}}

Version 3 adds the module type ``"slots"`` (:class:`factorlm.nn.slots.SlotLinear`, attention
compressed as modules): ``{"type": "slots", "in": 64, "out": 64, "in_kept": null, "out_kept": 48,
"bias": false}`` -- the full widths, and how many input columns / output rows are kept (``null``:
all); which ones is in the weights (the integer tensors ``in_slots`` / ``out_slots``).

A block is written with the lowest version that describes it (a model without a quantization
table is version 1, so older readers still load it).

This module is the only place that spells the key, the version and the dtype names. It depends on
the standard library and torch only: :func:`factorlm.io.save.save` bundles it into every saved
directory as ``factorlm_format.py`` next to ``modeling_factorlm.py`` (the loader used by
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:  # inside the factorlm package: its typed errors
    from factorlm.errors import ConfigError as DtypeError
    from factorlm.errors import FormatError as _FormatBase
except ImportError:  # bundled into a saved directory, factorlm not installed

    class DtypeError(ValueError):  # type: ignore[no-redef]
        """An unknown dtype name."""

    class _FormatBase(Exception):  # type: ignore[no-redef]
        pass


CONFIG_KEY = "factorlm"
FORMAT_VERSION = 3
MODULE_TYPES = ("lowrank", "linear", "slots")
BUNDLED_NAME = "factorlm_format.py"  # this file's name inside a saved directory
#: config.json keys that only make sense for a factorlm directory (removed from a plain config)
FOREIGN_KEYS = (CONFIG_KEY, "auto_map")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}
_DTYPE_HELP = "use float32, float16, bfloat16 (or fp32/fp16/bf16)"


class SaveFormatError(_FormatBase):
    """A ``factorlm`` block that is invalid or from a newer format version."""


def parse_dtype(value: Any, *, allow_auto: bool = False, what: str = "dtype") -> Any:
    """``torch.bfloat16`` / ``"bf16"`` / ``"bfloat16"`` / ``"torch.bfloat16"`` -> ``torch.bfloat16``.

    ``None`` stays ``None``; ``"auto"`` is returned as ``"auto"`` when ``allow_auto``. Anything
    else raises one :class:`DtypeError` (``factorlm.errors.ConfigError`` inside the package).
    """
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise DtypeError(f"{what} {value} is not a floating-point dtype: {_DTYPE_HELP}")
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if allow_auto and name == "auto":
            return "auto"
        if name in _DTYPES:
            return _DTYPES[name]
        extra = " or auto" if allow_auto else ""
        raise DtypeError(f"unknown {what} {value!r}: {_DTYPE_HELP}{extra}")
    raise DtypeError(f"{what} must be a torch.dtype or a name, not {type(value).__name__}")


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name written into the block (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------ migration of older versions
#: version v -> function turning a block of version v into one of version v + 1
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: lambda block: {**block, "format_version": 2},  # 2 only added the optional quantization
    2: lambda block: {**block, "format_version": 3},  # 3 only added the "slots" module type
}


def migrate(block: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``block`` brought to :data:`FORMAT_VERSION` (refuses a newer version)."""
    if not isinstance(block, dict):
        raise SaveFormatError(f"the {CONFIG_KEY!r} block of config.json is not an object")
    version = block.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SaveFormatError(
            f"the {CONFIG_KEY!r} block has no valid format_version (got {version!r})"
        )
    if version > FORMAT_VERSION:
        raise SaveFormatError(
            f"this model was saved with factorlm format version {version}; this factorlm reads "
            f"up to {FORMAT_VERSION}: upgrade factorlm"
        )
    out = dict(block)
    while out["format_version"] < FORMAT_VERSION:
        step = MIGRATIONS[out["format_version"]]
        out = step(out)
    return out


# ------------------------------------------------------------------ schema
def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate_module_spec(name: str, spec: Any) -> None:
    if not isinstance(spec, dict) or spec.get("type") not in MODULE_TYPES:
        raise SaveFormatError(f"module {name!r}: invalid entry {spec!r}")
    if spec["type"] == "slots":
        kept = {k: spec.get(k) for k in ("in_kept", "out_kept")}
        full = {"in_kept": spec.get("in"), "out_kept": spec.get("out")}
        ok = any(v is not None for v in kept.values()) and all(
            v is None or (_positive_int(v) and _positive_int(full[k]) and v <= full[k])
            for k, v in kept.items()
        )
        if not ok:
            raise SaveFormatError(f"module {name!r}: invalid kept widths {kept!r}")
    for key in ("in", "out") + (("rank",) if spec["type"] == "lowrank" else ()):
        if not _positive_int(spec.get(key)):
            raise SaveFormatError(f"module {name!r}: invalid {key!r} = {spec.get(key)!r}")
    if spec["type"] == "lowrank" and spec["rank"] > min(spec["in"], spec["out"]):
        raise SaveFormatError(
            f"module {name!r}: rank {spec['rank']} exceeds its shape {spec['out']}x{spec['in']}"
        )
    if not isinstance(spec.get("bias", False), bool):
        raise SaveFormatError(f"module {name!r}: invalid 'bias' = {spec['bias']!r}")


def validate_quantization(table: Any) -> None:
    if table is None:
        return
    mods = table.get("modules") if isinstance(table, dict) else None
    if not isinstance(mods, dict):
        raise SaveFormatError(f"the {CONFIG_KEY!r} block's 'quantization' has no 'modules' table")
    for name, spec in mods.items():
        ok = isinstance(spec, dict) and spec.get("bits") in (8, 4)
        ok = ok and all(_positive_int(spec.get(key)) for key in ("in", "out", "group"))
        ok = ok and isinstance(spec.get("bias", False), bool) and spec["in"] % spec["group"] == 0
        if not ok:
            raise SaveFormatError(f"quantized module {name!r}: invalid entry {spec!r}")


def validate_block(block: Any) -> dict[str, Any]:
    """Check a block (any supported version) and return it migrated to the current version."""
    block = migrate(block)
    dtype = block.get("dtype")
    if dtype is not None:
        try:
            parse_dtype(dtype)
        except DtypeError as e:
            raise SaveFormatError(
                f"the {CONFIG_KEY!r} block names an invalid dtype {dtype!r}"
            ) from e
    unfused = block.get("unfused_experts", [])
    if not isinstance(unfused, list) or not all(isinstance(p, str) for p in unfused):
        raise SaveFormatError(
            f"the {CONFIG_KEY!r} block's 'unfused_experts' is not a list of paths"
        )
    mods = block.get("modules")
    if not isinstance(mods, dict):
        raise SaveFormatError(f"the {CONFIG_KEY!r} block has no 'modules' table")
    for name, spec in mods.items():
        validate_module_spec(name, spec)
    validate_quantization(block.get("quantization"))
    return block


def read_block(config: Any) -> dict[str, Any] | None:
    """The validated block of a ``config.json`` dict or a ``PretrainedConfig``; ``None`` if absent."""
    raw = config if isinstance(config, dict) else getattr(config, "__dict__", {})
    block = raw.get(CONFIG_KEY)
    return None if block is None else validate_block(block)


def has_block(config: Any) -> bool:
    raw = config if isinstance(config, dict) else getattr(config, "__dict__", {})
    return raw.get(CONFIG_KEY) is not None


def saved_dtype(block: dict[str, Any]) -> torch.dtype:
    return parse_dtype(block.get("dtype")) or torch.float32


def make_block(
    structure: dict[str, Any],
    dtype: torch.dtype,
    info: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The block to write: the structure record + the saved dtype + the quantization table +
    ``info`` (method, ratio, configs, ranks, calibration, recipe: anything JSON-serialisable),
    with the lowest format version that describes it."""
    slots = any(m.get("type") == "slots" for m in structure.get("modules", {}).values())
    version = 3 if slots else 1 if quantization is None else 2
    block: dict[str, Any] = {"format_version": version, **structure}
    block["dtype"] = dtype_name(dtype)
    if quantization is not None:
        block["quantization"] = quantization
    block.update(info or {})
    validate_block(block)
    return block


def attach(config: Any, block: dict[str, Any]) -> None:
    """Record ``block`` on a live ``PretrainedConfig`` (what ``factorlm.load`` returns carries it)."""
    config.__dict__[CONFIG_KEY] = block


def block_of(config: Any) -> dict[str, Any]:
    """The block a live model's config carries (``{}`` for a plain model); not validated."""
    raw = config if isinstance(config, dict) else getattr(config, "__dict__", {})
    return raw.get(CONFIG_KEY) or {}


def strip(config: Any) -> None:
    """Remove the factorlm keys from a ``PretrainedConfig`` (a plain architecture again)."""
    for attr in FOREIGN_KEYS:
        config.__dict__.pop(attr, None)
