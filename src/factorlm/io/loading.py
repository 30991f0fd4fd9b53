"""``factorlm.load``: rebuild a compressed model from its directory, no re-computation, no pickle."""

from __future__ import annotations

import os

import torch
from torch import nn

from factorlm.errors import FormatError
from factorlm.nn.modeling_factorlm import FactorLMFormatError, load_factorlm_dir


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None) -> nn.Module:
    """Load a directory written by :func:`factorlm.save`."""
    path = str(path)
    if not os.path.exists(path):
        raise FormatError(f"no such directory: {path}")
    if not os.path.isdir(path):
        raise FormatError(f"{path} is not a directory")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        return load_factorlm_dir(path, dtype=dtype, device=device)
    except FactorLMFormatError as e:
        raise FormatError(str(e)) from e
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{path}: cannot load ({type(e).__name__}: {e})") from e
