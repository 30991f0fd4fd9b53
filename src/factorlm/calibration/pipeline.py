"""The sequential block-by-block pipeline shared by every method.

1. Run the calibration batches through the model up to the first block and keep that block's
   inputs (hidden states + keyword arguments such as position embeddings) on the offload device.
2. For each block: move it to the compute device; run it on its inputs with statistics hooks
   (one calibration pass); let the method compress it; recompute its outputs with the compressed
   block (``sequential=True``) or keep the dense outputs, and feed them to the next block; move
   the block back. Only one block sits on the compute device at a time.
3. Optionally checkpoint after each block (compressed weights + the next block's inputs), so a
   killed run resumes where it stopped and produces the same model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from factorlm import distributed
from factorlm.arch.modules import block_targets, get_blocks, linear_shape, set_submodule
from factorlm.arch.registry import ArchSpec
from factorlm.calibration.staged import StagedPass, StagedUnsupported
from factorlm.calibration.stats import LayerStats, StatsCollector
from factorlm.pages import release_clean_pages, trim_heap
from factorlm.report.schema import BlockRecord, Report
from factorlm.utils import peak_device_bytes, peak_rss_bytes, reset_device_peak, to_device

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@dataclass
class Streams:
    """Activations entering the current block, one tensor per calibration batch (offload device)."""

    student: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    teacher: list[torch.Tensor] | None = None


def capture_block_inputs(
    model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor], device, offload="cpu"
) -> Streams:
    """Run the batches up to the first block and record its inputs (args + kwargs).

    Only what runs before the first block visits ``device`` (embeddings, rotary tables...; not an
    untied LM head) and it goes back to ``offload`` afterwards.
    """
    blocks = get_blocks(model, spec)
    hidden, kwargs = [], []

    def hook(_mod, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.detach().to(offload))
        kw = {k: v for k, v in kw.items() if k != "hidden_states"}
        kwargs.append(to_device(kw, offload))
        raise _StopForward

    outside = _outside_slots(model, blocks)
    moved = _move_slots(outside, device)
    blocks[0].to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        if moved:
            _move_slots(moved, offload)
            blocks[0].to(offload)
    # the embedding rows just read (a memory-mapped checkpoint's pages) are not needed again
    release_clean_pages([getattr(m, k) for m, k, _ in outside])
    return Streams(student=hidden, kwargs=kwargs)


_Slot = tuple[nn.Module, str, bool]  # (module, tensor name, is a parameter)


def _outside_slots(model: nn.Module, blocks: nn.ModuleList) -> list[_Slot]:
    """Every parameter/buffer slot outside the blocks, except an untied LM head (unused here)."""
    skip = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    try:
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        head = emb = None
    if head is not None:
        tied = {id(p) for p in emb.parameters()} if emb is not None else set()
        skip |= {id(p) for p in head.parameters()} - tied
    slots = []
    for mod in model.modules():
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for k, t in table.items():
                if t is not None and id(t) not in skip:
                    slots.append((mod, k, is_param))
    return slots


def _move_slots(slots: list[_Slot], device) -> list[_Slot]:
    """Move the tensors of ``slots`` to ``device``; a tensor in several slots (tied weights) is
    moved once and stays shared. Returns the slots that actually moved."""
    new_of: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # id -> (old kept alive, new)
    moved = []
    for mod, name, is_param in slots:
        table = mod._parameters if is_param else mod._buffers
        t = table[name]
        if id(t) not in new_of:
            new = t.to(device)
            if new is t:
                new = None
            elif is_param:
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            new_of[id(t)] = (t, new)
        new = new_of[id(t)][1]
        if new is not None:
            table[name] = new
            moved.append((mod, name, is_param))
    return moved


def calib_autocast(device, autocast: torch.dtype | None):
    """The calibration passes' autocast on ``device``: matmuls in ``autocast`` (None: off)."""
    dev_type = torch.device(device).type
    return torch.autocast(dev_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None)


