"""``modular``'s calibration passes through one block: the compressed stream (and, for anchored
fits, the dense stream) with the hooks that accumulate each step's statistics. The orchestration
only; the fits are in :mod:`factorlm.methods.modular`'s sibling modules."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from factorlm import distributed
from factorlm.arch.match import match
from factorlm.arch.modules import linear_shape
from factorlm.calibration.anchored import (
    CrossCollector,
    EarlyStop,
    InputLog,
    InputTap,
    ResidualTarget,
)
from factorlm.calibration.pipeline import BlockContext, calib_autocast, run_block
from factorlm.calibration.stats import LayerStats
from factorlm.memory import available_bytes
from factorlm.methods.lorap import _bias

log = logging.getLogger(__name__)

# the share of the free memory (of the offload device) that the inputs kept for
# outputs_from_kept may take; above it the block's outputs come from a forward
KEEP_SHARE = 0.25


class StructureChecks:
    """Checks of a block's forward structure (e.g. does it add a linear's output to its own?),
    each run once per block class and key, on the first calibration batch of the block that
    asks first, outside any statistics hooks; every process takes the same decision. Blocks of
    one class run the same forward code, so a check holds for all of them (the key names the
    modules involved: a dense MLP's and an MoE block's differ)."""

    def __init__(self) -> None:
        self._seen: dict[tuple, bool] = {}

    def __call__(
        self, ctx: BlockContext, key: tuple, check: Callable[[Callable[[], torch.Tensor]], bool]
    ) -> bool:
        """``check(fwd)``, ``fwd`` one forward of ``ctx.block`` on its first batch (cached)."""
        k = (type(ctx.block), *key)
        if k not in self._seen:
            ok = 1
            if ctx.streams.student:
                h, kw = ctx.streams.student[0], ctx.streams.kwargs[0]

                def fwd():
                    return run_block(ctx.block, h, kw, ctx.device, ctx.offload, ctx.autocast)

                with torch.no_grad():
                    ok = int(check(fwd))
            self._seen[k] = bool(distributed.all_min(ok))
        return self._seen[k]


def routed(ctx: BlockContext, rel: str) -> bool:
    """Whether ``rel`` is a routed module (an MoE expert: its tokens differ between streams)."""
    return any(match(p, rel) for p in ctx.spec.routed)


def residual_target(
    ctx: BlockContext, checks: StructureChecks, units, ushapes, widths
) -> ResidualTarget | None:
    """``compensate``'s target of the block's one pruned, unrouted MLP unit (None: several units,
    a routed unit, no unit pruned, or a block that does not add the unit's output to its own)."""
    if len(units) != 1:
        return None
    unit = units[0]
    if routed(ctx, unit.output) or widths[0] >= ushapes[0].channels:
        return None
    mod = ctx.targets[unit.output]
    residual = ResidualTarget(mod, _bias(mod))
    if not checks(ctx, ("block", unit.output), residual.check):
        log.info("%s: the MLP's output is not added to the block's output: plain refit", ctx.prefix)
        return None
    residual.additive = True
    return residual


def block_pass(
    ctx: BlockContext,
    config,
    modules: dict[str, torch.nn.Module],
    need: frozenset[str],
    cross: set[str],
    dense_inputs: list[dict[str, torch.Tensor]] | None,
    record: dict[str, torch.nn.Module] | None = None,
    keep_outputs: bool = False,
    residual: tuple[ResidualTarget, list[torch.Tensor]] | None = None,
    inputs_log: InputLog | None = None,
) -> tuple[dict[str, LayerStats], list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """One pass of the compressed stream accumulating ``need`` (+ C of the modules ``cross``).

    ``dense_inputs``: the recorded dense inputs per batch (None: run the dense stream here,
    recording the inputs of ``record`` and the block's dense outputs when still missing).
    Routed modules (MoE experts) see other tokens in the two streams: no cross-Gram for them.
    ``keep_outputs``: return the compressed stream's block outputs; ``residual``: a
    :class:`ResidualTarget` (checked additive) and its target block outputs per batch,
    accumulated on the way;
    ``inputs_log``: an :class:`InputLog` recording its modules' inputs, one per batch.
    """
    streams = ctx.streams
    anchored = config.anchored and streams.teacher is not None
    cross_for = {r for r in cross if anchored and not routed(ctx, r)}
    record = {r: m for r, m in (record or {}).items() if not routed(ctx, r)}
    col = CrossCollector(modules, need, cross_for, prefix=f"{ctx.prefix}.")
    recorded: list[dict[str, torch.Tensor]] = []
    want_teacher = anchored and ctx.teacher_outputs is None and dense_inputs is None
    # the dense stream runs when something reads it (a cross-Gram, a recorded input, the
    # block's dense outputs)
    run_dense = anchored and bool(cross_for or record or want_teacher)
    teacher_out = []
    tap_mods = {**{r: modules[r] for r in cross_for}, **record}
    # unless they are read, the compressed stream's forward ends at the last module whose
    # statistics are needed (the attention's pass skips the MLP)
    whole = keep_outputs or residual is not None
    outputs: list[torch.Tensor] = []
    logged = inputs_log if inputs_log is not None else InputLog({})
    with torch.no_grad(), col, logged, EarlyStop({} if whole else modules) as stop:
        for j, (h, kw) in enumerate(zip(streams.student, streams.kwargs, strict=True)):
            if run_dense:
                if dense_inputs is None:
                    with InputTap(tap_mods) as tap:
                        out = run_block(
                            ctx.block,
                            streams.teacher[j],
                            kw,
                            ctx.device,
                            ctx.offload,
                            ctx.autocast,
                        )
                    dense = tap.take()
                    if want_teacher:
                        teacher_out.append(out)
                    recorded.append({r: dense[r].to(ctx.offload) for r in record if r in dense})
                else:
                    dense = {r: x.to(ctx.device) for r, x in dense_inputs[j].items()}
                col.set_dense({r: dense[r] for r in cross_for if r in dense})
            else:
                col.set_dense({})

            def fwd(h=h, kw=kw):
                return run_block(ctx.block, h, kw, ctx.device, ctx.offload, ctx.autocast)

            if residual is not None:
                with residual[0]:
                    out = residual[0].run(fwd, residual[1][j])
            else:
                out = stop.run(fwd)
            if keep_outputs:
                outputs.append(out)
            col.end_batch()
    distributed.allreduce_stats(col.stats, {r: linear_shape(m) for r, m in modules.items()})
    _blend_cross(col.stats, config.anchor_weight)
    if want_teacher:
        ctx.teacher_outputs = teacher_out
    if residual is not None:  # zeros in a process without calibration batches
        if residual[0].cross is None:
            m, n = linear_shape(residual[0].module)
            residual[0].cross = torch.zeros(m, n, dtype=torch.float64, device=ctx.device)
        distributed.all_sum_tensor_(residual[0].cross)
    return col.stats, recorded, outputs


def _blend_cross(stats: dict[str, LayerStats], weight: float) -> None:
    """C <- w C + (1 - w) G~ (once per shared statistics object): the target of every anchored fit
    becomes w W X + (1 - w) W X~."""
    if weight == 1.0:
        return
    for st in {id(s): s for s in stats.values()}.values():
        if st.cross is not None:
            st.cross.mul_(weight).add_(st.gram, alpha=1.0 - weight)


def o_pass(ctx: BlockContext, rel: str, old_inputs: list[torch.Tensor]) -> LayerStats:
    """G̃ of o_proj's input through the compressed q/k/v, and its cross-Gram with
    ``old_inputs`` (o_proj's input per batch before q/k/v were compressed)."""
    mod = ctx.targets[rel]
    col = CrossCollector({rel: mod}, frozenset({"gram"}), {rel}, prefix=f"{ctx.prefix}.")
    with torch.no_grad(), col, EarlyStop({rel: mod}) as stop:
        for j, (h, kw) in enumerate(zip(ctx.streams.student, ctx.streams.kwargs, strict=True)):
            col.set_dense({rel: old_inputs[j].to(ctx.device)})
            stop.run(
                lambda h=h, kw=kw: run_block(
                    ctx.block, h, kw, ctx.device, ctx.offload, ctx.autocast
                )
            )
            col.end_batch()
    distributed.allreduce_stats(col.stats, {rel: linear_shape(mod)})
    return col.stats[rel]


def can_keep(ctx: BlockContext, width: int) -> bool:
    """Whether a width-``width`` input of every calibration token, and the rest of the block's
    output (float32), fit in :data:`KEEP_SHARE` of the offload device's free memory."""
    streams = ctx.streams.student
    if not streams:
        return False
    tokens = sum(h.numel() // h.shape[-1] for h in streams)
    need = tokens * (width * streams[0].element_size() + streams[0].shape[-1] * 4)
    free = available_bytes(ctx.offload)
    return free is not None and need <= KEEP_SHARE * free


def outputs_from_kept(
    ctx: BlockContext, residual: ResidualTarget, rel: str, keep: torch.Tensor, tol: float = 1e-3
) -> list[torch.Tensor] | None:
    """The compressed block's outputs on every batch of the compressed stream, without a forward:
    the rest of its output kept by ``residual`` (:meth:`ResidualTarget.keep_to`) plus the new
    output linear ``rel`` on the ``keep`` channels of its kept input (what the pruned input
    linears now compute). A real forward of the first batch checks the sum: None (run the
    forward) when they differ by more than rounding (``tol`` of the linear's output)."""
    kept, residual.kept = residual.kept or [], None
    if not kept:
        return None
    mod = ctx.block.get_submodule(rel)
    h, kw = ctx.streams.student[0], ctx.streams.kwargs[0]
    outs = []
    with torch.no_grad():
        first = run_block(ctx.block, h, kw, ctx.device, ctx.offload, ctx.autocast)
    with torch.no_grad(), calib_autocast(ctx.device, ctx.autocast):
        for x, rest in kept:
            y = mod(x[..., keep.to(x.device)].to(ctx.device)).float().reshape(rest.shape)
            outs.append((rest.to(ctx.device) + y).to(first.dtype).to(ctx.offload))
    ref, got = first.float(), outs[0].float()
    y_norm = float((ref - kept[0][1].to(ref.device)).norm())
    eps = torch.finfo(first.dtype).eps
    if float((ref - got).norm()) > tol * y_norm + 4 * eps * float(ref.norm()):
        log.warning(
            "%s: the block's output is not the sum of %s's output and the rest: outputs from a "
            "forward",
            ctx.prefix,
            rel,
        )
        return None
    return outs  # the first batch's too: every batch the same arithmetic, however shared out
