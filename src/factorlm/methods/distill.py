"""Low-Rank Feature Distillation ("Lillama", Sy et al. 2024) as a block compressor.

Per block:

1. **Init**: by default LoRAP's block (low-rank attention + pruned MLP: the pruned linears are
   trained too), the most accurate start measured; or the training-free compressor of ``init``
   (``svd`` as in the paper, ``svd-llm``, ``asvd``, ``nsvd``, ``fwsvd``), which factorizes every
   targeted linear with the ranks of the allocation policy (``uniform`` / ``global`` /
   ``bottom-first``, shared with the training-free methods; with a policy other than uniform, or a
   fixed / minimum rank, the default init is ``svd-llm``).
2. **Local distillation**: teacher = the original block (its outputs on the dense model's
   activations, ``ctx.teacher_outputs``), student = the block with :class:`LowRankLinear` modules.
   Loss (:mod:`factorlm.methods.distill_loss`): ``L_T`` (student fed the teacher's input) +
   ``L_S`` (student fed its own compressed input), both against the teacher's output. Only the
   block's replaced linears (low-rank factors, pruned linears, their biases; norm weights with
   ``train_norms=True``) receive gradients; nothing crosses blocks; AdamW, no schedule.
3. The last ``holdout`` calibration batches are not trained on: the block loss on them at init and
   after training goes into the report (``loss_before`` / ``loss_after``).
4. With ``e2e_epochs`` > 0, once every block is done: end-to-end refinement of the whole model
   against the dense model's next-token distributions (:mod:`factorlm.methods.distill_e2e`).
   ``epochs=0`` skips step 2 (the init, then this stage).

The block stays in eval mode while training (no dropout, no router jitter; Mamba takes the same
pure-torch path as at inference), so training is deterministic given the seed and a resumed run
reproduces an uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from factorlm.arch.modules import get_submodule, linear_weight
from factorlm.calibration.pipeline import BlockCompressor, BlockContext
from factorlm.errors import ConfigError
from factorlm.methods import asvd, fwsvd, nsvd, svd, svdllm  # noqa: F401  (register the inits)
from factorlm.methods.base import register
from factorlm.methods.distill_loss import feature_loss
from factorlm.methods.distill_options import (  # noqa: F401  (re-exported)
    BLOCK_INIT_NAMES,
    LOSS_TERMS,
    DistillConfig,
    default_balance,
    default_lr,
    holdout_count,
    resolve_init,
)
from factorlm.methods.linalg import balance_factors, output_error
from factorlm.methods.lorap import build_lorap
from factorlm.methods.modular import build_modular
from factorlm.methods.train_step import (
    fp32_masters,
    master_step,
    same_step_count,
    train_autocast,
)
from factorlm.methods.trainingfree import build_trainingfree
from factorlm.nn.lowrank import LowRankLinear
from factorlm.utils import to_device

log = logging.getLogger(__name__)

#: inits that are whole block compressors rather than per-matrix factorizations
BLOCK_INITS = {
    "lorap": build_lorap,
    "modular": build_modular,
}  # its keys are distill_options.BLOCK_INIT_NAMES


def _slice_rows(obj: Any, b: int, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every batch-shaped tensor (>= 2-D with leading dim ``b``) in ``obj``."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if b > 1 and obj.dim() >= 2 and obj.shape[0] == b else obj
    if isinstance(obj, dict):
        return {k: _slice_rows(v, b, start, stop) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice_rows(v, b, start, stop) for v in obj)
    return obj


def _token_mask(kwargs: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor | None:
    """A 2-D padding mask (batch x seq) among the block's kwargs, if there is one."""
    m = kwargs.get("attention_mask")
    if isinstance(m, torch.Tensor) and m.dim() == 2 and tuple(m.shape) == tuple(hidden.shape[:2]):
        return m
    return None


