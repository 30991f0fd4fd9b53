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
    from .slots import SlotLinear
except ImportError:  # pragma: no cover - loaded as a top-level module
    from experts import UnfusedExperts  # type: ignore
    from lowrank import LowRankLinear  # type: ignore
    from quantized import QuantLinear  # type: ignore
    from slots import SlotLinear  # type: ignore

try:  # inside the factorlm package: its one save-format module
    if __package__ != "factorlm.nn":
        raise ImportError(f"bundled copy in {__package__}")
    from factorlm.io.format import (
        CONFIG_KEY,
        FORMAT_VERSION,
        SaveFormatError,
        attach,
        parse_dtype,
        read_block,
        saved_dtype,
        strip,
        validate_block,
    )
except ImportError:  # bundled into a saved directory next to this file (trust_remote_code)
    from .factorlm_format import (  # type: ignore[no-redef]
        CONFIG_KEY,
        FORMAT_VERSION,
        SaveFormatError,
        attach,
        parse_dtype,
        read_block,
        saved_dtype,
        strip,
        validate_block,
    )

FactorLMFormatError = SaveFormatError
__all__ = ["CONFIG_KEY", "FORMAT_VERSION", "FactorLMForCausalLM", "load_factorlm_dir"]


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, nn.ModuleList) and leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def make_module(spec: dict, dtype: torch.dtype, device=None) -> nn.Module:
    """A fresh module of the recorded shape: {"type": "lowrank"|"linear"|"slots", "in", "out",
    "rank" | "in_kept", "out_kept", "bias"}."""
    kind = spec.get("type")
    if kind == "lowrank":
        return LowRankLinear(
            spec["in"], spec["out"], spec["rank"], bias=spec["bias"], dtype=dtype, device=device
        )
    if kind == "linear":
        return nn.Linear(spec["in"], spec["out"], bias=spec["bias"], dtype=dtype, device=device)
    if kind == "slots":
        return SlotLinear(
            spec["in"],
            spec["out"],
            spec.get("in_kept"),
            spec.get("out_kept"),
            bias=spec["bias"],
            dtype=dtype,
            device=device,
        )
    raise FactorLMFormatError(f"unknown module type {kind!r} in the factorlm block")


def apply_quantization(model: nn.Module, table: dict | None) -> None:
    """Swap in the recorded QuantLinear skeletons (integer weights and scales are loaded after;
    the table was checked with the block, :func:`factorlm.io.format.validate_block`)."""
    if table is None:
        return
    first = next(model.parameters())
    dtype, device = first.dtype, first.device
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
        q = QuantLinear(
            spec["in"], spec["out"], spec["bits"], spec["group"], spec["bias"], dtype, device
        )
        _set_submodule(model, name, q)


def apply_structure(model: nn.Module, block: dict) -> None:
    """Swap in the compressed modules' skeletons (shapes only, on the device of the parameters
    they replace: ``meta`` while loading; weights are loaded afterwards)."""
    block = validate_block(block)
    first = next(model.parameters())
    dtype, device = first.dtype, first.device
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
        _set_submodule(model, name, make_module(spec, dtype, device))


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


def read_state_dict(
    path: str, dtypes: dict[str, torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """The weights of ``path``, one tensor at a time (each cast to ``dtypes[name]`` when given,
    so that only one copy of the model is ever held)."""
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        if not os.path.isfile(f):
            raise FactorLMFormatError(f"weight file {f} listed in the index is missing")
        try:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                    t = sf.get_tensor(key)
                    want = (dtypes or {}).get(key)
                    if want is not None and t.is_floating_point() and t.dtype != want:
                        t = t.to(want)
                    state[key] = t
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise FactorLMFormatError(f"{f}: corrupt or truncated safetensors file ({e})") from e
    return state


def _tied_keys(model: nn.Module, expected: dict[str, torch.Tensor]) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out_emb = model.get_output_embeddings()
    if out_emb is None:
        return set()
    return {n + ".weight" for n, m in model.named_modules() if m is out_emb} & set(expected)


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Check ``state`` against the model's structure, then load it in place of the parameters
    (``assign=True``: the skeleton may live on the meta device, the tensors are not copied)."""
    expected = model.state_dict(keep_vars=True)
    tied = _tied_keys(model, expected)
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
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise FactorLMFormatError(f"weights missing after loading: {left[:3]}")


class _ParametersOnMeta:
    """Build a module with its parameters on the meta device (no memory) and its buffers real.

    Non-persistent buffers (rotary frequencies, masks) are computed by the constructors and are not
    in the weight files, so they must not be meta; parameters are all replaced by the saved ones.
    """

    def __enter__(self) -> _ParametersOnMeta:
        self._orig = nn.Module.register_parameter
        orig = self._orig

        def register(module: nn.Module, name: str, param) -> None:
            orig(module, name, param)
            if param is not None and not param.is_meta:
                p = module._parameters[name]
                module._parameters[name] = nn.Parameter(
                    p.data.to("meta"), requires_grad=p.requires_grad
                )

        nn.Module.register_parameter = register  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:
        nn.Module.register_parameter = self._orig  # type: ignore[method-assign]


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and name != "FactorLMForCausalLM":
            return cls
    raise FactorLMFormatError(
        f"config.json names no transformers model class (architectures={config.architectures})"
    )


def _read_config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FactorLMFormatError(f"{path}: not a model directory (no config.json)")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise FactorLMFormatError(f"{cfg_file}: invalid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise FactorLMFormatError(f"{cfg_file}: not a JSON object")
    return raw


def load_factorlm_dir(path: str, dtype: torch.dtype | str | None = None, device=None) -> nn.Module:
    """Build the skeleton from ``path/config.json`` (parameters on the meta device), swap in the
    compressed modules, then load the weights in place of the parameters: one copy of the model."""
    from transformers import AutoConfig

    block = read_block(_read_config(path))
    if block is None:
        raise FactorLMFormatError(
            f"{path}: config.json has no {CONFIG_KEY!r} block (not a factorlm model)"
        )
    dtype = parse_dtype(dtype) or saved_dtype(block)
    config = AutoConfig.from_pretrained(path)
    strip(config)
    config.__dict__.pop("quantization_config", None)
    model_cls = _model_class(config)
    with _no_init_weights(), _ParametersOnMeta():
        model = model_cls(config)
    model.to(dtype)
    apply_structure(model, block)
    apply_quantization(model, block.get("quantization"))
    wanted = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
    load_weights_strict(model, read_state_dict(path, wanted))
    attach(model.config, block)
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
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file) or CONFIG_KEY not in _read_config(path):
            # a plain model in a process where this class got registered
            return _model_class(config).from_pretrained(
                pretrained_model_name_or_path, *args, config=config, **kwargs
            )
        dtype = parse_dtype(kwargs.get("dtype", kwargs.get("torch_dtype")), allow_auto=True)
        dtype = None if dtype == "auto" else dtype
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
