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

from factorlm.arch.modules import block_targets, get_blocks
from factorlm.arch.registry import ArchSpec
from factorlm.calibration.stats import LayerStats, StatsCollector
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
    """Run the batches up to the first block and record its inputs (args + kwargs)."""
    blocks = get_blocks(model, spec)
    hidden, kwargs = [], []

    def hook(_mod, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.detach().to(offload))
        kw = {k: v for k, v in kw.items() if k != "hidden_states"}
        kwargs.append(to_device(kw, offload))
        raise _StopForward

    moved = _move_outside_blocks(model, blocks, device)
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
            _move_outside_blocks(model, blocks, offload)
            blocks[0].to(offload)
    return Streams(student=hidden, kwargs=kwargs)


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device) -> bool:
    """Move every parameter/buffer that is not inside the blocks; returns whether anything moved."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    moved = False
    for mod in model.modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None or id(t) in inside or t.device == torch.device(device):
                continue
            moved = True
            new = t.to(device)
            if name in mod._parameters:
                mod._parameters[name] = nn.Parameter(new, requires_grad=t.requires_grad)
            else:
                mod._buffers[name] = new
    return moved


def run_block(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], device, offload="cpu"
) -> torch.Tensor:
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
    dense_outputs: list[torch.Tensor]  # dense block applied to the student stream
    teacher_outputs: list[torch.Tensor] | None  # dense block applied to the teacher stream
    device: Any
    offload: Any
    report: Report
    extra: dict[str, Any] = field(default_factory=dict)

    def forward(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [
                run_block(self.block, h, kw, self.device, self.offload)
                for h, kw in zip(hidden, self.streams.kwargs, strict=True)
            ]


class BlockCompressor(Protocol):
    needs: frozenset[str]  # statistics to capture on the block's inputs
    teacher_stream: bool  # keep the dense model's activations too (distillation)

    def compress_block(self, ctx: BlockContext) -> None: ...


def _rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b, strict=True))
    den = sum(float(y.double().square().sum()) for y in b)
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
) -> Streams:
    """Compress blocks ``start_block..`` in order; returns the streams after the last block."""
    blocks = get_blocks(model, spec)
    device = device or next(model.parameters()).device
    if compressor.teacher_stream and streams.teacher is None:
        streams.teacher = [h.clone() for h in streams.student]
    bar = tqdm(range(start_block, len(blocks)), desc=desc, unit="block", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        reset_device_peak(device)
        block = blocks[i]
        block.to(device)
        targets = block_targets(block, spec)
        with torch.no_grad(), StatsCollector(targets, compressor.needs) as col:
            dense_out = []
            for h, kw in zip(streams.student, streams.kwargs, strict=True):
                dense_out.append(run_block(block, h, kw, device, offload))
                col.new_batch()
        teacher_out = None
        if compressor.teacher_stream:
            with torch.no_grad():
                teacher_out = [
                    run_block(block, h, kw, device, offload)
                    for h, kw in zip(streams.teacher, streams.kwargs, strict=True)
                ]
        ctx = BlockContext(
            index=i,
            prefix=f"{spec.blocks}.{i}",
            block=block,
            spec=spec,
            targets=targets,
            stats=col.stats,
            streams=streams,
            dense_outputs=dense_out,
            teacher_outputs=teacher_out,
            device=device,
            offload=offload,
            report=report,
        )
        compressor.compress_block(ctx)
        rec = BlockRecord(index=i, **ctx.extra.get("block_record", {}))
        if sequential:
            new_student = ctx.forward(streams.student)
            rec.rel_output_error = _rel_error(new_student, dense_out)
        else:
            new_student = dense_out
        streams = Streams(student=new_student, kwargs=streams.kwargs, teacher=teacher_out)
        block.to(offload)
        rec.seconds = time.perf_counter() - t0
        rec.peak_device_bytes = peak_device_bytes(device)
        rec.peak_rss_bytes = peak_rss_bytes()
        report.blocks.append(rec)
        if rec.rel_output_error is not None:
            bar.set_postfix(err=f"{rec.rel_output_error:.2e}")
        del ctx, dense_out
        if checkpoint is not None:
            checkpoint(i, streams)
    return streams
