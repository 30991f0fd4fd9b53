"""``modular``: whitened low-rank attention + structured MLP with a closed-form refit.

The recipe combines the ideas that moved the state of the art past LoRAP (METHODS.md, "The state of
the art since"), each a closed-form step in float64:

* **Anchored fits** (AA-SVD's objective, formula 1), optional (``anchored=True``): every fit
  targets the *dense* model's output W X from the *compressed* model's input X̃; both streams go
  through each block; ``anchor_weight`` w < 1 blends that target with the plain one (w W X +
  (1 - w) W X̃); ``anchor_mlp=False`` anchors the attention's fits only. Off by default: see the
  ablation rows in ``bench/results/``.
* **Attention**: each q/k/v/o matrix gets the whitened (svd-llm; anchored when asked) rank-r fit
  (:func:`factorlm.methods.anchored.anchored_lowrank`) with LoRAP's low-rank-degree ranks (v and o
  keep ``a`` times the parameters of q and k; GQA-safe, every rank from the matrix's own shape);
  a factorization that saves fewer weights than an extra kernel launch costs on the compute device
  (``min_saving``) stays dense and the other matrices take its cut. With ``refit_o`` (default),
  o_proj is then fitted again on the compressed q/k/v's output towards its output through the
  dense ones (low-rank, or by least squares where it stays dense). With ``qk_scores`` (default)
  q and k are fitted for the attention scores: each one's error is weighted by the other's
  per-head covariance (:mod:`factorlm.methods.qk_scores`).
  With ``attention="modules"`` (formula 3) the same parameters are spent on whole head
  dimensions instead: value-output pairs per key/value head, q/k by rotary pairs
  (:mod:`factorlm.methods.modular_heads`); v_proj's rows and o_proj's columns really go.
* **MLP** (MoDeGPT's Nyström step, formula 2): keep ``k`` intermediate channels chosen by ``select``
  (a greedy backward elimination on the refit's own error, the default; LoRAP's score; ridge
  leverage of the intermediate activations; their output energy), remove the other rows of gate/up (and fc1 /
  fused gate_up) and replace down by the (anchored) least-squares optimum on the kept channels
  (``refit``). With ``compensate`` (default where the refit is plain, not anchored) its target is
  the dense block's output on the same input, so it also cancels what the compressed attention
  changed (it runs the dense MLP once more per block: about 16 % of the recipe's time).
  The model really shrinks; MoE experts are units of their own (their routed tokens differ
  between the streams, so they are refit on the compressed stream alone).
* **Loss-aware allocation** (formula 4, the default): per-block ratios from one blockwise
  backward pass (:mod:`factorlm.methods.modular_alloc`); ``loss_split`` also splits each block's
  budget between its attention and its MLP by their own sensitivities. With ``loss_metric`` (on
  by default where it applies: the loss-aware allocation and a greedy / energy channel choice)
  the same pass gives the metric in which the output errors of the MLP's channel selection and
  of low-rank v_proj / o_proj fits are measured: the Gram of the loss's gradient at the
  sub-layer's output (:mod:`factorlm.methods.loss_metric`).

The calibration passes are in :mod:`factorlm.methods.modular_pass`. Per block (sequential): (1)
the dense stream runs through the dense block, recording the inputs of every targeted linear and
the block's dense output (the next block's dense stream); the compressed stream runs through the
same block accumulating G̃ and C of the attention linears (with ``compensate`` it runs whole: its
output is the target of the MLP's refit); the attention is compressed (with ``refit_o``: q/k/v
first, o_proj after one more attention-only pass through the compressed q/k/v). (2) The
compressed stream runs through the block again (compressed attention, dense MLP), accumulating
the MLP's statistics against the recorded dense inputs; the MLP is compressed. (3) The pipeline
computes the block's compressed outputs; with ``compensate``, where they fit in memory, pass (2)
kept the down_proj's inputs and the rest of the block's output, so the outputs are that rest
plus the refit down_proj on the kept channels (one forward per block fewer; the first batch
runs the block and checks the sum). The budget split between attention and MLP: every
block's attention loses the same share (``attn_ratio``; by default a rule of the requested ratio,
:func:`factorlm.methods.modular_alloc.default_attn_ratio`), its MLP the rest of the block's budget
(the loss-aware allocation's differences between blocks all go to the MLPs); ``attn_ratio="block"``
gives each attention its block's ratio, ``mlp_ratio`` fixes the MLP's instead. Passes whose
outputs nobody reads end at the last linear whose statistics they need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from factorlm.arch.match import match
from factorlm.calibration.anchored import (
    InputLog,
)
from factorlm.calibration.pipeline import BlockContext
from factorlm.errors import ConfigError
from factorlm.methods.base import register
from factorlm.methods.config import MethodConfig
from factorlm.methods.lorap import LoRAPCompressor
from factorlm.methods.modular_alloc import block_metrics, planned_attn_ratio
from factorlm.methods.modular_attn import lowrank_fit, qk_metrics, refit_dense
from factorlm.methods.modular_heads import compress_heads, plan_heads
from factorlm.methods.modular_mlp import METRIC_SELECTS, prune_unit
from factorlm.methods.modular_pass import (
    StructureChecks,
    block_pass,
    can_keep,
    o_pass,
    outputs_from_kept,
    residual_target,
)
from factorlm.rank.allocation import rank_policy
from factorlm.report.schema import ModuleRecord

SELECTS = ("lorap", "leverage", "energy", "greedy")
QK_NOTE = "fitted for the attention scores (qk_scores)"
LOSS_NOTE = "fitted in the loss's output metric (loss_metric)"
ATTENTIONS = ("lowrank", "modules")


@dataclass(frozen=True, kw_only=True)
class ModularConfig(MethodConfig):
    """Options of ``modular`` (validated when built). Ranks and channels are allocated per block
    (``allocation="loss"``: per-block ratios from the loss's sensitivity); no fixed rank."""

    method: ClassVar[str] = "modular"
    # 2: attn_ratio=None means the default rule, not the block ratio; 3: loss_gamma's rule
    version: ClassVar[int] = 3
    allocations: ClassVar[tuple[str, ...]] = ("uniform", "loss")
    default_allocation: ClassVar[str] = "loss"
    fixed_rank: ClassVar[bool] = False

    anchored: bool = False  # fits target the dense model's outputs (two streams per block)
    # anchored: weight w of the dense target; the fits minimise w ||W X - W' X~||^2 +
    # (1 - w) ||W X~ - W' X~||^2 (1: AA-SVD's objective, 0: the plain fits)
    anchor_weight: float = 1.0
    anchor_mlp: bool = True  # anchored: the down_proj refit is anchored too (False: attention only)
    select: str = "greedy"  # how the kept MLP channels are chosen: one of SELECTS
    # attention: per-matrix low-rank fits ("lowrank"), or head modules ("modules": value-output
    # pairs by a whitened SVD per key/value head, q/k by whole rotary pairs; see
    # factorlm.methods.heads) with the same parameter budget
    attention: str = "lowrank"
    refit: bool = True  # down_proj refit by least squares on the kept channels
    # the refit down_proj also cancels the error of the block's compressed attention: its target
    # is the dense block's output on the same input minus the residual it is added to (where the
    # block adds the MLP's output to its own, checked once per block class; else the plain refit;
    # one more dense-MLP forward per block). None: on unless anchored or refit=False
    compensate: bool | None = None
    # o_proj is fitted again after q/k/v are compressed, on their output, towards its output
    # through the dense q/k/v, so it also cancels their error: its low-rank fit, or, where it
    # stays dense, the least-squares W C (G~ + λ I)^-1 (one more attention-only pass; anchored and
    # head modules leave it out: the anchored fit of o_proj already has its own target)
    refit_o: bool = True
    # q and k fitted for the attention scores: each one's output error is measured in the metric
    # of the other's per-head covariance (k's in that of the queries that read it, q's in that of
    # its key head; factorlm.methods.qk_scores), so the fits keep what the scores q^T k see. Where
    # q/k pass through a per-head norm (qwen3, gemma3) or the attention is not four head-shaped
    # linears, the plain fits
    qk_scores: bool = True
    a: float = 3.0  # LoRAP's low-rank degree: v/o keep a x the parameters of q/k
    # fraction of every block's attention removed, the MLP taking the rest of the block's budget:
    # a number; "block" (the block's own ratio); None: the default rule of
    # factorlm.methods.modular_alloc.default_attn_ratio (the MLP's remainder when mlp_ratio is
    # given)
    attn_ratio: float | str | None = None
    mlp_ratio: float | None = None  # fraction of the MLP removed (None: the remainder)
    channel_multiple: int = 8  # kept MLP widths are multiples of this
    # an attention factorization saving fewer weights than this stays dense (the other matrices
    # take its cut): None = what one extra kernel launch costs on the compute device (16,384
    # weights on CPU, 1 M on CUDA: factorlm.rank.allocation.RANK_POLICIES); 0 = off
    min_saving: int | None = None
    leverage_ridge: float = 1e-2  # λ of the ridge leverage scores, relative to mean(diag G̃)
    # λ of every least-squares fit (anchored low-rank, down refit): G̃ + λ mean(diag G̃) I, a ridge
    # penalty λ ||W'||^2 that keeps the fits from chasing calibration noise
    ridge: float = 1e-6
    # allocation="loss": block ratio ∝ sensitivity^-loss_gamma, from a backward pass over
    # the first loss_samples calibration sequences (shared out among processes; see
    # factorlm.rank.loss_aware); None: the default rule of
    # factorlm.methods.modular_alloc.default_loss_gamma (0.5 in versions 1-2)
    loss_gamma: float | None = None
    loss_samples: int = 8
    # allocation="loss": tokens whose block update exceeds this many times the median (massive
    # activations: attention sinks, delimiters) are left out of the sensitivities (0: keep all)
    loss_outlier: float = 100.0
    # allocation="loss": also split each block's budget between its attention and its MLP by
    # their own sensitivities (False: attn_ratio's split); applies when attn_ratio is None or
    # "block" and mlp_ratio is not given
    loss_split: bool = False
    # allocation="loss": measure the output errors of the MLP's channel selection (greedy /
    # energy) and of low-rank o_proj / v_proj fits in the metric of the loss's gradient Gram at
    # the sub-layer's output, shrunk towards I by loss_metric_shrink (0: as measured; 1: the
    # Euclidean metric for the MLP and o_proj) (factorlm.methods.loss_metric). None: on where it
    # applies (allocation="loss" and select greedy / energy)
    loss_metric: bool | None = None
    loss_metric_shrink: float = 0.0

    @classmethod
    def migrate(cls, data: dict) -> dict:
        """Version 1 meant the block's ratio by an absent ``attn_ratio``, versions 1 and 2 a
        ``loss_gamma`` of 0.5 by an absent one."""
        old = {"attn_ratio": "block"} if data["version"] < 2 else {}
        if data["version"] < 3:
            old["loss_gamma"] = 0.5
        return {**data, "options": {**old, **(data.get("options") or {})}}

    @property
    def compensates(self) -> bool:
        """Whether the down_proj refit targets the block's output (compensate=None: where it
        applies, a plain refit)."""
        if self.compensate is not None:
            return self.compensate
        return self.refit and not self.anchored

    @property
    def uses_loss_metric(self) -> bool:
        """Whether the fits are measured in the loss's output metric (loss_metric=None: where the
        allocation's backward pass measures it and the selection can weigh it)."""
        if self.loss_metric is not None:
            return self.loss_metric
        return self.allocation == "loss" and self.select in METRIC_SELECTS

    def validate(self) -> None:
        self.check_bool("anchored")
        self.check_bool("refit")
        self.check_bool("compensate", none=True)
        self.check_bool("refit_o")
        self.check_bool("qk_scores")
        if self.compensate and (self.anchored or not self.refit):
            raise ConfigError("compensate needs refit=True and anchored=False")
        self.check_bool("loss_split")
        self.check_number("anchor_weight", 0, 1)
        self.check_bool("anchor_mlp")
        self.check_choice("select", SELECTS)
        self.check_choice("attention", ATTENTIONS)
        self.check_number("a", 0, low_open=True)
        if isinstance(self.attn_ratio, str) and self.attn_ratio != "block":
            self.fail("attn_ratio", 'a number in [0, 1), "block" or None')
        if self.attn_ratio != "block":
            self.check_number("attn_ratio", 0, 1, high_open=True, none=True)
        self.check_number("mlp_ratio", 0, 1, high_open=True, none=True)
        self.check_int("channel_multiple")
        self.check_int("min_saving", 0, none=True)
        self.check_number("leverage_ridge", 0, low_open=True)
        self.check_number("loss_gamma", 0, none=True)
        self.check_int("loss_samples")
        self.check_number("loss_outlier", 0)
        self.check_bool("loss_metric", none=True)
        self.check_number("loss_metric_shrink", 0, 1)
        if self.loss_metric and self.allocation != "loss":
            raise ConfigError(
                "loss_metric needs allocation='loss' (its backward pass measures the metric)"
            )
        if self.loss_metric and self.select not in METRIC_SELECTS:
            raise ConfigError(
                f"loss_metric applies to select='greedy' or 'energy', not {self.select!r} "
                "(its scores do not measure an output error)"
            )


class ModularCompressor:
    """Block compressor of ``modular`` (see the module docstring)."""

    own_passes = True  # the pipeline leaves the block's calibration passes to compress_block
    needs: frozenset[str] = frozenset()

    def __init__(
        self,
        ratio: float,
        config: ModularConfig,
        rank_multiple: int = 8,
        block_ratios: list[float] | None = None,
        attn_ratios: list[float] | None = None,
        min_saving: int = 0,
        out_grams: list[dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.config = config
        self.out_grams = out_grams  # loss_metric: per block, output linear -> gradient Gram
        self.ratio = ratio
        self.block_ratios = block_ratios
        self.attn_ratios = attn_ratios  # per block: the attention's ratio (the MLP takes the rest)
        self.teacher_stream = config.anchored
        self.checks = StructureChecks()  # compensate's checks of the blocks' forward structure
        self.planner = LoRAPCompressor(
            ratio,
            a=config.a,
            keep_least=0.0,
            attn_ratio=planned_attn_ratio(config),
            mlp_ratio=config.mlp_ratio,
            channel_multiple=config.channel_multiple,
            uniform_attention=False,
            rank_multiple=rank_multiple,
            min_saving=min_saving,
        )

    # -- passes
    def compress_block(self, ctx: BlockContext) -> None:
        if self.block_ratios is not None:
            self.planner.ratio = self.block_ratios[ctx.index]
        if self.attn_ratios is not None:
            self.planner.attn_ratio = self.attn_ratios[ctx.index]
        units, ushapes, widths, ranks = self.planner.plan_block(ctx)
        heads = plan_heads(ctx, ranks) if self.config.attention == "modules" else None
        mlp = {r for u in units for r in (*u.inputs, u.output)}
        attn_mods = {r: ctx.targets[r] for r in ranks}
        mlp_mods = {r: ctx.targets[r] for r in ctx.targets if r in mlp}
        records: dict[str, ModuleRecord] = {}
        # (1) attention, from the dense stream and the compressed stream through the dense block
        outputs = {u.output: ctx.targets[u.output] for u in units}
        anchor_mlp = self.config.anchored and self.config.anchor_mlp
        residual = None
        if self.config.compensates:
            residual = residual_target(ctx, self.checks, units, ushapes, widths)
        o_rel = self._refit_o_target(ctx, ranks, heads)
        o_log = InputLog({o_rel: ctx.targets[o_rel]} if o_rel else {}, ctx.offload)
        stats, recorded, dense_out = block_pass(
            ctx,
            self.config,
            attn_mods,
            frozenset({"gram"}),
            set(attn_mods),
            None,
            outputs if anchor_mlp else None,
            keep_outputs=residual is not None,
            inputs_log=o_log,
        )
        if heads is not None:
            records.update(compress_heads(ctx, heads, stats, self.config.ridge, self._record))
        metrics = {}
        if self.config.qk_scores and heads is None:  # from the dense q/k, before either is fitted
            metrics = qk_metrics(ctx, ranks, stats)
        loss_metrics = {}
        if self.out_grams is not None:  # head modules: the MLP's alone
            loss_metrics = block_metrics(
                ctx,
                self.out_grams[ctx.index],
                units,
                ranks if heads is None else {},
                self.config.loss_metric_shrink,
            )
        metrics.update(loss_metrics)
        for rel, r in ranks.items():
            if rel not in records and rel != o_rel:
                records[rel] = lowrank_fit(
                    ctx,
                    rel,
                    r,
                    stats.get(rel),
                    self._record(ctx, rel),
                    self.config.ridge,
                    out_metric=metrics.get(rel),
                    metric_note=LOSS_NOTE if rel in loss_metrics else QK_NOTE,
                )
        if o_rel is not None:  # o_proj again, on the compressed q/k/v's output
            o_stats = o_pass(ctx, o_rel, o_log.inputs[o_rel])
            if ranks[o_rel] is None:
                records[o_rel] = refit_dense(
                    ctx, o_rel, o_stats, self._record(ctx, o_rel), self.config.ridge
                )
            else:
                records[o_rel] = lowrank_fit(
                    ctx,
                    o_rel,
                    ranks[o_rel],
                    o_stats,
                    self._record(ctx, o_rel),
                    self.config.ridge,
                    out_metric=metrics.get(o_rel),
                    metric_note=LOSS_NOTE,
                )
        del o_log
        # (2) the MLP, on the compressed stream through the block's compressed attention (no
        # pass when every unit keeps its width)
        stats = {}
        if residual is not None and can_keep(ctx, ushapes[0].channels):
            residual.keep_to(ctx.offload)  # the block's outputs without pass (3)
        if any(w < s.channels for s, w in zip(ushapes, widths, strict=True)):
            stats, _, _ = block_pass(
                ctx,
                self.config,
                mlp_mods,
                frozenset({"gram", "sq"}),
                set(outputs) if anchor_mlp else set(),
                recorded if anchor_mlp and ctx.streams.teacher is not None else None,
                residual=None if residual is None else (residual, dense_out),
            )
        del recorded, dense_out
        target_cross = None
        if residual is not None:
            target_cross = residual.cross
        for unit, ushape, width in zip(units, ushapes, widths, strict=True):
            recs, keep = prune_unit(
                ctx,
                unit,
                ushape,
                width,
                stats,
                self.config,
                self._record,
                target_cross,
                out_metric=loss_metrics.get(unit.output),
            )
            records.update(recs)
            if residual is not None and residual.kept is not None and keep is not None:
                ctx.outputs = outputs_from_kept(ctx, residual, unit.output, keep)
        for rel in ctx.targets:  # report in module order
            ctx.report.modules.append(records[rel])

    def _refit_o_target(self, ctx, ranks, heads) -> str | None:
        """``refit_o``: the block's o_proj (None: off, anchored, head modules, or no other
        attention linear factorized, so o_proj's input does not change)."""
        if not self.config.refit_o or self.config.anchored or heads is not None:
            return None
        o = ctx.spec.roles.get("o")
        rels = [r for r in ranks if o is not None and match(o, r)]
        if len(rels) != 1 or all(ranks[r] is None for r in ranks if r != rels[0]):
            return None
        return rels[0]

    def _record(self, ctx: BlockContext, rel: str) -> ModuleRecord:
        return self.planner._record(ctx, rel)  # the same "dense" record as LoRAP's


def build_modular(plan) -> ModularCompressor:
    from factorlm.methods.modular_alloc import loss_aware_block_ratios

    config: ModularConfig = plan.config
    alloc = loss_aware_block_ratios(plan, config) if config.allocation == "loss" else None
    min_saving = config.min_saving
    if min_saving is None:  # head modules add no matmul: no launch to pay for
        min_saving = 0 if config.attention == "modules" else rank_policy(plan.device).launch_weights
    plan.report.calibration["min_saving"] = min_saving
    return ModularCompressor(
        config.ratio,
        config,
        rank_multiple=plan.rank_multiple,
        block_ratios=None if alloc is None else alloc.ratios,
        attn_ratios=None if alloc is None else alloc.attn_ratios,
        min_saving=min_saving,
        out_grams=None if alloc is None else alloc.out_grams,
    )


register(ModularConfig, build_modular, doc="whitened low-rank attention + refit structured MLP")
