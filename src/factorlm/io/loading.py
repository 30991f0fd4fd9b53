"""``factorlm.load``: rebuild a compressed model from its directory, no re-computation, no pickle."""

from __future__ import annotations

import os

import torch
from torch import nn

from factorlm.errors import FormatError
from factorlm.io.format import SaveFormatError, parse_dtype
from factorlm.nn.modeling_factorlm import load_factorlm_dir


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device=None,
    fuse: bool = False,
) -> nn.Module:
    """Load a directory written by :func:`factorlm.save`.

    ``fuse=True`` stacks the first factors of linears that read the same input (q/k/v, gate/up)
    into one matmul for faster inference (:func:`factorlm.nn.fused.fuse`; logits unchanged).
    """
    path = str(path)
    if not os.path.exists(path):
        raise FormatError(f"no such directory: {path}")
    if not os.path.isdir(path):
        raise FormatError(f"{path} is not a directory")
    dtype = parse_dtype(dtype)
    try:
        model = load_factorlm_dir(path, dtype=dtype, device=device)
    except SaveFormatError as e:
        raise FormatError(f"{path}: {_first_line(e)}" if path not in str(e) else str(e)) from e
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise FormatError(f"{path}: cannot load ({type(e).__name__}: {_first_line(e)})") from e
    if fuse:
        from factorlm.nn.fused import fuse as _fuse

        _fuse(model)
    return model
