"""Several processes (GPUs, machines) compressing one model together, with ``torch.distributed``.

Launch the usual way, one process per GPU (``--nnodes``/``--node_rank``/``--rdzv_endpoint`` for
several machines)::

    torchrun --nproc_per_node 8 my_script.py      # my_script calls factorlm.compress(...)

:func:`factorlm.compress` calls :func:`init_from_env`, which starts the process group when
``WORLD_SIZE > 1`` (NCCL for a CUDA compute device, gloo on CPU) unless the caller already did.
With one process every helper here is a no-op, so the single-process path never touches
``torch.distributed``.

How the work is split (every process holds the whole model, offloaded; one block on its device):

* calibration: process ``r`` keeps the batches ``i`` with ``i % world == r`` (:func:`shard`);
* statistics: right after a block's statistics pass the :class:`LayerStats` sums are all-reduced
  (``abs_max`` with MAX), so every process holds the statistics of *all* calibration tokens and
  anything derived from them (spectra, global ranks, factors) is the single-process result up to
  float summation order;
* factorizations: a block's matrices are spread over the processes, greedy longest-processing-time
  on the cost ``m n min(m, n)`` (:func:`assign`); each result is broadcast from the process that
  computed it (:func:`spread`), so every process ends with the very same compressed block. The
  one-pass pipeline compresses a block's linears a few at a time (those reading one input
  together, e.g. q/k/v): each group is spread, and the load carries over the block. The report's
  ``ModuleRecord.computed_by`` names the process of each factorization;
* training (distillation): data parallel; :func:`allreduce_grads` averages gradients;
* output: only :func:`is_main` (rank 0) writes.
"""

from __future__ import annotations

import logging
import os
import pickle
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from factorlm.calibration.stats import STAT_FIELDS
from factorlm.errors import CalibrationError, FactorLMError

log = logging.getLogger(__name__)

T = TypeVar("T")
J = TypeVar("J")


def is_dist() -> bool:
    """True when torch.distributed is initialized with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def local_rank() -> int:
    """This process's index on its machine: ``LOCAL_RANK`` under torchrun (``WORLD_SIZE > 1``),
    readable before the process group starts (0 when single)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def launched_world_size() -> int:
    """Processes of this run: the process group's size, or torchrun's WORLD_SIZE before it
    starts (1 when not launched)."""
    return world_size() if is_dist() else max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 when not launched)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1) if launched() else 1


def launched() -> bool:
    """Whether torchrun started several processes (``WORLD_SIZE > 1``), initialised or not yet."""
    return launched_world_size() > 1


def is_main() -> bool:
    """Whether this process should write outputs (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def init_from_env(device: Any = None) -> bool:
    """Start the process group when launched by torchrun (``WORLD_SIZE > 1``) and nobody did yet.

    Backend: NCCL when the compute device is CUDA, gloo otherwise. Returns :func:`is_dist`.
    """
    if not dist.is_available():
        return False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device(device) if device is not None else None
        cuda = dev is not None and dev.type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        log.info("torch.distributed: rank %d of %d", dist.get_rank(), dist.get_world_size())
    return is_dist()


def resolve_device(device: Any) -> Any:
    """``cuda`` without an index means this process's GPU (``cuda:LOCAL_RANK``) under torchrun;
    read from the environment, so it is right before anything is put on a device."""
    if device is None or not launched():
        return device
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank())
    return dev


def default_device() -> torch.device:
    """The compute device when none is given: this process's GPU if CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank()) if launched() else torch.device("cuda")
    return torch.device("cpu")


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_comm(t: torch.Tensor) -> torch.Tensor:
    dev = _comm_device()
    return t if t.device == dev and t.is_contiguous() else t.to(dev).contiguous()


def _all_reduce_(t: torch.Tensor, op=None) -> None:
    """In-place all-reduce of ``t`` (through the backend's device when ``t`` lives elsewhere)."""
    op = dist.ReduceOp.SUM if op is None else op
    c = _on_comm(t)
    dist.all_reduce(c, op=op)
    if c is not t:
        t.copy_(c)


def all_sum_tensor_(t: torch.Tensor) -> None:
    """Sum ``t`` over the processes, in place (nothing to do in a single process)."""
    if is_dist():
        _all_reduce_(t)


