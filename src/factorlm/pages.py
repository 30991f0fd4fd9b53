"""Return to the OS the pages of weights that live in a memory-mapped checkpoint.

``from_pretrained`` memory-maps safetensors files (a private, copy-on-write mapping of the whole
file). A weight that compression replaces by its factors is dropped by the model, but its pages
stay resident for as long as any other tensor of the file lives: the process would hold the dense
original *and* the factors.

Only *clean* pages are ever handed back (``MADV_DONTNEED``): a page that still holds the file's
bytes (``/proc/self/pagemap`` says it is file-backed, i.e. nobody wrote to it) is re-read from
the page cache on the next access, so the tensor keeps its values whoever reads it later. A page
written to since the mapping (copy-on-write: an adapter merged in place, an edited weight) is
anonymous memory, and ``MADV_DONTNEED`` on it would silently bring back the file's original
bytes: it is never released. Anonymous memory (a model built or copied in memory) is never
touched: its storage is freed normally when the last reference goes.

* :func:`release_clean_pages`: for weights still in use, so that reading a whole model once (the
  NaN/Inf check, the embeddings at capture) does not leave all of it resident;
* :func:`release_dropped_pages`: for weights a compression replaced, skipping any whose storage
  another tensor still shares (distillation keeps the dense weights as aliases and reads them
  after the replacement: releasing them would only make it fault them in again).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct
import sys

import torch

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.malloc_trim  # noqa: B018  (AttributeError: not glibc)
        except (OSError, AttributeError):  # not glibc (musl...): nothing to do
            _libc = False
    return _libc or None


def trim_heap() -> None:
    """Give the free memory of the C heap back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    The CPU tensors of a block's forward passes (tens of MB each) come and go from malloc's heaps,
    worker threads each get their own heap, and glibc keeps what was freed: without this the
    process would keep the high-water mark of every block's temporaries resident."""
    if sys.platform.startswith("linux") and (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def file_mappings() -> list[tuple[int, int]]:
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


def _mapped_spans(
    tensors: list[torch.Tensor], maps: list[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """[lo, hi) of the whole pages of each CPU tensor in ``tensors`` that lies in a private file
    mapping (``maps``: :func:`file_mappings`, read here when not given); [] off Linux."""
    if not sys.platform.startswith("linux"):
        return []
    cpu = [t for t in tensors if t is not None and t.device.type == "cpu" and t.numel() > 0]
    if not cpu:
        return []
    try:
        maps = file_mappings() if maps is None else maps
    except OSError:  # pragma: no cover - no procfs
        return []
    page = mmap.PAGESIZE
    spans = []
    for t in cpu:
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(a <= start and end <= b for a, b in maps):
            continue
        lo, hi = -(-start // page) * page, (end // page) * page
        if hi > lo:
            spans.append((lo, hi))
    return spans


def _madvise_libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no libc
        return None


def _shared_elsewhere(t: torch.Tensor) -> bool:
    """Whether another tensor (a ``detach()``/view alias, not ``t`` itself) uses ``t``'s storage.
    True when the count is not available: then nothing is released."""
    try:
        storage = t.untyped_storage()
        users = torch._C._storage_Use_Count(storage._cdata)
    except (AttributeError, RuntimeError):  # pragma: no cover - private API moved
        return True
    return users > 2  # ``t`` and the ``storage`` object just made


def release_dropped_pages(tensors: list[torch.Tensor]) -> int:
    """Hand back the clean file-backed pages of weights that were dropped (a replaced linear's),
    unless another tensor still shares their storage; returns the bytes released."""
    return release_clean_pages([t for t in tensors if t is not None and not _shared_elsewhere(t)])


def _dontneed(libc, lo: int, hi: int) -> int:
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0:
        return hi - lo
    log.debug("madvise failed (errno %d)", ctypes.get_errno())  # pragma: no cover
    return 0  # pragma: no cover - the kernel refused: nothing lost but memory


def _clean_runs(pagemap, lo: int, hi: int) -> list[tuple[int, int]]:
    """Runs of pages in [lo, hi) that are present and file-backed (never written: bit 61 of
    their pagemap entry; a copy-on-write page is anonymous and keeps it clear)."""
    page = mmap.PAGESIZE
    n = (hi - lo) // page
    pagemap.seek(lo // page * 8)
    raw = pagemap.read(n * 8)
    if len(raw) != n * 8:
        return []
    runs: list[tuple[int, int]] = []
    start = None
    for i, v in enumerate(struct.unpack(f"{n}Q", raw)):
        clean = (v >> 63) & 1 and (v >> 61) & 1
        if clean and start is None:
            start = i
        elif not clean and start is not None:
            runs.append((lo + start * page, lo + i * page))
            start = None
    if start is not None:
        runs.append((lo + start * page, hi))
    return runs


def release_clean_pages(
    tensors: list[torch.Tensor], maps: list[tuple[int, int]] | None = None
) -> int:
    """Give back the pages of file-mapped ``tensors`` that still hold the file's bytes; the
    tensors stay valid (those pages fault back in from the page cache when read again). Pages
    written to since the mapping (copy-on-write) are kept. Returns the bytes released.
    ``maps``: :func:`file_mappings` read once by a caller that releases piece by piece."""
    spans = _mapped_spans(tensors, maps)
    libc = _madvise_libc() if spans else None
    if libc is None:
        return 0
    released = 0
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for lo, hi in spans:
                for a, b in _clean_runs(pagemap, lo, hi):
                    released += _dontneed(libc, a, b)
    except OSError:  # pragma: no cover - pagemap not readable here
        pass
    return released
