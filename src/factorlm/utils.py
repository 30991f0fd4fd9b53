"""Small helpers: device moves of nested structures, memory probes, atomic writes."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import torch


def to_device(obj: Any, device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_device(v, device) for v in obj)
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru if sys.platform == "darwin" else ru * 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover
        return peak_rss_bytes()


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def reset_device_peak(device) -> None:
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_bytes(device) -> int | None:
    if _is_cuda(device):
        return int(torch.cuda.max_memory_allocated(device))
    return None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