def run_block(
    block: nn.Module,
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    device,
    offload="cpu",
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """One block on one batch; ``autocast`` (e.g. torch.bfloat16) runs its matmuls in that dtype."""
    with calib_autocast(device, autocast):
        out = block(hidden.to(device), **to_device(kwargs, device))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().to(offload)


@dataclass
class BlockContext:
    """Everything a method sees while compressing one block."""

    index: int
    prefix: str  # full name of the block, e.g. "model.layers.3"
    block: nn.Module
    spec: ArchSpec
    targets: dict[str, nn.Module]
    stats: dict[str, LayerStats]
    streams: Streams
    # dense block applied to the student stream: every batch for distillation (teacher stream) and
    # sequential=False, else only the first batch (the error estimate)
    dense_outputs: list[torch.Tensor]
    teacher_outputs: list[torch.Tensor] | None  # dense block applied to the teacher stream
    device: Any
    offload: Any
    report: Report
    extra: dict[str, Any] = field(default_factory=dict)
    autocast: torch.dtype | None = (
        None  # dtype of the calibration forward passes' matmuls (None: the weights')
    )
    # set by a compressor that computed the compressed block's outputs on every batch of
    # ``streams.student`` itself (sequential pipeline): no pass computes them again
    outputs: list[torch.Tensor] | None = None

    def forward(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [
                run_block(self.block, h, kw, self.device, self.offload, self.autocast)
                for h, kw in zip(hidden, self.streams.kwargs, strict=True)
            ]


class BlockCompressor(Protocol):
    needs: frozenset[str]  # statistics to capture on the block's inputs
    teacher_stream: bool  # keep the dense model's activations too (distillation)

    def compress_block(self, ctx: BlockContext) -> None: ...


def _rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """sum ||a - b||^2 / sum ||b||^2 over the batches (of every process when distributed)."""
    num = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b, strict=True))
    den = sum(float(y.double().square().sum()) for y in b)
    num, den = distributed.all_sum([num, den])
    return num / den if den > 0 else 0.0