def _distributed():
    """The :mod:`factorlm.distributed` helpers when several processes compress together, else None."""
    try:
        from factorlm import distributed
    except ImportError:  # pragma: no cover
        return None
    return distributed if distributed.is_dist() else None


def _is_norm(mod: nn.Module) -> bool:
    return (
        isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))
        or "norm" in type(mod).__name__.lower()
    )


class DistillCompressor:
    """Training-free init of a block, then local feature distillation of its low-rank factors."""

    teacher_stream = True

    def __init__(
        self,
        init: BlockCompressor,
        options: dict[str, Any],
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.init = init
        self.o = dict(options)  # DistillConfig.distill_options(): complete and checked
        if self.o["init"] is None:
            raise ConfigError("DistillCompressor needs the init method's name (see resolve_init)")
        if self.o["lr"] is None:
            self.o["lr"] = default_lr(self.o["init"])
        if self.o["balance"] is None:
            self.o["balance"] = default_balance(self.o["init"])
        self.seed = int(seed)
        self.progress = progress
        self.needs = frozenset(init.needs) | {"gram"}
        # an init that runs the block's calibration passes itself (modular): the pipeline collects
        # no statistics for it, and the teacher's outputs are computed here (compress_block)
        self.own_passes = bool(getattr(init, "own_passes", False))
        self._warned_no_holdout = False

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _trainable(self, ctx: BlockContext) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for rel, orig in ctx.targets.items():
            mod = get_submodule(ctx.block, rel)
            if mod is not orig:  # factorized (LowRankLinear) or pruned (smaller nn.Linear)
                params += [p for p in mod.parameters() if p.is_floating_point()]
        if self.o["train_norms"] and params:
            for mod in ctx.block.modules():
                if _is_norm(mod) and not isinstance(mod, LowRankLinear):
                    params += [p for p in mod.parameters(recurse=False) if p.is_floating_point()]
        seen: set[int] = set()
        return [p for p in params if not (id(p) in seen or seen.add(id(p)))]

    def _units(self, ctx: BlockContext, batches: list[int]) -> list[tuple[int, int, int]]:
        """(batch index, first row, last row + 1) of every optimizer step of one epoch."""
        out = []
        for j in batches:
            b = ctx.streams.student[j].shape[0]
            mb = self.o["micro_batch"] or b
            out += [(j, s, min(s + mb, b)) for s in range(0, b, mb)]
        return out

    def _inputs(
        self, ctx: BlockContext, j: int, start: int, stop: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor, torch.Tensor | None]:
        """Inputs for the active loss terms, kwargs, target and token mask of one unit (on device)."""
        dev = ctx.device
        s_in = ctx.streams.student[j]
        b = s_in.shape[0]
        kw = _slice_rows(ctx.streams.kwargs[j], b, start, stop)
        kw = to_device(kw, dev)
        target = self._targets[j][start:stop].to(dev)
        ins = {}
        if self._terms & {"teacher"}:
            ins["teacher"] = self._teacher_in[j][start:stop].to(dev)
        if self._terms & {"student"}:
            ins["student"] = s_in[start:stop].to(dev)
        return ins, kw, target, _token_mask(kw, ins[next(iter(ins))])

    def _loss(self, ctx: BlockContext, j: int, start: int, stop: int, backward: bool) -> float:
        """Sum of the active loss terms on one unit; with ``backward`` accumulate gradients term by
        term (one activation graph at a time)."""
        ins, kw, target, mask = self._inputs(ctx, j, start, stop)
        total = 0.0
        for h in ins.values():
            with train_autocast(self.o["autocast"], ctx.device):
                out = self._forward(ctx.block, h, kw)
            loss = feature_loss(out, target, mask) * self._weight
            if backward:
                loss.backward()
            total += float(loss.detach())
            del out, loss
        return total

    def _heldout_loss(self, ctx: BlockContext, batches: list[int]) -> float:
        num, den = 0.0, 0.0
        with torch.no_grad():
            for j in batches:
                b = ctx.streams.student[j].shape[0]
                n_tok = ctx.streams.student[j].shape[:-1].numel()
                num += self._loss(ctx, j, 0, b, backward=False) * n_tok
                den += n_tok
        if (d := _distributed()) is not None:  # over the held-out batches of every process
            num, den = d.all_sum([num, den])
        return num / max(den, 1.0)

    # -- the block compressor -------------------------------------------------------------------

    def compress_block(self, ctx: BlockContext) -> None:
        t0 = time.perf_counter()
        n = len(ctx.streams.student)
        k = holdout_count(n, self.o["holdout"])
        train = list(range(n - k))
        held = list(range(n - k, n)) if k else train
        if not k and not self._warned_no_holdout:
            self._warned_no_holdout = True
            ctx.report.warnings.append(
                "distill: no held-out calibration batch (holdout=0 or a single batch): "
                "loss_before / loss_after are measured on the training batches"
            )

        # dense weights (offloaded) for the per-matrix errors after training
        dense_w = {rel: linear_weight(m).detach().to(ctx.offload) for rel, m in ctx.targets.items()}
        if ctx.teacher_outputs is None and ctx.streams.teacher is not None:
            # the dense block on the teacher stream, before the init
            ctx.teacher_outputs = ctx.forward(ctx.streams.teacher)
        self.init.compress_block(ctx)
        if self.o["balance"]:
            self._balance(ctx)
        params = self._trainable(ctx)
        if (
            not params
            or (self.o["steps"] is None and self.o["epochs"] == 0)
            or self.o["steps"] == 0
        ):
            return

        # teacher side: the dense block's outputs on the dense model's activations
        if ctx.teacher_outputs is not None and ctx.streams.teacher is not None:
            self._teacher_in, self._targets = ctx.streams.teacher, ctx.teacher_outputs
        else:
            self._teacher_in, self._targets = ctx.streams.student, ctx.dense_outputs
        terms = {"joint": {"teacher", "student"}, "teacher": {"teacher"}, "student": {"student"}}
        self._terms = terms[self.o["loss_terms"]]
        self._weight = 1.0
        if len(self._terms) == 2 and all(
            torch.equal(s, t) for s, t in zip(ctx.streams.student, self._teacher_in, strict=True)
        ):
            # first block: both inputs are the same, L_T == L_S; compute it once, count it twice
            self._terms, self._weight = {"student"}, 2.0

        # freeze the block, unfreeze the factors (restore the other flags afterwards)
        flags = {id(p): p.requires_grad for p in ctx.block.parameters()}
        ctx.block.requires_grad_(False)
        ctx.block.eval()
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        masters = fp32_masters(params)
        opt = torch.optim.AdamW(
            masters,
            lr=float(self.o["lr"]),
            betas=tuple(float(x) for x in self.o["betas"]),
            weight_decay=float(self.o["weight_decay"]),
        )
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.index)
        epoch_units = self._units(ctx, train)
        total = (
            self.o["steps"] if self.o["steps"] is not None else self.o["epochs"] * len(epoch_units)
        )
        total = same_step_count(total)

        loss_before = self._heldout_loss(ctx, held)
        init_values = (
            [p.detach().to(ctx.offload, copy=True) for p in params] if self.o["keep_best"] else None
        )
        bar = tqdm(
            total=total,
            desc=f"distill {ctx.prefix}",
            unit="step",
            leave=False,
            disable=not self.progress,
        )
        step = 0
        try:
            with torch.enable_grad():
                for j, s, e in self._schedule(epoch_units, total, gen, self.o["shuffle"]):
                    loss = self._loss(ctx, j, s, e, backward=True)
                    master_step(params, masters, opt)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
        finally:
            bar.close()
            for p in params:
                p.grad = None
            for p in ctx.block.parameters():
                p.requires_grad_(flags[id(p)])
            for p in params:  # the trained factors end frozen
                p.requires_grad_(False)
            del opt, masters
        ctx.block.eval()
        loss_after = self._heldout_loss(ctx, held)
        if init_values is not None and loss_after > loss_before:
            # training made the held-out loss worse (too high a learning rate, too few tokens):
            # keep the init rather than hand a worse block to the next one
            with torch.no_grad():
                for p, v in zip(params, init_values, strict=True):
                    p.copy_(v)
            ctx.report.warnings.append(
                f"{ctx.prefix}: distillation raised the held-out block loss "
                f"({loss_before:.5f} -> {loss_after:.5f}); the init's weights were kept"
            )
            loss_after = loss_before  # the init's exact weights: its held-out loss is known
        del init_values
        self._teacher_in = self._targets = None
        self._update_module_errors(ctx, dense_w)
        log.info(
            "%s: held-out block loss %.5f -> %.5f (%d steps, %.1f s)",
            ctx.prefix,
            loss_before,
            loss_after,
            step,
            time.perf_counter() - t0,
        )
        ctx.extra["block_record"] = {"loss_before": loss_before, "loss_after": loss_after}

    def finish(self, plan, streams) -> None:
        """The end-to-end stage (``e2e_epochs``) once every block is compressed."""
        if self.o["e2e_epochs"]:
            from factorlm.methods.distill_e2e import after_blocks

            after_blocks(plan, streams, self.o, self.seed, self.progress)

    @staticmethod
    def _balance(ctx: BlockContext) -> None:
        for rel in ctx.targets:
            mod = get_submodule(ctx.block, rel)
            if isinstance(mod, LowRankLinear):
                with torch.no_grad():
                    A, B = balance_factors(mod.A.weight, mod.B.weight)
                    mod.A.weight.copy_(A)
                    mod.B.weight.copy_(B)

    @staticmethod
    def _schedule(
        units: list[tuple[int, int, int]], total: int, gen: torch.Generator, shuffle: bool = False
    ) -> Iterator[tuple[int, int, int]]:
        done = 0
        while done < total and units:
            order = (
                torch.randperm(len(units), generator=gen).tolist() if shuffle else range(len(units))
            )
            for i in order:
                if done >= total:
                    return
                yield units[i]
                done += 1

    def _update_module_errors(self, ctx: BlockContext, dense_w: dict[str, torch.Tensor]) -> None:
        """Per-matrix calibration error after training (the init's is kept in the notes); none
        after an init with its own passes (the pipeline collected no statistics)."""
        records = {r.name: r for r in ctx.report.modules if r.kind == "lowrank"}
        for rel, W in dense_w.items():
            rec = records.get(f"{ctx.prefix}.{rel}")
            mod = get_submodule(ctx.block, rel)
            stats = ctx.stats.get(rel)
            if rec is None or not isinstance(mod, LowRankLinear):
                continue
            if stats is None or stats.gram is None or stats.n_tokens == 0:
                continue
            with torch.no_grad():
                W_hat = mod.dense_weight().detach()
                err = output_error(W.to(W_hat.device), W_hat, stats.gram_mean.to(W_hat.device))
            if rec.rel_error is not None:
                rec.notes.append(f"init rel_error {rec.rel_error:.4g} (before distillation)")
            rec.rel_error = err


def build_distill(plan) -> DistillCompressor:
    """Builder: the init method's block compressor (same ratio, allocation and rank), then the
    distillation of every block it compresses."""
    config: DistillConfig = plan.config
    init_plan = dataclasses.replace(plan, config=config.init_config())
    init = BLOCK_INITS.get(config.init, build_trainingfree)(init_plan)
    return DistillCompressor(
        init, config.distill_options(), seed=plan.run.seed, progress=plan.progress
    )


register(DistillConfig, build_distill, doc="low-rank feature distillation (Lillama)")
