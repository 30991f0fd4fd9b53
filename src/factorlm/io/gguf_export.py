"""GGUF export for llama.cpp / Ollama: the model's dense weights, hyper-parameters and tokenizer.

Low-rank layers are written as their product A @ B (llama.cpp has no factorized linear), pruned MLP
linears at their pruned size with ``<arch>.feed_forward_length`` per block when the widths differ
(llama.cpp reads that key as a per-layer array). Tensor names come from the ``gguf`` package's map
for the architecture (:data:`factorlm.arch.registry.GGUF_ARCHITECTURES` says which one); 1-D tensors
stay float32, matrices are f16, q8_0 (rows whose length is no multiple of 32 fall back to f16) or
f32.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from factorlm.arch.modules import get_spec, linear_bias
from factorlm.arch.registry import GGUF_ARCHITECTURES, GGUFSpec
from factorlm.errors import ConfigError, OutputExistsError
from factorlm.io.export import (
    ExportSummary,
    _flat,
    block_mlp_widths,
    check_structural,
    densified_layers,
)
from factorlm.io.gguf_vocab import copy_tokenizer, write_hf_tokenizer
from factorlm.io.save import unique_state_dict
from factorlm.nn.lowrank import LowRankLinear
from factorlm.nn.slots import SlotLinear

log = logging.getLogger(__name__)

GGUF_DTYPES = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "f32": gguf.LlamaFileType.ALL_F32,
}
_Q8_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]


def gguf_spec(model: nn.Module) -> GGUFSpec:
    model_type = model.config.model_type
    spec = GGUF_ARCHITECTURES.get(model_type)
    if spec is None:
        raise ConfigError(
            f"no GGUF export for model type {model_type!r} yet (supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}); --format hf writes the plain architecture"
        )
    return spec


def dense_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each low-rank pair and slot linear replaced by its dense weight (tied
    copies once)."""
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, (LowRankLinear, SlotLinear))}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, m in lowrank.items():
            out[f"{name}.weight"] = m.dense_weight().detach()
            bias = linear_bias(m)
            if bias is not None:
                out[f"{name}.bias"] = bias.detach()
    prefixes = tuple(f"{n}." for n in lowrank)
    for key, value in unique_state_dict(model).items():
        if not prefixes or not key.startswith(prefixes):
            out[key] = value
    return out


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from the half-split rotary layout of transformers to
    the interleaved pairs of llama.cpp: per head, rows (i, i + d/2) become rows (2i, 2i + 1)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_rows(model: nn.Module) -> dict[str, int]:
    """{tensor name: head count} of the q and k projections (weights and biases)."""
    spec, config = get_spec(model), model.config
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads}
    out = {}
    for i in range(config.num_hidden_layers):
        for role, n in heads.items():
            for suffix in ("weight", "bias"):
                out[f"{spec.blocks}.{i}.{spec.roles[role]}.{suffix}"] = n
    return out


def _encode(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or dtype == "f32":
        return a, None
    if dtype == "q8_0" and a.shape[-1] % _Q8_BLOCK == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(a, q8), q8
    return a.astype(np.float16), None


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ConfigError(f"rope scaling {kind!r} is not supported by the GGUF export yet")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _write_hparams(writer: gguf.GGUFWriter, model: nn.Module, widths: list[int], ftype) -> None:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_name(Path(str(getattr(c, "_name_or_path", "") or c.model_type)).name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(widths[0] if len(set(widths)) == 1 else widths)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * c.num_attention_heads != c.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_path(out: str | os.PathLike, dtype: str) -> Path:
    """``out`` itself when it names a ``.gguf`` file, else ``out/model-<dtype>.gguf``."""
    path = Path(out)
    return path if path.suffix.lower() == ".gguf" else path / f"model-{dtype}.gguf"


def _target(out: str | os.PathLike, dtype: str, overwrite: bool) -> Path:
    path = gguf_path(out, dtype)
    if path.exists() and not (overwrite and path.is_file()):
        raise OutputExistsError(f"output {path} exists (use --overwrite / overwrite=True)")
    return path


def export_gguf(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer=None,
    dtype: str = "f16",
    overwrite: bool = False,
    tokenizer_gguf: str | os.PathLike | None = None,
    tokenizer_pre: str | None = None,
) -> ExportSummary:
    """Write ``model`` (compressed or not) as one GGUF file; see the module docstring."""
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--dtype {dtype} is not a GGUF dtype: use {', '.join(GGUF_DTYPES)}")
    gspec = gguf_spec(model)
    check_structural(model)
    path = _target(out, dtype, overwrite)
    widths = _flat(block_mlp_widths(model))
    arch_name = gspec.arch if len(set(widths)) <= 1 else gspec.varying_widths_arch
    if arch_name is None:
        raise ConfigError(
            f"the MLP widths differ between blocks ({min(widths)}..{max(widths)}) and llama.cpp's "
            f"{gspec.arch} architecture sizes every block by block 0's: compress with uniform "
            "block ratios (allocation='uniform') to export this model to GGUF"
        )
    arch = gguf.MODEL_ARCH[arch_name.upper()]
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    rope_rows = _rope_rows(model) if gspec.rope_interleaved else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    notes: list[str] = []
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    try:
        _write_hparams(writer, model, widths, GGUF_DTYPES[dtype])
        if tokenizer_gguf is not None:
            copy_tokenizer(writer, tokenizer_gguf, model.config.vocab_size)
        elif tokenizer is not None:
            write_hf_tokenizer(writer, tokenizer, model.config.vocab_size, pre=tokenizer_pre)
        else:
            log.warning("no tokenizer: the GGUF holds the weights only (llama.cpp needs a vocab)")
        for key, t in dense_tensors(model).items():
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ConfigError(f"tensor {key} has no name in GGUF architecture {arch_name}")
            if key in rope_rows:
                t = interleave_rope_rows(t, rope_rows[key])
            data, raw = _encode(t, dtype)
            if dtype == "q8_0" and t.ndim == 2 and raw is None:
                notes.append(f"{name}: rows of {t.shape[-1]} are no multiple of 32, kept f16")
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ExportSummary(
        format="gguf",
        path=path,
        dtype=dtype,
        mlp_widths=block_mlp_widths(model),
        densified=densified_layers(model),
        file_bytes=path.stat().st_size,
        notes=notes,
    )