def run_pipeline(
    model: nn.Module,
    spec: ArchSpec,
    streams: Streams,
    compressor: BlockCompressor,
    report: Report,
    device=None,
    offload="cpu",
    sequential: bool = True,
    progress: bool = True,
    checkpoint: Callable[[int, Streams], None] | None = None,
    start_block: int = 0,
    desc: str = "compress",
    autocast: torch.dtype | None = None,
    one_pass: bool = True,
) -> Streams:
    """Compress blocks ``start_block..`` in order; returns the streams after the last block.

    ``streams`` is updated in place (its lists are replaced block after block), so no caller keeps
    the first block's inputs alive. Distributed (see :mod:`factorlm.distributed`): the streams
    are this process's shard and the statistics are all-reduced before ``compress_block``.
    """
    blocks = get_blocks(model, spec)
    device = device or next(model.parameters()).device
    if compressor.teacher_stream and streams.teacher is None:
        streams.teacher = [h.clone() for h in streams.student]
    # one calibration pass per block where the method and the architecture allow it; under
    # torchrun every process must take the same path (a process without batches cannot)
    staged = (
        one_pass
        and sequential
        and spec.single_pass
        and getattr(compressor, "per_module", False)
        and not compressor.teacher_stream
        and distributed.all_sum([0.0 if streams.student else 1.0])[0] == 0
    )
    report.calibration["passes_per_block"] = 1 if staged else 2
    run = _Run(spec, streams, compressor, report, device, offload, sequential, autocast)
    bar = tqdm(range(start_block, len(blocks)), desc=desc, unit="block", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        reset_device_peak(device)
        block = blocks[i]
        block.to(device)
        targets = block_targets(block, spec)
        if staged:
            rec = _one_pass_block(i, block, targets, run)
            if rec is None:  # the block's forward does not fit the one-pass schedule
                staged = False
                report.calibration["passes_per_block"] = 2
        if not staged:
            rec = _two_pass_block(i, block, targets, run)
        block.to(offload)
        trim_heap()  # this block's freed temporaries go back to the OS, not to the next peak
        rec.seconds = time.perf_counter() - t0
        rec.peak_device_bytes = peak_device_bytes(device)
        rec.peak_rss_bytes = peak_rss_bytes()
        report.blocks.append(rec)
        if rec.rel_output_error is not None:
            bar.set_postfix(err=f"{rec.rel_output_error:.2e}")
        del targets  # nothing of this block may stay on the device (e.g. the replaced linears)
        if checkpoint is not None:
            checkpoint(i, streams)
    return streams


@dataclass
class _Run:
    """What every block of one :func:`run_pipeline` call shares."""

    spec: ArchSpec
    streams: Streams
    compressor: BlockCompressor
    report: Report
    device: Any
    offload: Any
    sequential: bool
    autocast: torch.dtype | None
    # one-pass: {first linear: later linears reading the same input}, from the previous block
    together: dict[str, tuple[str, ...]] | None = None


def _one_pass_block(i: int, block: nn.Module, targets, run: _Run) -> BlockRecord | None:
    """Compress the block during one pass (see :mod:`factorlm.calibration.staged`); None if the
    block's forward does not call each target once (then nothing has changed)."""
    spec, streams, compressor, report = run.spec, run.streams, run.compressor, run.report
    device, offload, autocast = run.device, run.offload, run.autocast
    prefix = f"{spec.blocks}.{i}"
    shapes = {rel: linear_shape(m) for rel, m in targets.items()}
    ctx = BlockContext(
        index=i,
        prefix=prefix,
        block=block,
        spec=spec,
        targets=targets,
        stats={},
        streams=streams,
        dense_outputs=[],
        teacher_outputs=None,
        device=device,
        offload=offload,
        report=report,
        autocast=autocast,
    )

    def compress(rels: list[str], stats: LayerStats) -> None:
        for rel in rels:
            ctx.stats[rel] = stats
        compressor.compress_modules(ctx, rels)

    def reduce(rel: str, stats: LayerStats) -> None:
        distributed.allreduce_stats({rel: stats}, {rel: shapes[rel]})

    dev = torch.device(device)

    def run_one(h, kw):
        if dev.type == "cuda":  # worker threads start on the default CUDA device
            with torch.cuda.device(dev):
                return run_block(block, h, kw, device, offload, autocast)
        return run_block(block, h, kw, device, offload, autocast)

    # the error estimate: the first calibration batch (process 0's first), dense vs compressed
    first = distributed.rank() == 0
    with torch.no_grad():
        ref = [run_one(streams.student[0], streams.kwargs[0])] if first else []
    n_mod, n_warn = len(report.modules), len(report.warnings)
    # linears reading one input (found in the previous block) are compressed together: under
    # torchrun their factorizations are spread over the processes
    passer = StagedPass(
        block, targets, compressor.needs, compress, prefix + ".", reduce, together=run.together
    )
    try:
        with torch.no_grad():
            outs = passer.run(streams.student, streams.kwargs, run_one)
    except StagedUnsupported as e:
        if distributed.is_dist():
            raise
        log.warning("%s; compressing with two passes per block from here on", e)
        for rel, mod in targets.items():
            set_submodule(block, rel, mod)
        del report.modules[n_mod:], report.warnings[n_warn:]
        return None
    run.together = passer.shared_inputs
    distributed.check_same("the linears sharing an input", repr(sorted(run.together.items())))
    streams.student = outs
    streams.teacher = None
    return BlockRecord(index=i, rel_output_error=_rel_error(outs[: len(ref)], ref))


def _two_pass_block(i: int, block: nn.Module, targets, run: _Run) -> BlockRecord:
    """Statistics of the dense block (pass 1), compression, then its outputs (pass 2).

    A compressor with ``own_passes`` runs its calibration passes itself (and sets the teacher
    stream's outputs when it keeps one): pass 1 then only computes the first batch's dense output,
    for the block's error estimate.
    """
    spec, streams, compressor, report = run.spec, run.streams, run.compressor, run.report
    device, offload, autocast, sequential = run.device, run.offload, run.autocast, run.sequential
    own = getattr(compressor, "own_passes", False) and sequential
    with (
        torch.no_grad(),
        StatsCollector(
            targets, frozenset() if own else compressor.needs, prefix=f"{spec.blocks}.{i}."
        ) as col,
    ):
        # the dense outputs are the next stream (sequential=False) or distillation targets; else
        # only the first batch's (process 0's first) is kept, for the block's error estimate
        keep_all = not sequential or (compressor.teacher_stream and not own)
        n_keep = len(streams.student) if keep_all else int(distributed.rank() == 0)
        dense_out = []
        for j, (h, kw) in enumerate(zip(streams.student, streams.kwargs, strict=True)):
            if own and j >= n_keep:
                break
            out = run_block(block, h, kw, device, offload, autocast)
            if j < n_keep:
                dense_out.append(out)
            col.new_batch()
    if not own:
        distributed.allreduce_stats(col.stats, {rel: linear_shape(m) for rel, m in targets.items()})
    teacher_out = None
    if compressor.teacher_stream and not own:
        with torch.no_grad():
            teacher_out = [
                run_block(block, h, kw, device, offload, autocast)
                for h, kw in zip(streams.teacher, streams.kwargs, strict=True)
            ]
    ctx = BlockContext(
        index=i,
        prefix=f"{spec.blocks}.{i}",
        block=block,
        spec=spec,
        targets=targets,
        stats={} if own else col.stats,
        streams=streams,
        dense_outputs=dense_out,
        teacher_outputs=teacher_out,
        device=device,
        offload=offload,
        report=report,
        autocast=autocast,
    )
    compressor.compress_block(ctx)
    rec = BlockRecord(index=i, **ctx.extra.get("block_record", {}))
    if sequential:
        if ctx.outputs is not None:
            streams.student[:] = ctx.outputs
        else:  # in place: each input is dropped as soon as its output exists
            with torch.no_grad():
                for j, (h, kw) in enumerate(zip(streams.student, streams.kwargs, strict=True)):
                    streams.student[j] = run_block(block, h, kw, device, offload, autocast)
        rec.rel_output_error = _rel_error(streams.student[: len(dense_out)], dense_out)
    else:
        streams.student = dense_out
    streams.teacher = ctx.teacher_outputs
    return rec
