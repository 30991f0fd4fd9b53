"""Small helpers: device moves of nested structures, memory probes, atomic writes."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from typing import Any

import torch


def autocast_off(device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device``'s type (where autocast exists there): for matmuls that run
    inside an autocast region but must keep their inputs' precision (float64 statistics, logits)."""
    kind = torch.device(device).type
    if torch.amp.is_autocast_available(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


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


class RSSSampler:
    """Peak resident memory of this process during a ``with`` block (sampled every ``interval`` s).

    ``ru_maxrss`` only ever grows, so it cannot tell the peak of one phase of a long process (a
    compression after an evaluation, several runs in one benchmark); this can.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = None
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss_bytes())

    def __enter__(self) -> RSSSampler:
        import threading

        self.peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="factorlm-rss")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def measure_peak_rss(fn):
    """Decorator for functions returning a Report: sets ``report.peak_rss_bytes`` to the peak
    resident memory during the call."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with RSSSampler() as rss:
            report = fn(*args, **kwargs)
        report.peak_rss_bytes = rss.peak
        return report

    return wrapper