# --- data ------------------------------------------------------------------------------------------


def shard(items: Sequence[T]) -> list[T]:
    """This process's share: items ``i`` with ``i % world == rank`` (everything when single)."""
    items = list(items)
    if not is_dist():
        return items
    w = world_size()
    if len(items) < w:
        raise CalibrationError(
            f"{len(items)} calibration batches for {w} processes: every process needs at least one "
            "(more samples or a smaller batch_size)"
        )
    return items[rank() :: w]


def all_sum(values: Iterable[float]) -> list[float]:
    """Sum a few floats over the processes (float64)."""
    values = list(values)
    if not is_dist():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    _all_reduce_(t)
    return t.tolist()


def all_min(value: int) -> int:
    """The smallest ``value`` over the processes (e.g. a number of training steps all can take)."""
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    _all_reduce_(t, dist.ReduceOp.MIN)
    return int(t)


# --- statistics ------------------------------------------------------------------------------------

_STAT_FIELDS = STAT_FIELDS


def _check_same(what: str, text: str) -> None:
    h = zlib.crc32(text.encode())
    t = torch.tensor([h, -h], dtype=torch.int64)
    _all_reduce_(t, dist.ReduceOp.MAX)
    if int(t[0]) != h or int(t[1]) != -h:
        raise FactorLMError(f"{what} differs between processes (rank {rank()}: {text[:200]})")


def check_same(what: str, text: str) -> None:
    """Raise :class:`FactorLMError` on every process unless ``text`` is the same on all."""
    if is_dist():
        _check_same(what, text)


def allreduce_stats(stats: dict, shapes: dict[str, tuple[int, int]]) -> None:
    """Sum every :class:`LayerStats` of a block over the processes, in place.

    ``stats``: {name: LayerStats} (modules reading the same input share one object);
    ``shapes``: {name: (out, in)} of the matching linears, to build the zeros of a process that saw
    no token for a layer (an unrouted expert). Afterwards every process holds the same sums.
    """
    if not is_dist():
        return
    groups: dict[int, list[str]] = {}
    for name in stats:
        groups.setdefault(id(stats[name]), []).append(name)
    owners = [names[0] for names in groups.values()]
    _check_same("the set of statistics of a block", repr(list(groups.values())))
    unique = [stats[n] for n in owners]
    counts = torch.tensor([s.n_tokens for s in unique], dtype=torch.int64)
    _all_reduce_(counts)
    present = torch.tensor(
        [[getattr(s, f) is not None for f in _STAT_FIELDS] for s in unique], dtype=torch.int64
    )
    _all_reduce_(present, dist.ReduceOp.MAX)
    device = next((t.device for s in unique for t in s.tensors().values()), torch.device("cpu"))
    for name, s, n_tok, flags in zip(
        owners, unique, counts.tolist(), present.tolist(), strict=True
    ):
        s.n_tokens = int(n_tok)
        m, n = shapes[name]
        for field, flag in zip(_STAT_FIELDS, flags, strict=True):
            if not flag:
                continue
            t = getattr(s, field)
            if t is None:
                shape = (
                    (n, n)
                    if field in ("gram", "cross", "gram_dense")
                    else (m,)
                    if field == "fisher_rows"
                    else (n,)
                )
                t = torch.zeros(shape, dtype=torch.float64, device=device)
                setattr(s, field, t)
            op = dist.ReduceOp.MAX if field == "abs_max" else dist.ReduceOp.SUM
            _all_reduce_(t, op)


# --- spreading work --------------------------------------------------------------------------------


def assign(
    costs: Sequence[float], world: int | None = None, load: list[float] | None = None
) -> list[int]:
    """Owner process of each job: longest-processing-time first, each to the least-loaded process.

    Deterministic (ties: lower index, lower rank), so every process computes the same assignment.
    ``load``: the work each process already has (e.g. from earlier jobs of the same block, when
    they come a few at a time); updated in place.
    """
    world = world_size() if world is None else world
    load = [0.0] * world if load is None else load
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += float(costs[i])
    return owner


def matrix_cost(m: int, n: int) -> float:
    """Relative cost of factorizing an m x n matrix (SVD-like: m n min(m, n))."""
    return float(m) * n * min(m, n)


