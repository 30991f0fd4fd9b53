"""The MLP step of ``modular`` (METHODS.md formula 2): choose the kept intermediate channels of one
MLP unit, remove the other rows of its input linears and replace its output linear by the
least-squares refit on the kept channels (:func:`factorlm.methods.lorap.kept_columns`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from factorlm.arch.modules import linear_weight, replace_module
from factorlm.calibration.pipeline import BlockContext
from factorlm.calibration.stats import LayerStats
from factorlm.errors import NumericalError
from factorlm.methods import pruning
from factorlm.methods.anchored import greedy_refit_channels, ridge_leverage, weighted_energy
from factorlm.methods.linalg import apply_metric, metric_roots
from factorlm.methods.lorap import Unit, _bias, _new_linear, _nparams, kept_columns
from factorlm.report.schema import ModuleRecord

# the selection rules that score an output error, and so can measure it in an output metric
METRIC_SELECTS = ("greedy", "energy")


def channel_scores(
    ctx: BlockContext,
    unit: Unit,
    stats: dict[str, LayerStats],
    config,
    width: int,
    out_metric: torch.Tensor | None = None,
) -> torch.Tensor:
    """One score per intermediate channel (the ``width`` highest are kept), by ``config.select``;
    ``greedy`` and ``energy`` measure the output in the metric ``out_metric`` when given."""
    full = f"{ctx.prefix}.{unit.output}"
    st_out = stats.get(unit.output)
    W_out = linear_weight(ctx.targets[unit.output]).detach()
    if st_out is None or st_out.n_tokens == 0:
        ctx.report.warnings.append(
            f"{full}: no calibration input observed; channels scored by weight magnitude only"
        )
        inputs = [(linear_weight(ctx.targets[r]).detach(), None) for r in unit.inputs]
        return pruning.channel_scores(inputs, (W_out, None), fused=unit.fused)
    if out_metric is not None and config.select in METRIC_SELECTS:
        root = metric_roots(out_metric.to(W_out.device))[0]
        W_out = apply_metric(root, W_out.to(torch.float64))
    if config.select == "leverage":
        return ridge_leverage(st_out.gram, config.leverage_ridge)
    if config.select == "energy":
        return weighted_energy(W_out, st_out.gram)
    if config.select == "greedy":
        return greedy_refit_channels(W_out, st_out.gram, width, config.ridge)
    inputs = []
    for r in unit.inputs:
        st = stats.get(r)
        q = st.sq_mean if st is not None and st.n_tokens else None
        inputs.append((linear_weight(ctx.targets[r]).detach(), q))
    return pruning.channel_scores(inputs, (W_out, st_out.sq_mean), fused=unit.fused)


def prune_unit(
    ctx: BlockContext,
    unit: Unit,
    ushape: pruning.UnitShape,
    width: int,
    stats: dict[str, LayerStats],
    config,
    record: Callable[[BlockContext, str], ModuleRecord],
    target_cross: torch.Tensor | None = None,
    out_metric: torch.Tensor | None = None,
) -> tuple[dict[str, ModuleRecord], torch.Tensor | None]:
    """Prune ``unit`` to ``width`` channels in ``ctx.block``; the records of its linears and the
    kept channels' indices (None: every channel kept).

    ``target_cross`` (``compensate``): Y H̃^T of the outputs Y the output linear should produce
    (:class:`factorlm.calibration.anchored.ResidualTarget`), else the refit targets its own output.
    ``out_metric`` (``loss_metric``): the metric of the output error the channel selection
    weighs (the refit is the same in any metric).
    """
    recs = {rel: record(ctx, rel) for rel in (*unit.inputs, unit.output)}
    if width >= ushape.channels:
        return recs, None
    t0 = time.perf_counter()
    full = f"{ctx.prefix}.{unit.output}"
    scores = channel_scores(ctx, unit, stats, config, width, out_metric)
    if not bool(torch.isfinite(scores).all()):
        raise NumericalError(f"{full}: channel scores contain NaN or Inf")
    keep = pruning.select_channels(scores, ushape.channels - width, 0)
    for rel in unit.inputs:
        mod = ctx.targets[rel]
        bias = _bias(mod)
        Wk, bk = pruning.prune_rows(
            linear_weight(mod).detach(),
            None if bias is None else bias.detach(),
            keep,
            unit.fused,
        )
        replace_module(ctx.block, rel, _new_linear(Wk, bk))
    out_mod = ctx.targets[unit.output]
    W_new, recs[unit.output].rel_error = kept_columns(
        linear_weight(out_mod).detach(),
        stats.get(unit.output),
        keep,
        config.refit,
        config.ridge,
        full,
        target_cross=target_cross,
    )
    if target_cross is not None:
        recs[unit.output].notes.append("refit to the dense block's output (compensate)")
    if out_metric is not None and config.select in METRIC_SELECTS:
        recs[unit.output].notes.append("channels chosen in the loss's output metric (loss_metric)")
    replace_module(ctx.block, unit.output, _new_linear(W_new, _bias(out_mod)))
    for rel, rec in recs.items():
        rec.kind, rec.width = "pruned", width
        rec.params_after = _nparams(ctx.block.get_submodule(rel))
    recs[unit.output].seconds = time.perf_counter() - t0
    return recs, keep
