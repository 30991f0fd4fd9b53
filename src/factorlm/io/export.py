"""``factorlm.export``: a compressed model in the formats other runtimes read.

* ``format="hf"``: the plain architecture (``model_type`` unchanged, no ``auto_map``, no remote
  code), loadable by ``AutoModelForCausalLM.from_pretrained(dir)``. Possible when the compression
  is structural with one MLP width for every block: the config's width key (data per model type,
  :attr:`ArchSpec.mlp_width_key`) takes the pruned width. Low-rank layers are written as their
  dense product, so they do not make the file smaller.
* ``format="gguf"``: one GGUF file for llama.cpp / Ollama (:mod:`factorlm.io.gguf_export`), with a
  per-block ``feed_forward_length`` when MLP widths differ.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlm.arch.match import match
from factorlm.arch.modules import get_blocks, get_spec, linear_shape
from factorlm.errors import ConfigError
from factorlm.io import format as fmt
from factorlm.io.densify import densify
from factorlm.io.outdir import check_out_apart
from factorlm.io.save import _apply_umask, _atomic_move, check_output_dir
from factorlm.io.structure import structure_of
from factorlm.nn.fused import unfused
from factorlm.nn.lowrank import LowRankLinear
from factorlm.nn.slots import SlotLinear
from factorlm.quantization import quantization_of

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportSummary:
    """What an export wrote: the path, its size, the MLP widths and the layers written dense."""

    format: str
    path: Path
    dtype: str
    mlp_widths: list[int | list[int]]  # per block (a list for a block with several MLP units)
    densified: list[str] = field(default_factory=list)  # low-rank layers stored as A @ B
    file_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        widths = _flat(self.mlp_widths)
        shown = (
            str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}..{max(widths)} per block"
        )
        out = [
            f"{self.format} export written to {self.path} ({self.file_bytes / 2**20:.1f} MiB, "
            f"{self.dtype})",
            f"MLP width: {shown}" if widths else "MLP width: unchanged",
        ]
        if self.densified:
            out.append(
                f"{len(self.densified)} low-rank layers written dense (A @ B): they keep their "
                "original size in this file; only structural compression shrinks it"
            )
        return out + self.notes


def _flat(widths: list[int | list[int]]) -> list[int]:
    return [w for ws in widths for w in (ws if isinstance(ws, list) else [ws])]


def block_mlp_widths(model: nn.Module) -> list[int | list[int]]:
    """The MLP width of every block: the input width of each MLP unit's output linear (a list for
    a block with several units, e.g. experts); ``[]`` for an architecture without MLP units."""
    spec = get_spec(model)
    if not spec.mlp_units:
        return []
    out: list[int | list[int]] = []
    for block in get_blocks(model, spec):
        widths = [
            linear_shape(m)[1]
            for rel, m in block.named_modules()
            for unit in spec.mlp_units
            if rel and match(unit.output, rel)
        ]
        out.append(widths[0] if len(widths) == 1 else widths)
    return out


def densified_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (LowRankLinear, SlotLinear))]


def _non_mlp_shape_changes(model: nn.Module) -> list[str]:
    """Linears whose shape changed outside the MLP units (attention dimensions)."""
    spec = get_spec(model)
    mlp_pats = [p for u in spec.mlp_units for p in (*u.inputs, u.output)]
    changed = []
    for name, d in structure_of(model)["modules"].items():
        rel = name.split(".", spec.blocks.count(".") + 2)[-1]
        if d["type"] == "linear" and not any(match(p, rel) for p in mlp_pats):
            changed.append(name)
    return changed


def check_structural(model: nn.Module) -> None:
    """Refuse shape changes that neither export can express (changed attention dimensions)."""
    changed = _non_mlp_shape_changes(model)
    if changed:
        raise ConfigError(
            f"{changed[0]} has a changed shape outside the MLP (attention dimensions): the "
            "plain and GGUF exports express only pruned MLP widths; keep the factorlm directory"
        )


def plain_config(model: nn.Module) -> Any:
    """The plain architecture's config with the pruned MLP width, or a ConfigError saying why not."""
    check_structural(model)
    spec = get_spec(model)
    widths = sorted(set(_flat(block_mlp_widths(model))))
    config = copy.deepcopy(model.config)
    fmt.strip(config)
    if len(widths) > 1:
        raise ConfigError(
            f"the MLP widths differ between blocks ({widths[0]}..{widths[-1]}): the plain "
            f"{model.config.model_type} config has one {spec.mlp_width_key}; keep the factorlm "
            "directory (it loads with trust_remote_code=True) or use --format gguf, which stores "
            "a width per block"
        )
    if widths and spec.mlp_width_key is not None:
        setattr(config, spec.mlp_width_key, widths[0])
    return config


