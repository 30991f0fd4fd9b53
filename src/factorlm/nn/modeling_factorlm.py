"""Generic loader of factorlm-compressed models (bundled into every saved model directory).

A saved directory is a normal Hugging Face model directory whose ``config.json`` carries a
``factorlm`` block describing which modules were replaced (low-rank pairs, pruned linears,
unfused experts). Loading = build the original architecture from the config, swap in modules of
the recorded shapes, then load the safetensors weights (strictly: every tensor must be present
with the right shape). Nothing is re-computed and nothing is unpickled.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` reaches
:class:`FactorLMForCausalLM` through ``auto_map``; ``factorlm.load`` calls :func:`load_factorlm_dir`.
This file depends only on torch, transformers and safetensors (plus the two bundled module files).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

try:  # inside the factorlm package
    from .experts import UnfusedExperts
    from .lowrank import LowRankLinear
    from .quantized import QuantLinear
except ImportError:  # pragma: no cover - loaded as a top-level module
    from experts import UnfusedExperts  # type: ignore
    from lowrank import LowRankLinear  # type: ignore
    from quantized import QuantLinear  # type: ignore

# 2: optional "quantization" table (int8/int4 QuantLinear modules); models without one are 1
FORMAT_VERSION = 2
CONFIG_KEY = "factorlm"


class FactorLMFormatError(Exception):
    """The directory is not a valid factorlm model (corrupt, truncated, foreign or too new)."""


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, nn.ModuleList) and leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def make_module(spec: dict, dtype: torch.dtype, device=None) -> nn.Module:
    """A fresh module of the recorded shape: {"type": "lowrank"|"linear", "in", "out", "rank", "bias"}."""
    kind = spec.get("type")
    if kind == "lowrank":
        return LowRankLinear(
            spec["in"], spec["out"], spec["rank"], bias=spec["bias"], dtype=dtype, device=device
        )
    if kind == "linear":
        return nn.Linear(spec["in"], spec["out"], bias=spec["bias"], dtype=dtype, device=device)
    raise FactorLMFormatError(f"unknown module type {kind!r} in the factorlm block")


def validate_block(block: dict) -> None:
    if not isinstance(block, dict):
        raise FactorLMFormatError("the 'factorlm' block of config.json is not an object")
    version = block.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FactorLMFormatError(
            f"the 'factorlm' block has no valid format_version (got {version!r})"
        )
    if version > FORMAT_VERSION:
        raise FactorLMFormatError(
            f"this model was saved with factorlm format version {version}; this factorlm reads up to "
            f"{FORMAT_VERSION}: upgrade factorlm"
        )
    dtype = block.get("dtype")
    if dtype is not None and not (
        isinstance(dtype, str)
        and isinstance(getattr(torch, dtype, None), torch.dtype)
        and getattr(torch, dtype).is_floating_point
    ):
        raise FactorLMFormatError(f"the 'factorlm' block names an invalid dtype {dtype!r}")
    unfused = block.get("unfused_experts", [])
    if not isinstance(unfused, list) or not all(isinstance(p, str) for p in unfused):
        raise FactorLMFormatError("the 'factorlm' block's 'unfused_experts' is not a list of paths")
    mods = block.get("modules")
    if not isinstance(mods, dict):
        raise FactorLMFormatError("the 'factorlm' block has no 'modules' table")
    for name, spec in mods.items():
        if not isinstance(spec, dict) or spec.get("type") not in ("lowrank", "linear"):
            raise FactorLMFormatError(f"module {name!r}: invalid entry {spec!r}")
        for key in ("in", "out") + (("rank",) if spec["type"] == "lowrank" else ()):
            value = spec.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FactorLMFormatError(f"module {name!r}: invalid {key!r} = {value!r}")
        if spec["type"] == "lowrank" and spec["rank"] > min(spec["in"], spec["out"]):
            raise FactorLMFormatError(
                f"module {name!r}: rank {spec['rank']} exceeds its shape {spec['out']}x{spec['in']}"
            )
        if not isinstance(spec.get("bias", False), bool):
            raise FactorLMFormatError(f"module {name!r}: invalid 'bias' = {spec['bias']!r}")


def validate_quantization(table) -> None:
    if table is None:
        return
    mods = table.get("modules") if isinstance(table, dict) else None
    if not isinstance(mods, dict):
        raise FactorLMFormatError("the 'factorlm' block's 'quantization' has no 'modules' table")
    for name, spec in mods.items():
        ok = isinstance(spec, dict) and spec.get("bits") in (8, 4)
        for key in ("in", "out", "group"):
            value = spec.get(key) if isinstance(spec, dict) else None
            ok = ok and isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ok = ok and isinstance(spec.get("bias", False), bool) and spec["in"] % spec["group"] == 0
        if not ok:
            raise FactorLMFormatError(f"quantized module {name!r}: invalid entry {spec!r}")


def apply_quantization(model: nn.Module, table: dict | None) -> None:
    """Swap in the recorded QuantLinear skeletons (integer weights and scales are loaded after)."""
    validate_quantization(table)
    if table is None:
        return
    dtype = next(model.parameters()).dtype
    for name, spec in table["modules"].items():
        try:
            old = model.get_submodule(name)
        except (AttributeError, ValueError) as e:
            raise FactorLMFormatError(
                f"quantized module {name!r} does not exist in this architecture"
            ) from e
        if (getattr(old, "in_features", None), getattr(old, "out_features", None)) != (
            spec["in"],
            spec["out"],
        ):
            raise FactorLMFormatError(f"quantized module {name!r}: shape differs from the model's")
        q = QuantLinear(spec["in"], spec["out"], spec["bits"], spec["group"], spec["bias"], dtype)
        _set_submodule(model, name, q)


def apply_structure(model: nn.Module, block: dict) -> None:
    """Swap in the compressed modules' skeletons (shapes only; weights are loaded afterwards)."""
    validate_block(block)
    dtype = next(model.parameters()).dtype
    for path in block.get("unfused_experts", []):
        try:
            fused = model.get_submodule(path)
            unfused = UnfusedExperts.from_fused(fused, copy_weights=False)
        except (AttributeError, ValueError, TypeError) as e:
            raise FactorLMFormatError(
                f"unfused expert module {path!r}: no fused experts module at this path in this "
                "architecture"
            ) from e
        _set_submodule(model, path, unfused)
    for name, spec in block["modules"].items():
        try:
            model.get_submodule(name)
        except (AttributeError, ValueError) as e:
            raise FactorLMFormatError(
                f"module {name!r} of the factorlm block does not exist in this architecture"
            ) from e
        _set_submodule(model, name, make_module(spec, dtype))


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            if not all(isinstance(f, str) for f in files):
                raise ValueError("file names must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FactorLMFormatError(f"{index}: invalid safetensors index ({e})") from e
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FactorLMFormatError(f"{path}: no model.safetensors (nor an index) found")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        if not os.path.isfile(f):
            raise FactorLMFormatError(f"weight file {f} listed in the index is missing")
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise FactorLMFormatError(f"{f}: corrupt or truncated safetensors file ({e})") from e
    return state


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings()
        if out_emb is not None:
            tied = {k for k in expected if k.endswith("weight") and expected[k] is out_emb.weight}
            tied |= {n + ".weight" for n, m in model.named_modules() if m is out_emb}
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise FactorLMFormatError(
            f"weights do not match the recorded structure: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise FactorLMFormatError(
                f"tensor {k!r} has shape {tuple(v.shape)} but the recorded structure needs "
                f"{tuple(expected[k].shape)} (config.json's factorlm block and the weights disagree)"
            )
        if v.is_floating_point() != expected[k].is_floating_point():
            raise FactorLMFormatError(
                f"tensor {k!r} has dtype {v.dtype} but the model needs {expected[k].dtype}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FactorLMFormatError(f"tensor {k!r} contains NaN or Inf")
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and name != "FactorLMForCausalLM":
            return cls
    raise FactorLMFormatError(
        f"config.json names no transformers model class (architectures={config.architectures})"
    )


def load_factorlm_dir(path: str, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """Build the skeleton from ``path/config.json``, swap in the compressed modules, load the weights."""
    from transformers import AutoConfig

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FactorLMFormatError(f"{path}: not a model directory (no config.json)")
    try:
        with open(cfg_file) as f:
            raw = json.load(f)
    except ValueError as e:
        raise FactorLMFormatError(f"{cfg_file}: invalid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise FactorLMFormatError(f"{cfg_file}: not a JSON object")
    block = raw.get(CONFIG_KEY)
    if block is None:
        raise FactorLMFormatError(
            f"{path}: config.json has no 'factorlm' block (not a factorlm model)"
        )
    validate_block(block)
    config = AutoConfig.from_pretrained(path)
    for attr in ("auto_map", CONFIG_KEY, "quantization_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    model_cls = _model_class(config)
    saved_dtype = block.get("dtype")
    dtype = dtype or (
        getattr(torch, saved_dtype) if isinstance(saved_dtype, str) else torch.float32
    )
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = model_cls(config)
    model.to(dtype)
    apply_structure(model, block)
    apply_quantization(model, block.get("quantization"))
    load_weights_strict(model, read_state_dict(path))
    model.config.__dict__[CONFIG_KEY] = block
    model.eval()
    if device is not None:
        model.to(device)
    return model


class FactorLMForCausalLM:
    """Entry point for ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

    Returns an instance of the original architecture's class (e.g. ``LlamaForCausalLM``) with the
    compressed modules in place, so generation, lm-eval's ``--model hf`` and other HF tools work.
    """

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=kwargs.get("revision"))
        if (
            config is not None
            and getattr(config, CONFIG_KEY, None) is None
            and not os.path.isfile(os.path.join(path, "config.json"))
        ):
            return _model_class(config).from_pretrained(
                pretrained_model_name_or_path, *args, config=config, **kwargs
            )
        with open(os.path.join(path, "config.json")) as f:
            if CONFIG_KEY not in json.load(
                f
            ):  # a plain model in a process where this class got registered
                return _model_class(config).from_pretrained(
                    pretrained_model_name_or_path, *args, config=config, **kwargs
                )
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        device_map = kwargs.get("device_map")
        device = (
            device_map
            if isinstance(device_map, (str, torch.device)) and device_map != "auto"
            else None
        )
        if device_map == "auto":
            device = "cuda" if torch.cuda.is_available() else None
        return load_factorlm_dir(path, dtype=dtype, device=device)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return _model_class(config)._from_config(config, **kwargs)
