"""Cheap checks of user input that run before any heavy work (no model is loaded here). The
methods' option values are checked by their configs (:mod:`factorlm.methods.config`).

* :func:`check_device`: ``--device`` parses and exists;
* :func:`checkpoint_tensors` / :func:`check_rank_fits`: the shapes of a local checkpoint, read from
  the safetensors headers only, and a fixed rank checked against its target layers;
* :func:`check_finite_weights`: NaN/Inf in a loaded model's parameters, named.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlm.errors import ConfigError, NumericalError
from factorlm.io.format import has_block

log = logging.getLogger(__name__)


def check_device(device: Any) -> None:
    """``device`` parses as a torch device and is present on this machine."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"invalid device {device!r}: use cpu, cuda, cuda:1, mps ...") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available on this machine")


_ST_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 2**20:
            raise ValueError("header too large")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def checkpoint_tensors(
    model_dir: str | os.PathLike,
) -> dict[str, tuple[tuple[int, ...], int]] | None:
    """{name: (shape, bytes per element)} of a local safetensors checkpoint, from the headers only.

    None when ``model_dir`` is not a directory with readable safetensors files.
    """
    d = Path(model_dir)
    if not d.is_dir():
        return None
    files = sorted(d.glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    try:
        for f in files:
            for name, info in _safetensors_header(f).items():
                out[name] = (tuple(info["shape"]), _ST_DTYPE_BYTES.get(info["dtype"], 4))
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        log.debug("cannot read the safetensors headers in %s: %s", d, e)
        return None
    return out


def read_config(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    try:
        with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def check_rank_fits(model_dir: str | os.PathLike, rank: int) -> None:
    """A fixed rank must fit every targeted layer of the (local, safetensors) checkpoint.

    Checks what it can from the headers; a checkpoint it cannot read is checked after loading.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    cfg = read_config(model_dir)
    tensors = checkpoint_tensors(model_dir)
    if cfg is None or tensors is None or has_block(cfg):
        return
    from factorlm.arch.match import match
    from factorlm.arch.registry import ARCHITECTURES

    spec = ARCHITECTURES.get(cfg.get("model_type"))
    if spec is None:
        return
    prefix = spec.blocks + "."
    pats = spec.patterns()
    for name, (shape, _) in tensors.items():
        if not name.startswith(prefix) or not name.endswith(".weight") or len(shape) != 2:
            continue
        rel = name[len(prefix) :].partition(".")[2].removesuffix(".weight")
        if any(match(p, rel) for p in pats) and rank > min(shape):
            m, n = shape
            raise ConfigError(
                f"rank {rank} is larger than layer {name.removesuffix('.weight')} allows "
                f"({m}x{n}: at most {min(m, n)})"
            )


def check_finite_weights(model: nn.Module, chunk: int = 1 << 22) -> None:
    """Raise :class:`NumericalError` naming the first parameter that holds NaN or Inf.

    Reading a memory-mapped checkpoint's weights makes them resident; their clean pages are handed
    back after the check (see :func:`factorlm.pages.release_clean_pages`), so the check does not
    raise the compression's peak memory by a whole model."""
    from factorlm.pages import file_mappings, release_clean_pages

    maps = file_mappings()
    for name, t in model.named_parameters():
        if not t.is_floating_point() or not t.numel():
            continue
        bad = False
        for part in t.detach().reshape(-1).split(chunk):  # bounded temporaries
            bad = bad or not bool(torch.isfinite(part).all())
            release_clean_pages([part], maps)
        if bad:
            n_bad = int((~torch.isfinite(t)).sum())
            layer = name.rpartition(".")[0] or name
            raise NumericalError(
                f"{layer}: weight {name} contains {n_bad} NaN/Inf value(s); the model is corrupt "
                "(re-download or re-convert it)"
            )