def export_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> ExportSummary:
    """Write the plain architecture (no remote code) into ``out_dir``, atomically."""
    if dtype is not None and dtype not in HF_DTYPES:
        raise ConfigError(
            f"--dtype {dtype} is not a format={'hf'} dtype: use {', '.join(HF_DTYPES)}"
        )
    config = plain_config(model)
    out = check_output_dir(out_dir, overwrite)
    plain = densify(model, config=config)
    torch_dtype = HF_DTYPES[dtype] if dtype else next(model.parameters()).dtype
    plain.to(torch_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _apply_umask(tmp)
        _atomic_move(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = ExportSummary(
        format="hf",
        path=out,
        dtype=str(torch_dtype).removeprefix("torch."),
        mlp_widths=block_mlp_widths(model),
        densified=densified_layers(model),
        file_bytes=sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
    )
    return summary


def _source_gguf(model: nn.Module, model_or_dir: Any) -> Path | None:
    """The GGUF the (uncompressed) model came from, found through its name or its report."""
    from factorlm.io.default_model import source_gguf

    names = [getattr(model.config, "_name_or_path", None)]
    if not isinstance(model_or_dir, nn.Module):
        report = Path(model_or_dir) / "report.json"
        if report.is_file():
            try:
                names.append(json.loads(report.read_text()).get("model_name"))
            except (OSError, ValueError):
                pass
    for name in names:
        found = source_gguf(name) if isinstance(name, str) else None
        if found is not None:
            log.info("the model came from %s: its tokenizer is carried over", found)
            return found
    return None


def export(
    model_or_dir: nn.Module | str | os.PathLike,
    out: str | os.PathLike,
    format: str = "hf",
    dtype: str | None = None,
    tokenizer=None,
    overwrite: bool = False,
    tokenizer_gguf: str | os.PathLike | None = None,
) -> ExportSummary:
    """Export a (compressed) model for other runtimes; see the module docstring.

    Args:
        model_or_dir: a model, or a directory (factorlm-compressed or plain) loaded with its
            tokenizer.
        out: the output directory (``hf``), or the ``.gguf`` file (``gguf``; a path without the
            suffix is a directory that gets ``model-<dtype>.gguf``).
        format: ``"hf"`` or ``"gguf"``.
        dtype: ``hf``: f32 / f16 / bf16 (default: the model's); ``gguf``: f16 (default), q8_0, f32.
        tokenizer: the tokenizer when a model object is given.
        tokenizer_gguf: a GGUF file whose tokenizer is copied into the GGUF export (default: the
            source GGUF of the embedded default model, when the model came from it).
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: use {' or '.join(FORMATS)}")
    if isinstance(model_or_dir, nn.Module):
        model = model_or_dir
    else:
        from factorlm.io.gguf_export import gguf_path
        from factorlm.io.hub import load_model

        target = gguf_path(out, dtype or "f16") if format == "gguf" else out
        check_out_apart(target, model_or_dir)  # before loading

        model, loaded_tok = load_model(model_or_dir)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    if quantization_of(model) is not None:
        raise ConfigError(
            "the model has int8/int4 quantized layers: export the model from before --quantize "
            "(--format gguf --dtype q8_0 quantizes for llama.cpp)"
        )
    if format == "gguf" and tokenizer_gguf is None:
        tokenizer_gguf = _source_gguf(model, model_or_dir)
    with unfused(model):  # stacked first factors are a speed layout, not a format
        if format == "hf":
            summary = export_hf(model, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
        else:
            from factorlm.io.gguf_export import export_gguf

            summary = export_gguf(
                model,
                out,
                tokenizer=tokenizer,
                dtype=dtype or "f16",
                overwrite=overwrite,
                tokenizer_gguf=tokenizer_gguf,
            )
    for line in summary.lines():
        log.info("%s", line)
    return summary
