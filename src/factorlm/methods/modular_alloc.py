"""Loss-aware allocation of ``modular`` (METHODS.md formula 4): per-block ratios, and optionally
per-sub-layer ratios, from the sensitivities of one blockwise backward pass
(:mod:`factorlm.calibration.sensitivity`) and the pure rule of :mod:`factorlm.rank.loss_aware`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from factorlm import distributed
from factorlm.arch.modules import block_targets, get_blocks, linear_weight
from factorlm.calibration.sensitivity import block_sensitivities
from factorlm.methods.lorap import _nparams
from factorlm.methods.loss_metric import shrunk_metric, value_metric
from factorlm.methods.modular_heads import block_layout
from factorlm.rank.loss_aware import loss_aware_ratios

log = logging.getLogger(__name__)


#: attn_ratio=None: every block's attention loses ATTN_SLOPE x the requested ratio, at most
#: ATTN_CUT of its parameters, the MLP the rest of the block's budget (the sweep of the
#: attention's share on SmolLM2-135M at 20 % and 40 %: bench/results/NOTES.md)
ATTN_SLOPE = 1.25
ATTN_CUT = 0.3


def default_attn_ratio(ratio: float) -> float:
    """The attention's ratio in every block when ``attn_ratio`` is None, for a requested ratio."""
    return min(ATTN_CUT, ATTN_SLOPE * ratio)


def planned_attn_ratio(config) -> float | None:
    """The attention's ratio in every block, from ``attn_ratio`` (None: the block's own ratio
    ("block"), or the remainder of the MLP's when ``mlp_ratio`` is given)."""
    if config.attn_ratio == "block" or (config.attn_ratio is None and config.mlp_ratio is not None):
        return None
    if config.attn_ratio is None:
        return default_attn_ratio(config.ratio)
    return config.attn_ratio


#: loss_gamma=None: the exponent of the loss-aware rule is GAMMA_SPREAD / the requested ratio, at
#: most GAMMA_MAX, so every block's ratio moves by about GAMMA_SPREAD per e-fold of sensitivity
#: at any ratio (the sweep of loss_gamma on SmolLM2-135M at 20 %, 30 % and 40 %:
#: bench/results/NOTES.md)
GAMMA_SPREAD = 0.2
GAMMA_MAX = 1.5


def default_loss_gamma(ratio: float) -> float:
    """The exponent of the loss-aware rule when ``loss_gamma`` is None, for a requested ratio."""
    return min(GAMMA_MAX, GAMMA_SPREAD / ratio)


def loss_gamma(config) -> float:
    """The exponent γ of ratio_i ∝ sensitivity_i^-γ: ``loss_gamma``, or the default rule."""
    return default_loss_gamma(config.ratio) if config.loss_gamma is None else config.loss_gamma


def loss_batches(batches, samples: int) -> tuple[list, int]:
    """The calibration batches of the sensitivities: the first ``samples`` sequences (the last
    batch cut), whichever the number of processes (they share them out), with at least one batch
    per process (one sequence each beyond ``samples``); and their number of sequences."""
    chosen, rows, world = [], 0, distributed.world_size()
    for b in batches:
        if rows >= samples and len(chosen) >= world:
            break
        chosen.append(b[: max(samples - rows, 1)])
        rows += chosen[-1].shape[0]
    return chosen, rows


@dataclass
class LossAllocation:
    """What the loss-aware pass gives ``modular``: per-block ratios, per-block attention ratios
    (when each block's budget is also split between its sub-layers), and with ``loss_metric``
    the output linears' gradient Grams per block (relative name -> F)."""

    ratios: list[float]
    attn_ratios: list[float] | None = None
    out_grams: list[dict[str, torch.Tensor]] | None = None


