"""Return to the OS the pages of replaced weights that live in a memory-mapped checkpoint.

``from_pretrained`` memory-maps safetensors files (a private, copy-on-write mapping of the whole
file). A weight that compression replaces by its factors is dropped by the model, but its pages
stay resident for as long as any other tensor of the file lives: the process would hold the dense
original *and* the factors. ``MADV_DONTNEED`` on the pages that lie wholly inside the dropped
tensor hands them back; a later read of that tensor (nobody in factorlm does) would fault them in
again from the file. Anonymous memory (a model built or copied in memory) is never touched: its
storage is freed normally when the last reference goes.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys

import torch

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_libc = None


def trim_heap() -> None:
    """Give the free memory of the C heap back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    The CPU tensors of a block's forward passes (tens of MB each) come and go from malloc's heaps,
    worker threads each get their own heap, and glibc keeps what was freed: without this the
    process would keep the high-water mark of every block's temporaries resident."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None)
        trim = _libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl...): nothing to do
        _libc = False
        return
    trim(0)


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of regular files."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6 or not parts[1].endswith("p") or parts[4] == "0":
                continue
            if not parts[5].startswith("/"):
                continue
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out.append((a, b))
    return out


def release_mapped_pages(tensors: list[torch.Tensor]) -> int:
    """Give back the whole pages of ``tensors`` that are file-backed; returns the bytes released.

    Call it only on tensors that are no longer used (a replaced weight)."""
    if not sys.platform.startswith("linux"):
        return 0
    cpu = [t for t in tensors if t is not None and t.device.type == "cpu" and t.numel() > 0]
    if not cpu:
        return 0
    try:
        maps = _file_mappings()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no procfs / libc
        return 0
    page = mmap.PAGESIZE
    released = 0
    for t in cpu:
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(a <= start and end <= b for a, b in maps):
            continue
        lo = -(-start // page) * page
        hi = (end // page) * page
        if hi <= lo:
            continue
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0:
            released += hi - lo
        else:  # pragma: no cover - the kernel refused: nothing lost but memory
            log.debug("madvise failed (errno %d)", ctypes.get_errno())
    return released
