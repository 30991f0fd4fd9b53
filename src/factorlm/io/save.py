"""Saving: a normal Hugging Face directory, written atomically.

Layout: ``config.json`` (original config + versioned ``factorlm`` block + ``auto_map``),
``model.safetensors`` (each factorized layer is two weights ``A.weight`` / ``B.weight``),
tokenizer files, ``modeling_factorlm.py`` + ``lowrank.py`` + ``experts.py`` + ``factorlm_format.py``
(generic loader for ``trust_remote_code=True``; the block's schema is :mod:`factorlm.io.format`), ``recipe.json`` and ``report.json``/``report.md``.
Everything is written into a temporary sibling directory that is renamed into place at the end, so
a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from factorlm.errors import NumericalError, OutputExistsError
from factorlm.io import format as fmt
from factorlm.io.structure import structure_of
from factorlm.nn import modeling_factorlm

log = logging.getLogger(__name__)

#: the generic loader and what it imports, copied into every saved directory (source -> name there)
BUNDLED = {
    Path(modeling_factorlm.__file__).parent / name: name
    for name in ("modeling_factorlm.py", "lowrank.py", "experts.py", "quantized.py", "slots.py")
}
BUNDLED[Path(fmt.__file__)] = fmt.BUNDLED_NAME


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output directory {out} exists and is not empty (use --overwrite / overwrite=True)"
        )
    return out


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied duplicates (safetensors refuses shared storage)."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else (id(v),)
        if v.numel() and key in seen:
            continue
        if v.numel():
            seen[key] = k
        out[k] = v.detach().to("cpu").contiguous()
    return out


def factorlm_block(
    model: nn.Module, report=None, recipe: dict[str, Any] | None = None
) -> dict[str, Any]:
    from factorlm.quantization import quantization_of

    info: dict[str, Any] = {}
    if report is not None:
        info.update(
            method=report.method,
            ratio=report.ratio,
            achieved_ratio=report.achieved_ratio,
            allocation=report.allocation,
            options=report.options,
            config=report.config,
            run=report.run,
            ranks=report.ranks,
            pruned_widths=report.widths,
            calibration=report.calibration,
            params_total=report.params_total_after,
        )
    if recipe is not None:
        info["recipe"] = recipe
    return fmt.make_block(
        structure_of(model), next(model.parameters()).dtype, info, quantization_of(model)
    )


def _apply_umask(directory: Path) -> None:
    """``mkdtemp`` creates a 0700 directory: give the result the usual umask-based permissions."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for p in directory.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~mask)


def _check_finite(state: dict[str, torch.Tensor]) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NumericalError(
                f"{k.rpartition('.')[0] or k}: tensor {k} contains NaN or Inf; refusing to save "
                "a model that could not be loaded back"
            )


def _write_report_md(report, directory: Path) -> None:
    try:
        from factorlm.report.render import write_report
    except ImportError:
        return
    write_report(report, directory)


def _atomic_move(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    report=None,
    recipe: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (compressed or not) to ``out_dir`` atomically; returns the final path.

    A model with stacked first factors (:func:`factorlm.nn.fused.fuse`) is written unfused (the
    format does not change) and is fused again afterwards.
    """
    from factorlm.nn.fused import unfused

    with unfused(model):
        return _save(model, out_dir, tokenizer, report, recipe, overwrite)


def _save(model, out_dir, tokenizer, report, recipe, overwrite) -> Path:
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        block = factorlm_block(model, report, recipe)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        if not cfg.get("architectures"):
            cfg["architectures"] = [type(model).__name__]
        cfg[fmt.CONFIG_KEY] = block
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_factorlm.FactorLMForCausalLM"}
        state = unique_state_dict(model)
        _check_finite(state)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for src, name in BUNDLED.items():
            shutil.copyfile(src, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(str(tmp))
            except (
                Exception
            ) as e:  # pragma: no cover - invalid generation configs of some checkpoints
                log.warning("generation config not saved: %s", e)
        if recipe is not None:
            (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
        if report is not None:
            (tmp / "report.json").write_text(report.to_json())
            _write_report_md(report, tmp)
        # config.json last: a directory without it is never mistaken for a model
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        _apply_umask(tmp)
        _atomic_move(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s", out)
    return out
