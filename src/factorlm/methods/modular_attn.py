"""``modular``'s attention fits: the whitened (anchored) low-rank fit of one linear (q and k in
the metrics of the attention scores, ``qk_scores``), and the least-squares refit of an o_proj that
stays dense in the ``refit_o`` step (o_proj fitted again on the compressed q/k/v's output; its
statistics pass is in :mod:`factorlm.methods.modular_pass`)."""

from __future__ import annotations

import time

import torch

from factorlm.arch.modules import linear_weight, replace_module
from factorlm.calibration.pipeline import BlockContext
from factorlm.calibration.stats import LayerStats
from factorlm.errors import NumericalError
from factorlm.methods.anchored import anchored_lowrank, refit_columns
from factorlm.methods.linalg import output_error
from factorlm.methods.lorap import _bias, _new_linear
from factorlm.methods.modular_heads import block_layout
from factorlm.methods.qk_scores import score_metrics
from factorlm.nn.lowrank import LowRankLinear
from factorlm.rank.allocation import lowrank_params
from factorlm.report.schema import ModuleRecord


def lowrank_fit(
    ctx: BlockContext,
    rel: str,
    rank: int | None,
    stats: LayerStats | None,
    rec: ModuleRecord,
    ridge: float,
    out_metric: torch.Tensor | None = None,
    metric_note: str = "fitted for the attention scores (qk_scores)",
) -> ModuleRecord:
    """Replace ``rel`` by its whitened (anchored where ``stats`` has a cross-Gram) rank-``rank``
    fit, its output error measured in ``out_metric`` when given (the q/k score metrics of
    :mod:`factorlm.methods.qk_scores`, or the loss's metric of :mod:`factorlm.methods.loss_metric`;
    ``metric_note`` says which in the record); ``rec`` is its (dense) record, returned filled in
    (unchanged when ``rank`` is None)."""
    if rank is None:
        return rec
    t0 = time.perf_counter()
    full = f"{ctx.prefix}.{rel}"
    mod = ctx.targets[rel]
    W = linear_weight(mod).detach()
    if stats is None or stats.gram is None or stats.n_tokens == 0:
        gram = torch.eye(W.shape[1], dtype=torch.float64, device=W.device)
        cross = None
        ctx.report.warnings.append(f"{full}: no calibration input observed; plain SVD used")
    else:
        gram, cross = stats.gram, stats.cross
    try:
        A, B, notes = anchored_lowrank(W, gram, cross, rank, ridge=ridge, out_metric=out_metric)
    except torch.linalg.LinAlgError as e:
        raise NumericalError(f"{full}: linear algebra failed ({e})") from e
    except NumericalError as e:
        raise NumericalError(f"{full}: {e}") from e
    bias = _bias(mod)
    new = LowRankLinear.from_factors(A, B, bias=None if bias is None else bias.detach(), like=W)
    replace_module(ctx.block, rel, new)
    m, n = rec.shape
    rec.kind, rec.rank, rec.notes = "lowrank", rank, list(notes)
    if out_metric is not None:
        rec.notes.append(metric_note)
    rec.params_after = lowrank_params(m, n, rank) + (0 if bias is None else bias.numel())
    rec.rel_error = output_error(W, A @ B, gram) if stats is not None else None
    rec.seconds = time.perf_counter() - t0
    for note in notes:
        ctx.report.warnings.append(f"{full}: {note}")
    return rec


def qk_metrics(
    ctx: BlockContext, ranks: dict[str, int | None], stats: dict[str, LayerStats]
) -> dict[str, torch.Tensor]:
    """``qk_scores``: the output metrics of the block's q and k fits (rel -> metric), from the
    dense q/k weights and their input's Gram; empty where neither is factorized, the attention is
    not four head-shaped linears, a per-head norm sits between q/k and the scores (qwen3, gemma3:
    the scores do not see k's output linearly), or no input was observed."""
    layout = block_layout(ctx)
    if layout is None or not layout.qk_removable:
        return {}
    q, k = layout.q, layout.k
    if ranks.get(q) is None and ranks.get(k) is None:
        return {}
    st = stats.get(q)
    if st is None or st.gram is None or st.n_tokens == 0:
        return {}
    Wq = linear_weight(ctx.targets[q]).detach()
    Wk = linear_weight(ctx.targets[k]).detach()
    metric_q, metric_k = score_metrics(Wq, Wk, st.gram, layout)
    return {q: metric_q, k: metric_k}


def refit_dense(
    ctx: BlockContext, rel: str, stats: LayerStats, rec: ModuleRecord, ridge: float
) -> ModuleRecord:
    """Refit a linear that stays dense by least squares, W' = W C (G̃ + λ I)^-1; ``rec`` is its
    (dense) record."""
    t0 = time.perf_counter()
    mod = ctx.targets[rel]
    W = linear_weight(mod).detach()
    keep = torch.arange(W.shape[1], device=stats.gram.device)
    try:
        W_new = refit_columns(W, stats.gram, stats.cross, keep, ridge)
    except NumericalError as e:
        raise NumericalError(f"{ctx.prefix}.{rel}: {e}") from e
    bias = _bias(mod)
    replace_module(ctx.block, rel, _new_linear(W_new.to(W.dtype), bias))
    rec.notes.append("refit on the compressed q/k/v's output (refit_o)")
    rec.seconds = time.perf_counter() - t0
    return rec