def _portable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return FactorLMError(f"{type(exc).__name__}: {exc}")


def spread(
    jobs: Sequence[J],
    costs: Sequence[float],
    compute: Callable[[J], T],
    pack: Callable[[T], tuple[list[torch.Tensor], Any]],
    unpack: Callable[[J, list[torch.Tensor], Any], T],
    device: Any = None,
    owners: Sequence[int] | None = None,
) -> list[T]:
    """``[compute(j) for j in jobs]``, each job computed by one process and shared with all.

    Single process: exactly that list comprehension. Distributed: the owner of a job
    (``owners``, by default :func:`assign` of ``costs``) computes it, ``pack(result) -> (tensors,
    picklable meta)`` is broadcast and the other processes rebuild the result with
    ``unpack(job, tensors, meta)`` (tensors on ``device``). An exception in a job is re-raised on
    every process, at the same job.
    """
    if not is_dist():
        return [compute(j) for j in jobs]
    me = rank()
    owner = list(assign(costs) if owners is None else owners)
    mine: dict[int, Any] = {}
    for i, job in enumerate(jobs):
        if owner[i] == me:
            try:
                mine[i] = compute(job)
            except Exception as e:  # raised on every process below
                mine[i] = _Failed(e)
    out: list[T] = []
    for i, job in enumerate(jobs):
        src = owner[i]
        header: list[Any] = [None]
        tensors: list[torch.Tensor] = []
        if src == me:
            res = mine.pop(i)
            if isinstance(res, _Failed):
                header[0] = ("error", _portable(res.exc))
            else:
                tensors, meta = pack(res)
                header[0] = ("ok", [(tuple(t.shape), t.dtype) for t in tensors], meta)
        dist.broadcast_object_list(header, src=src)
        if header[0][0] == "error":
            if src == me:
                raise res.exc
            raise header[0][1]
        _, specs, meta = header[0]
        if src == me:
            for t in tensors:
                dist.broadcast(_on_comm(t), src=src)
            out.append(res)
            continue
        received = []
        for shape, dtype in specs:
            buf = torch.empty(shape, dtype=dtype, device=_comm_device())
            dist.broadcast(buf, src=src)
            received.append(buf if device is None else buf.to(device))
        out.append(unpack(job, received, meta))
    return out


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


# --- training ---------------------------------------------------------------------------------------


#: elements per flattened buffer of :func:`allreduce_grads` (a 7B model's gradients are never
#: copied whole: 2^26 elements, 128 MiB in bf16)
BUCKET_ELEMENTS = 1 << 26


def allreduce_grads(params: Iterable[torch.nn.Parameter], average: bool = True) -> None:
    """Data parallelism by hand: sum (or average) the gradients of ``params`` over the processes.

    Call after ``backward()`` and before ``optimizer.step()``. Parameters without a gradient get
    zeros first, so every process takes part in the same collectives. Gradients are flattened into
    buffers per dtype and device of at most :data:`BUCKET_ELEMENTS` (or one gradient; one
    collective each).
    """
    if not is_dist():
        return
    params = [p for p in params if p.requires_grad]
    by_kind: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    buckets: list[list[torch.nn.Parameter]] = []
    for kind in by_kind.values():
        size = BUCKET_ELEMENTS
        for p in kind:
            if size + p.numel() > BUCKET_ELEMENTS:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += p.numel()
    w = world_size()
    for group in buckets:
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        _all_reduce_(flat)
        if average:
            flat /= w
        offset = 0
        for p in group:
            k = p.grad.numel()
            p.grad.copy_(flat[offset : offset + k].view_as(p.grad))
            offset += k


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from process ``src`` to all (in place)."""
    if not is_dist():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        c = _on_comm(t.data)
        dist.broadcast(c, src=src)
        if c is not t.data:
            t.data.copy_(c)


def broadcast_from_owners(tensors: Sequence[torch.Tensor], owners: Sequence[int]) -> None:
    """Each tensor, in place, becomes its owner process's (one broadcast each, in order)."""
    if not is_dist():
        return
    for t, owner in zip(tensors, owners, strict=True):
        c = _on_comm(t)
        dist.broadcast(c, src=int(owner))
        if c is not t:
            t.copy_(c)
