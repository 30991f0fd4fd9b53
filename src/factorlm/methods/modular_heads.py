"""``modular:attention=modules``: one block's attention compressed as head modules.

The budget is the one the low-rank plan gives each pair (the parameters q+k, and v+o, would keep
at their planned ranks), spent on whole head dimensions instead (:mod:`factorlm.methods.heads`):
each kept value dimension costs one v row and one o column per query head that reads it, each
kept q/k dimension one k row and one q row per query head of its group. Blocks whose attention is
not four separate head-shaped linears keep the low-rank plan (with a warning in the report), and
q/k keep it where a per-head norm needs every dimension (qwen3, gemma3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from factorlm.arch.heads import HeadLayout, head_layout
from factorlm.arch.modules import linear_shape, replace_module
from factorlm.calibration.pipeline import BlockContext
from factorlm.calibration.stats import LayerStats
from factorlm.errors import NumericalError
from factorlm.methods.heads import qk_select, vo_fit
from factorlm.methods.lorap import _bias, _nparams
from factorlm.nn.slots import SlotLinear
from factorlm.rank.allocation import lowrank_params
from factorlm.report.schema import ModuleRecord


@dataclass
class HeadPlan:
    layout: HeadLayout
    vo_keep: int | None  # value dimensions kept in all (None: v/o keep the low-rank plan)
    qk_keep: int | None  # q/k dimensions kept in all, per key/value head (None: likewise)

    def handled(self) -> set[str]:
        out = set()
        if self.vo_keep is not None:
            out |= {self.layout.v, self.layout.o}
        if self.qk_keep is not None:
            out |= {self.layout.q, self.layout.k}
        return out


def _config_of(block: nn.Module, rel: str):
    parent = rel.rpartition(".")[0]
    mod = block.get_submodule(parent) if parent else block
    return getattr(mod, "config", None)


def block_layout(ctx: BlockContext) -> HeadLayout | None:
    """The head layout of the (still dense) block's attention (None: not four separate
    head-shaped q/k/v/o linears)."""
    q = next((r for r in ctx.targets if ctx.spec.role_of(r) == "q"), None)
    config = _config_of(ctx.block, q) if q is not None else None
    return None if config is None else head_layout(config, ctx.spec, ctx.block, ctx.targets)


def plan_heads(ctx: BlockContext, ranks: dict[str, int | None]) -> HeadPlan | None:
    """The head budget of the block from its low-rank plan ``ranks`` (rel -> rank, None: dense)."""
    layout = block_layout(ctx)
    if layout is None:
        if ctx.index == 0:
            ctx.report.warnings.append(
                f"{ctx.prefix}: attention=modules needs four separate head-shaped q/k/v/o "
                "linears; this architecture's attention keeps the low-rank plan"
            )
        return None

    def planned(rel: str) -> int:
        m, n = linear_shape(ctx.targets[rel])
        r = ranks.get(rel)
        return m * n if r is None else lowrank_params(m, n, r)

    d = ctx.targets[layout.v].in_features
    m = ctx.targets[layout.o].out_features
    hd, kv, g = layout.head_dim, layout.kv_heads, layout.group
    vo_keep = qk_keep = None
    if ranks.get(layout.v) is not None or ranks.get(layout.o) is not None:
        keep = math.floor((planned(layout.v) + planned(layout.o)) / (d + g * m))
        vo_keep = max(1, keep) if keep < kv * hd else None
    if ranks.get(layout.q) is not None or ranks.get(layout.k) is not None:
        if layout.qk_removable:
            keep = math.floor((planned(layout.q) + planned(layout.k)) / ((g + 1) * d))
            qk_keep = max(1, keep) if keep < kv * hd else None
        elif ctx.index == 0:
            ctx.report.warnings.append(
                f"{ctx.prefix}: a per-head norm on q/k needs every dimension; q/k keep the "
                "low-rank plan"
            )
    if vo_keep is None and qk_keep is None:
        return None
    return HeadPlan(layout, vo_keep, qk_keep)


def compress_heads(
    ctx: BlockContext,
    plan: HeadPlan,
    stats: dict[str, LayerStats],
    ridge: float,
    record: Callable[[BlockContext, str], ModuleRecord],
) -> dict[str, ModuleRecord]:
    """Replace the planned pairs by :class:`SlotLinear` modules; their records."""
    lay = plan.layout
    mods = {r: ctx.targets[getattr(lay, r)] for r in "qkvo"}
    d = mods["v"].in_features
    st = stats.get(lay.q) or stats.get(lay.v)
    if st is None or st.gram is None or st.n_tokens == 0:
        gram = torch.eye(d, dtype=torch.float64, device=mods["v"].weight.device)
        ctx.report.warnings.append(f"{ctx.prefix}: no attention input observed; G = I used")
    else:
        gram = st.gram
    recs: dict[str, ModuleRecord] = {}

    def done(role: str, new: SlotLinear, width: int, err: float, t0: float, notes=()) -> None:
        rel = getattr(lay, role)
        replace_module(ctx.block, rel, new)
        rec = record(ctx, rel)
        rec.kind, rec.width, rec.rel_error = "heads", width, err
        rec.params_after = _nparams(new)
        rec.seconds, rec.notes = time.perf_counter() - t0, list(notes)
        recs[rel] = rec

    kvhd, hhd = lay.kv_heads * lay.head_dim, lay.heads * lay.head_dim
    if plan.vo_keep is not None:
        t0 = time.perf_counter()
        v, o = mods["v"], mods["o"]
        try:
            fit = vo_fit(
                v.weight.detach(), _b(v), o.weight.detach(), gram, lay, plan.vo_keep, ridge
            )
        except torch.linalg.LinAlgError as e:
            raise NumericalError(f"{ctx.prefix}.{lay.v}: linear algebra failed ({e})") from e
        new_v = SlotLinear.from_weight(
            fit.v_weight, d, kvhd, out_slots=fit.v_slots, bias=fit.v_bias, like=v.weight
        )
        new_o = SlotLinear.from_weight(
            fit.o_weight, hhd, o.out_features, in_slots=fit.o_slots, bias=_b(o), like=o.weight
        )
        notes = [f"value dimensions kept per key/value head: {fit.kept}", *fit.notes]
        done("v", new_v, len(fit.v_slots), fit.rel_error, t0, notes)
        done("o", new_o, len(fit.o_slots), fit.rel_error, t0, notes)
    if plan.qk_keep is not None:
        t0 = time.perf_counter()
        q, k = mods["q"], mods["k"]
        sel = qk_select(q.weight.detach(), k.weight.detach(), gram, lay, plan.qk_keep)
        notes = [f"q/k dimensions kept per key/value head: {sel.kept}"]
        for role, mod, slots, err in (
            ("q", q, sel.q_slots, sel.q_error),
            ("k", k, sel.k_slots, sel.k_error),
        ):
            W, b = mod.weight.detach(), _b(mod)
            new = SlotLinear.from_weight(
                W[slots.to(W.device)],
                d,
                mod.out_features,
                out_slots=slots,
                bias=None if b is None else b[slots.to(b.device)],
                like=W,
            )
            done(role, new, len(slots), err, t0, notes)
    return recs


def _b(mod: nn.Module) -> torch.Tensor | None:
    b = _bias(mod)
    return None if b is None else b.detach()