def loss_aware_block_ratios(plan, config) -> LossAllocation:
    """Per-block ratios, and per-block attention ratios when the budget is also split between
    each block's sub-layers, from the loss's sensitivities (one blockwise backward pass)."""
    t0 = time.perf_counter()
    batches, rows = loss_batches(plan.calibration.batches, config.loss_samples)
    sens = block_sensitivities(
        plan.model,
        plan.spec,
        distributed.shard(batches),
        plan.device,
        plan.offload,
        outlier=config.loss_outlier,
        out_grams=config.uses_loss_metric,
    )
    for gram in (g for d in sens.out_grams for g in d.values()):
        distributed.all_sum_tensor_(gram)
    kappa = distributed.all_sum(sens.block)
    blocks = get_blocks(plan.model, plan.spec)
    split = (
        config.loss_split
        and config.attn_ratio in (None, "block")
        and config.mlp_ratio is None
        and all(set(d) == {"attn", "mlp"} for d in sens.sublayer)
    )
    info: dict = {"sensitivity": kappa, "sequences": rows, "gamma": loss_gamma(config)}
    attn_ratios = None
    if split:
        # one unit per (block, sub-layer): [attn_0, mlp_0, attn_1, mlp_1, ...]
        k_units = distributed.all_sum([d[g] for d in sens.sublayer for g in ("attn", "mlp")])
        p_units = []
        for b in blocks:
            targets = block_targets(b, plan.spec)
            for g in ("attn", "mlp"):
                p_units.append(
                    sum(_nparams(m) for r, m in targets.items() if plan.spec.group_of(r) == g)
                )
        r_units = loss_aware_ratios(k_units, p_units, plan.ratio, gamma=info["gamma"])
        ratios, attn_ratios = [], []
        for i in range(len(blocks)):
            (ra, rm), (pa, pm) = r_units[2 * i : 2 * i + 2], p_units[2 * i : 2 * i + 2]
            ratios.append((ra * pa + rm * pm) / (pa + pm))
            attn_ratios.append(ra)
        info["sublayer_sensitivity"] = [
            {"attn": k_units[2 * i], "mlp": k_units[2 * i + 1]} for i in range(len(blocks))
        ]
        info["attn_ratios"] = attn_ratios
        info["mlp_ratios"] = [r_units[2 * i + 1] for i in range(len(blocks))]
    else:
        params = [sum(_nparams(m) for m in block_targets(b, plan.spec).values()) for b in blocks]
        ratios = loss_aware_ratios(kappa, params, plan.ratio, gamma=info["gamma"])
    info["block_ratios"] = ratios
    info["seconds"] = time.perf_counter() - t0
    plan.report.calibration["loss_aware"] = info
    log.info("loss-aware block ratios: %s", ", ".join(f"{r:.3f}" for r in ratios))
    if attn_ratios is not None:
        log.info("loss-aware attention ratios: %s", ", ".join(f"{r:.3f}" for r in attn_ratios))
    return LossAllocation(ratios, attn_ratios, sens.out_grams if config.uses_loss_metric else None)


def block_metrics(
    ctx, grams: dict[str, torch.Tensor], units, ranks: dict[str, int | None], shrink: float
) -> dict[str, torch.Tensor]:
    """``loss_metric``: the output metrics (rel -> metric) of a block's MLP output linears and of
    its low-rank o_proj / v_proj (those in ``ranks`` with a rank), from the block's gradient Grams
    ``grams`` (:mod:`factorlm.methods.loss_metric`); v_proj's from the still dense o_proj."""
    out = {u.output: shrunk_metric(grams[u.output], shrink) for u in units if u.output in grams}
    layout = block_layout(ctx) if ranks else None
    if layout is None or layout.o not in grams:
        return out
    metric_o = shrunk_metric(grams[layout.o], shrink)
    if ranks.get(layout.o) is not None:
        out[layout.o] = metric_o
    if ranks.get(layout.v) is not None:
        out[layout.v] = value_metric(
            linear_weight(ctx.targets[layout.o]).detach(), metric_o, layout
        )
    return out
