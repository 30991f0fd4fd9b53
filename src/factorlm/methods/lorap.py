"""LoRAP (Li et al., ICML 2024): low-rank attention + structured channel pruning of the MLP.

Per block (sequential: each block sees the outputs of the already-compressed blocks before it):

* **Attention** (every targeted linear that is not part of an MLP unit): activation-weighted SVD,
  decompose W D with D = diag(sqrt(mean x^2)) of the matrix's input (zeros floored), B <- B D^-1.
  Ranks follow the *low-rank degree*: with parameter ratio ``a`` (default 3), v and o keep ``a``
  times the parameters of q and k. With grouped-query attention (k, v narrower than q, o) this is
  applied to each matrix's kept *fraction* of its own m x n, so the ranks are

      r_qk = f m n / (m + n),   r_vo = a f m n / (m + n)

  with one f per block solving the attention budget; for square matrices that is exactly "v and o
  get a x the parameters of q and k". When a f >= 1 (v / o would reach full rank: no saving), v and
  o stay dense and q, k absorb the whole attention cut. A fused qkv projection (phi3
  ``qkv_proj``, gpt2 ``c_attn``) is treated like the q/k class (it is mostly q and k); o keeps its
  own class. Any other non-MLP target (an architecture without attention roles) is in the q/k
  class, i.e. gets the uniform rank. ``uniform_attention=True`` (ablation) gives every matrix the
  same fraction (a = 1).
* **MLP**: gradient-free structured pruning of the intermediate channels, scored by
  :func:`factorlm.methods.pruning.channel_scores`; the lowest ``keep_least`` fraction (default 1 %)
  is kept, the next ratio-share removed. Rows of gate / up (and their biases) and columns of down
  are physically removed: a pruned module becomes a plain ``nn.Linear`` of its new shape (GPT-2's
  Conv1D too, with its weight transposed), so the saved model is smaller and ``factorlm.load``
  rebuilds it. Mixture-of-experts: every expert is a unit with its own scores and channels.
* **Split**: ``ratio`` applies to all targeted parameters of the block. By default both sub-layers
  get the same ratio (the official code at its 0.2 setting removed about as much of the attention
  as of the MLP): the attention ranks are rounded to ``plan.rank_multiple`` (removal >= its share,
  within one rank step), then the MLP removes the remainder of the block's target, rounded to
  ``channel_multiple`` kept channels, so the block removes >= ``ratio`` within one channel step.
  ``attn_ratio`` / ``mlp_ratio`` set one sub-layer's ratio (the other then takes the remainder;
  an attention cut larger than the block's budget is cut to it, and the attention takes what the
  MLP's smallest widths cannot); with both given, both are used as they are.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from factorlm.arch.match import match
from factorlm.arch.modules import linear_shape, linear_weight, replace_module
from factorlm.calibration.pipeline import BlockContext
from factorlm.calibration.stats import LayerStats
from factorlm.errors import ConfigError, NumericalError
from factorlm.methods import pruning
from factorlm.methods.anchored import refit_columns, refit_to_target
from factorlm.methods.asvd import column_scaled
from factorlm.methods.base import register
from factorlm.methods.config import MethodConfig
from factorlm.methods.linalg import check_finite, output_error
from factorlm.nn.lowrank import LowRankLinear
from factorlm.nn.slots import SlotLinear
from factorlm.rank.allocation import lowrank_params, max_useful_rank, top_up
from factorlm.report.schema import ModuleRecord

log = logging.getLogger(__name__)

VO_ROLES = ("v", "o")


# --- attention ranks (pure) -------------------------------------------------------------------------


def _rank(frac: float, m: int, n: int, multiple: int) -> int | None:
    """Rank keeping about ``frac`` of m n parameters, rounded down to ``multiple``; None = dense."""
    if frac >= 1:
        return None
    r = math.floor(frac * m * n / (m + n))
    rr = (r // multiple) * multiple if multiple > 1 else r
    r = max(rr, min(r, multiple), 1)
    return r if r <= max_useful_rank(m, n) else None


def attention_fractions(
    shapes: dict[str, tuple[int, int]], vo: set[str], keep: float, a: float
) -> dict[str, float]:
    """Kept fraction of each matrix: f for the q/k class, a f for v/o (>= 1: dense, q/k absorb)."""
    p_qk = sum(m * n for k, (m, n) in shapes.items() if k not in vo)
    p_vo = sum(m * n for k, (m, n) in shapes.items() if k in vo)
    if p_qk == 0:  # only v/o-class matrices: one fraction for all
        f = keep / p_vo if p_vo else 1.0
        return {k: f for k in shapes}
    f = keep / (p_qk + a * p_vo)
    if a * f >= 1:  # v / o would be full rank: dense, q and k take the whole cut
        return {k: (1.0 if k in vo else (keep - p_vo) / p_qk) for k in shapes}
    return {k: (a * f if k in vo else f) for k in shapes}


def attention_ranks(
    shapes: dict[str, tuple[int, int]],
    vo: set[str],
    remove: float,
    a: float = 3.0,
    multiple: int = 8,
    min_saving: int = 0,
) -> dict[str, int | None]:
    """Ranks (None = dense) removing at least ``remove`` weight parameters, within one rank step.

    Ranks come from each matrix's own (m, n) and its kept fraction (:func:`attention_fractions`),
    rounded down to ``multiple``; then ``multiple`` ranks are handed back (q/k class first, largest
    matrices first) while the removal stays >= ``remove``. ``min_saving``: a factorization that
    saves fewer weights than this (less than an extra kernel launch costs) stays dense and the
    other matrices take its cut, one matrix at a time, smallest saving first (when none is left,
    the attention removes nothing and the caller's MLP takes the cut).
    """
    if remove <= 0 or not shapes:
        return {k: None for k in shapes}
    dense: set[str] = set()
    while True:
        live = {k: s for k, s in shapes.items() if k not in dense}
        if not live:
            return {k: None for k in shapes}
        total = sum(m * n for m, n in live.values())
        fracs = attention_fractions(live, vo & set(live), total - remove, a)
        ranks = {k: _rank(fracs[k], m, n, multiple) for k, (m, n) in live.items()}
        order = sorted(live, key=lambda k: (k in vo, -live[k][0] * live[k][1]))
        ranks = top_up(live, ranks, total - remove, multiple, order)
        saving = {
            k: m * n - lowrank_params(m, n, ranks[k])
            for k, (m, n) in live.items()
            if ranks[k] is not None
        }
        small = [k for k, v in saving.items() if v < min_saving]
        if not small:
            return {k: ranks.get(k) for k in shapes}
        dense.add(min(small, key=saving.__getitem__))


# --- block structure ----------------------------------------------------------------------------------


@dataclass
class Unit:
    """One MLP unit found in a block: relative names of its input linears and its output linear."""

    inputs: tuple[str, ...]
    output: str
    fused: bool


def _bind(pattern: str, name: str) -> tuple[str, ...]:
    return tuple(b for p, b in zip(pattern.split("."), name.split("."), strict=True) if p == "*")


def _fill(pattern: str, binding: tuple[str, ...]) -> str:
    it = iter(binding)
    return ".".join(next(it) if p == "*" else p for p in pattern.split("."))


def find_units(spec, targets: dict[str, nn.Module]) -> list[Unit]:
    """The block's MLP units with every member present ("*" expanded: one unit per expert)."""
    units = []
    for mu in spec.mlp_units:
        for rel in targets:
            if not match(mu.output, rel):
                continue
            b = _bind(mu.output, rel)
            try:
                inputs = tuple(_fill(p, b) for p in mu.inputs)
            except StopIteration:
                continue
            if all(i in targets for i in inputs):
                units.append(Unit(inputs, rel, mu.fused_gate_up))
    return units


def _bias(mod: nn.Module) -> torch.Tensor | None:
    b = getattr(mod, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def _nparams(mod: nn.Module) -> int:
    m, n = linear_shape(mod)
    if isinstance(mod, (LowRankLinear, SlotLinear)):  # fewer weights than its full shape
        return sum(p.numel() for p in mod.parameters())
    b = _bias(mod)
    return m * n + (0 if b is None else b.numel())


def _unit_shape(unit: Unit, targets: dict[str, nn.Module], keep_least: float) -> pruning.UnitShape:
    m_out, channels = linear_shape(targets[unit.output])
    cost = m_out
    for rel in unit.inputs:
        mod = targets[rel]
        rows, n = linear_shape(mod)
        per = 2 if unit.fused else 1
        if rows != per * channels:
            raise ConfigError(
                f"MLP unit {rel} -> {unit.output}: {rows} output rows do not match {channels} channels"
            )
        cost += per * (n + (1 if _bias(mod) is not None else 0))
    return pruning.UnitShape(channels, cost, pruning.num_least(channels, keep_least))


def _new_linear(W: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain nn.Linear holding W (out x in) and bias exactly (dtype/device of W, no init)."""
    new = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device="meta", dtype=W.dtype)
    new = new.to_empty(device=W.device)
    with torch.no_grad():
        new.weight.copy_(W)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _has_tokens(stats: LayerStats | None) -> bool:
    return stats is not None and stats.n_tokens > 0 and stats.sq_sum is not None


def _gram(stats: LayerStats | None) -> torch.Tensor | None:
    if stats is None or stats.gram is None or stats.n_tokens == 0:
        return None
    return stats.gram_mean


# --- the block compressor ------------------------------------------------------------------------------


class LoRAPCompressor:
    """Low-rank attention (activation-weighted SVD, low-rank-degree ranks) + MLP channel pruning."""

    teacher_stream = False
    needs = frozenset({"sq", "gram"})

    def __init__(
        self,
        ratio: float,
        *,
        a: float,
        keep_least: float,
        attn_ratio: float | None,
        mlp_ratio: float | None,
        channel_multiple: int,
        uniform_attention: bool,
        rank_multiple: int,
        refit: bool = False,
        ridge: float = 1e-6,
        min_saving: int = 0,
    ) -> None:
        self.ratio = ratio
        self.min_saving = min_saving
        self.refit = refit
        self.ridge = ridge
        self.a = 1.0 if uniform_attention else a
        self.keep_least = keep_least
        self.attn_ratio = attn_ratio
        self.mlp_ratio = mlp_ratio
        self.channel_multiple = channel_multiple
        self.uniform_attention = uniform_attention
        self.rank_multiple = rank_multiple

    # -- planning
    def plan_block(self, ctx: BlockContext):
        """(units, unit shapes, widths, attention ranks) for the block."""
        targets = ctx.targets
        units = find_units(ctx.spec, targets)
        in_units = {r for u in units for r in (*u.inputs, u.output)}
        attn = [rel for rel in targets if rel not in in_units]
        shapes = {rel: linear_shape(targets[rel]) for rel in attn}
        vo = {rel for rel in attn if ctx.spec.role_of(rel) in VO_ROLES}
        ushapes = [_unit_shape(u, targets, self.keep_least) for u in units]
        p_attn = sum(_nparams(targets[r]) for r in attn)
        p_mlp = sum(_nparams(targets[r]) for r in in_units)
        target = math.ceil(self.ratio * (p_attn + p_mlp))

        def attn_alloc(remove):
            ranks = attention_ranks(shapes, vo, remove, self.a, self.rank_multiple, self.min_saving)
            got = sum(m * n - lowrank_params(m, n, ranks[k]) for k, (m, n) in shapes.items())
            return ranks, got

        def mlp_alloc(remove):
            return pruning.allocate_widths(ushapes, remove, self.channel_multiple)

        if self.mlp_ratio is not None and self.attn_ratio is None:
            widths, got_m = mlp_alloc(self.mlp_ratio * p_mlp)
            ranks, got_a = attn_alloc(target - got_m)
        else:
            share = self.ratio if self.attn_ratio is None else self.attn_ratio
            # never more than the block's budget when the MLP takes the remainder
            cut = share * p_attn if self.mlp_ratio is not None else min(share * p_attn, target)
            ranks, got_a = attn_alloc(cut if units else target)
            mlp_remove = target - got_a if self.mlp_ratio is None else self.mlp_ratio * p_mlp
            widths, got_m = mlp_alloc(mlp_remove)
            if units and self.mlp_ratio is None and got_a + got_m < target:
                ranks, got_a = attn_alloc(target - got_m)  # what the MLP cannot take
        if got_a + got_m < target:
            why = (
                "attn_ratio and mlp_ratio both given"
                if self.attn_ratio is not None and self.mlp_ratio is not None
                else "smallest ranks / widths reached"
            )
            ctx.report.warnings.append(
                f"{ctx.prefix}: lorap removed {got_a + got_m} of the {target} parameters the "
                f"ratio asks for ({why})"
            )
        return units, ushapes, widths, ranks

    # -- compression
    def compress_block(self, ctx: BlockContext) -> None:
        units, ushapes, widths, ranks = self.plan_block(ctx)
        records: dict[str, ModuleRecord] = {}
        for rel, r in ranks.items():
            records[rel] = self._lowrank(ctx, rel, r)
        for unit, ushape, width in zip(units, ushapes, widths, strict=True):
            records.update(self._prune(ctx, unit, ushape, width))
        for rel in ctx.targets:  # report in module order
            ctx.report.modules.append(records[rel])

    def _record(self, ctx: BlockContext, rel: str) -> ModuleRecord:
        mod = ctx.targets[rel]
        n_params = _nparams(mod)
        return ModuleRecord(
            name=f"{ctx.prefix}.{rel}",
            group=ctx.spec.group_of(rel),
            shape=linear_shape(mod),
            kind="dense",
            params_before=n_params,
            params_after=n_params,
        )

    def _lowrank(self, ctx: BlockContext, rel: str, rank: int | None) -> ModuleRecord:
        rec = self._record(ctx, rel)
        if rank is None:
            return rec
        t0 = time.perf_counter()
        mod = ctx.targets[rel]
        full = f"{ctx.prefix}.{rel}"
        W = linear_weight(mod).detach()
        stats = ctx.stats.get(rel)
        if _has_tokens(stats):
            s = stats.sq_mean.to(W.device).clamp_min(0).sqrt()
        else:
            s = torch.ones(W.shape[1], dtype=torch.float64, device=W.device)
            ctx.report.warnings.append(f"{full}: no calibration input observed; plain SVD used")
        try:
            check_finite(s, f"{full}: activation scale")
            dec = column_scaled(W.to(torch.float64), s)
            A, B = dec.factors(rank)
        except torch.linalg.LinAlgError as e:
            raise NumericalError(f"{full}: linear algebra failed ({e})") from e
        bias = _bias(mod)
        new = LowRankLinear.from_factors(A, B, bias=None if bias is None else bias.detach(), like=W)
        replace_module(ctx.block, rel, new)
        gram = _gram(stats)
        m, n = rec.shape
        rec.kind, rec.rank, rec.notes = "lowrank", rank, list(dec.notes)
        rec.params_after = lowrank_params(m, n, rank) + (0 if bias is None else bias.numel())
        rec.rel_error = output_error(W, A @ B, gram) if gram is not None else None
        rec.seconds = time.perf_counter() - t0
        for note in dec.notes:
            ctx.report.warnings.append(f"{full}: {note}")
        return rec

    def _prune(
        self, ctx: BlockContext, unit: Unit, ushape: pruning.UnitShape, width: int
    ) -> dict[str, ModuleRecord]:
        recs = {rel: self._record(ctx, rel) for rel in (*unit.inputs, unit.output)}
        if width >= ushape.channels:
            return recs
        t0 = time.perf_counter()
        out_mod = ctx.targets[unit.output]
        W_out = linear_weight(out_mod).detach()
        st_out = ctx.stats.get(unit.output)
        q_out = st_out.sq_mean if _has_tokens(st_out) else None
        inputs = []
        for rel in unit.inputs:
            st = ctx.stats.get(rel)
            inputs.append(
                (linear_weight(ctx.targets[rel]).detach(), st.sq_mean if _has_tokens(st) else None)
            )
        if q_out is None or any(q is None for _, q in inputs):
            ctx.report.warnings.append(
                f"{ctx.prefix}.{unit.output}: no calibration input observed; channels scored by "
                "weight magnitude only"
            )
        scores = pruning.channel_scores(inputs, (W_out, q_out), fused=unit.fused)
        check_finite(scores, f"{ctx.prefix}.{unit.output}: channel scores")
        keep = pruning.select_channels(scores, ushape.channels - width, ushape.n_least)
        seconds = time.perf_counter() - t0
        for rel, (W, _) in zip(unit.inputs, inputs, strict=True):
            t1 = time.perf_counter()
            mod = ctx.targets[rel]
            bias = _bias(mod)
            Wk, bk = pruning.prune_rows(
                W, None if bias is None else bias.detach(), keep, unit.fused
            )
            new = _new_linear(Wk, bk)
            rows = pruning.fused_rows(keep, ushape.channels) if unit.fused else keep
            recs[rel].rel_error = _masked_error(
                W, rows.to(W.device), None, _gram(ctx.stats.get(rel))
            )
            replace_module(ctx.block, rel, new)
            recs[rel].seconds = time.perf_counter() - t1
        t1 = time.perf_counter()
        W_new, recs[unit.output].rel_error = kept_columns(
            W_out, st_out, keep, self.refit, self.ridge, f"{ctx.prefix}.{unit.output}"
        )
        new = _new_linear(W_new, _bias(out_mod))
        replace_module(ctx.block, unit.output, new)
        recs[unit.output].seconds = time.perf_counter() - t1 + seconds
        for rel, rec in recs.items():
            rec.kind, rec.width = "pruned", width
            rec.params_after = _nparams(ctx.block.get_submodule(rel))
        return recs


def _masked_error(W, rows, cols, gram) -> float | None:
    """Relative calibration output error of W with only ``rows`` / ``cols`` kept (others zero)."""
    if gram is None:
        return None
    Wm = torch.zeros_like(W, dtype=torch.float64)
    if rows is not None:
        Wm[rows] = W[rows].to(torch.float64)
    else:
        Wm[:, cols] = W[:, cols].to(torch.float64)
    return output_error(W, Wm, gram)


def kept_columns(
    W: torch.Tensor,
    stats: LayerStats | None,
    keep: torch.Tensor,
    refit: bool,
    ridge: float,
    where: str,
    target_cross: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float | None]:
    """The output linear of a pruned MLP unit on its kept input channels, and its relative
    calibration output error (None without statistics).

    ``refit`` (formula 2): the least-squares optimum on the kept channels, anchored when ``stats``
    holds a cross-Gram, or towards the outputs Y of ``target_cross`` = Y H̃^T when given; else (or
    without statistics) the kept columns as they are.
    """
    gram = _gram(stats)
    if gram is None:
        return pruning.prune_cols(W, keep), None
    if refit:
        try:
            if target_cross is not None:
                W_new = refit_to_target(target_cross, stats.gram, keep, ridge=ridge).to(W.dtype)
            else:
                W_new = refit_columns(W, stats.gram, stats.cross, keep, ridge=ridge).to(W.dtype)
        except NumericalError as e:
            raise NumericalError(f"{where}: {e}") from e
    else:
        W_new = pruning.prune_cols(W, keep)
    Wk = torch.zeros_like(W, dtype=torch.float64)
    Wk[:, keep.to(W.device)] = W_new.to(torch.float64)
    return W_new, output_error(W, Wk, gram)


# --- builder ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LoRAPConfig(MethodConfig):
    """LoRAP's options (module docstring): ``a`` low-rank degree (v / o keep ``a`` times the
    parameters of q / k), ``keep_least`` fraction of MLP channels always kept, ``attn_ratio`` /
    ``mlp_ratio`` one sub-layer's ratio (None: both get ``ratio``), ``channel_multiple`` kept
    channels rounded to it, ``uniform_attention`` (ablation) the same fraction for every matrix,
    ``refit`` (not in LoRAP's paper; METHODS.md formula 2) down_proj replaced by the least-squares
    optimum on the kept channels instead of sliced.
    Ranks and channels are allocated per block by LoRAP itself: no other allocation, no fixed rank.
    """

    method: ClassVar[str] = "lorap"
    allocations: ClassVar[tuple[str, ...]] = ("uniform",)
    fixed_rank: ClassVar[bool] = False

    a: float = 3.0
    keep_least: float = 0.01
    attn_ratio: float | None = None
    mlp_ratio: float | None = None
    channel_multiple: int = 8
    uniform_attention: bool = False
    refit: bool = False

    def validate(self) -> None:
        self.check_number("a", 0, low_open=True)
        self.check_number("keep_least", 0, 0.5, high_open=True)
        self.check_number("attn_ratio", 0, 1, high_open=True, none=True)
        self.check_number("mlp_ratio", 0, 1, high_open=True, none=True)
        self.check_int("channel_multiple")
        self.check_bool("uniform_attention")
        self.check_bool("refit")


def build_lorap(plan) -> LoRAPCompressor:
    config = plan.config
    if config.attn_ratio is not None and config.mlp_ratio is not None:
        log.info(
            "lorap: attn_ratio=%s and mlp_ratio=%s both given: the requested ratio %s is not enforced",
            config.attn_ratio,
            config.mlp_ratio,
            config.ratio,
        )
    return LoRAPCompressor(config.ratio, rank_multiple=plan.rank_multiple, **config.options())


register(LoRAPConfig, build_lorap, doc="low-rank attention + structured MLP pruning")
