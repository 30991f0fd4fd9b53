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

The block stays in eval mode while training (no dropout, no router jitter; Mamba takes the same
pure-torch path as at inference), so training is deterministic given the seed and a resumed run
reproduces an uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
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
from factorlm.methods.base import METHODS, register_builder
from factorlm.methods.distill_loss import feature_loss
from factorlm.methods.linalg import balance_factors, output_error
from factorlm.methods.lorap import OPTIONS as LORAP_OPTIONS
from factorlm.methods.lorap import build_lorap
from factorlm.methods.trainingfree import build_trainingfree
from factorlm.nn.lowrank import LowRankLinear
from factorlm.utils import to_device

log = logging.getLogger(__name__)

LOSS_TERMS = ("joint", "teacher", "student")
#: inits that are whole block compressors rather than per-matrix factorizations
BLOCK_INITS = {"lorap": build_lorap}

#: Options of the distillation itself (everything else is passed to the ``init`` method).
DEFAULTS: dict[str, Any] = {
    # None: "lorap" with the uniform allocation, "svd-llm" when ranks come from elsewhere
    # (allocation "global" / "bottom-first", fixed_rank, min_rank), see :func:`resolve_init`.
    # Measured on SmolLM2-135M (bench/results/quality-cpu2.md, wiki ppl): the paper's plain svd
    # ends at 302.7 (20 %) / 2174.8 (40 %), svd-llm at 60.5 / 130.0, lorap (low-rank attention +
    # pruned MLP, both trained) at 35.6 / 75.3, the only init that beats every training-free method
    "init": None,
    # None: 3e-3 after the lorap init, 1e-3 after a plain "svd" init, 3e-4 after the other
    # (activation-aware) inits. The paper's 8.6e-5 is tuned for 13 M tokens (~1600 steps of
    # 8 x 1024 tokens); with the default calibration (64 x 512 tokens) it barely moves the factors.
    # Measured on SmolLM2-135M, 20 %, first 6 blocks, 2 sequences per step, held-out loss of
    # block 5 after training (ad-hoc runs, not committed):
    #   svd-llm init: 1e-4 1.810, 3e-4 1.773, 1e-3 1.803; balanced: 3e-4 1.790, 1e-3 1.778,
    #                 3e-3 1.879; 3 epochs at 3e-4 1.734
    #   lorap init:   3e-4 1.547, 3e-3 1.503; balanced: 1e-3 1.483, 3e-3 1.474, 1e-2 diverges
    # (4 blocks, one batch of 8 per step, block 0: svd init 8.6e-5 1.95, 3e-4 1.78, 1e-3 1.62)
    "lr": None,
    "betas": (0.9, 0.999),
    "weight_decay": 0.0,  # decay would pull the factors towards 0, not towards the init
    "epochs": 1,
    "steps": None,  # optimizer steps per block; overrides epochs (cycles over the batches)
    # sequences per optimizer step (None: one calibration batch). 2: four steps per batch of 8 at
    # the same cost (SmolLM2, 4 blocks, svd-llm init: 60.4 s vs 62.8 s, block-3 held-out loss
    # 1.558 vs 1.586; 1 sequence per step: 1.548 but 70 s)
    "micro_batch": 2,
    "holdout": 0.1,  # fraction (float < 1) or number (int) of the last batches kept out
    "loss_terms": "joint",
    "train_norms": False,
    # rebalance each factorization's rank-one components before training (same product, both
    # factors with the same entry size: see :func:`factorlm.methods.linalg.balance_factors`).
    # None: on after the lorap init (measured above: 1.503 -> 1.474), off otherwise (no gain)
    "balance": None,
    # restore the init when training ends with a higher held-out block loss than it started
    "keep_best": True,
    "shuffle": False,  # shuffle the (micro-)batches each epoch with the per-block generator
    "autocast": True,  # bf16 autocast on CUDA (CPU always trains in the weights' dtype)
}


def _check(name: str, ok: bool, want: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"distill option {name} must be {want}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_distill_options(o: dict[str, Any]) -> None:
    """Cheap validation of the distillation options (init method options are checked by it)."""
    _check(
        "init",
        o["init"] is None or (o["init"] in METHODS or o["init"] in BLOCK_INITS),
        f"one of {sorted([*METHODS, *BLOCK_INITS])}",
        o["init"],
    )
    lr = o["lr"]
    _check("lr", lr is None or (_is_num(lr) and lr > 0), "None or a positive number", lr)
    b = o["betas"]
    _check(
        "betas",
        isinstance(b, (tuple, list)) and len(b) == 2 and all(_is_num(x) and 0 <= x < 1 for x in b),
        "two numbers in [0, 1)",
        b,
    )
    wd = o["weight_decay"]
    _check("weight_decay", _is_num(wd) and wd >= 0, "a number >= 0", wd)
    _check("epochs", _is_int(o["epochs"]) and o["epochs"] >= 1, "an integer >= 1", o["epochs"])
    s = o["steps"]
    _check("steps", s is None or (_is_int(s) and s >= 0), "None or an integer >= 0", s)
    mb = o["micro_batch"]
    _check("micro_batch", mb is None or (_is_int(mb) and mb >= 1), "None or an integer >= 1", mb)
    h = o["holdout"]
    _check(
        "holdout",
        (_is_int(h) and h >= 0) or (isinstance(h, float) and 0 <= h < 1),
        "a fraction in [0, 1) or a number of batches >= 0",
        h,
    )
    _check("loss_terms", o["loss_terms"] in LOSS_TERMS, f"one of {LOSS_TERMS}", o["loss_terms"])
    bal = o["balance"]
    _check("balance", bal is None or isinstance(bal, bool), "None, True or False", bal)
    for flag in ("train_norms", "keep_best", "shuffle", "autocast"):
        _check(flag, isinstance(o[flag], bool), "True or False", o[flag])


def resolve_init(init: str | None, allocation: str, options: dict[str, Any]) -> str:
    """The init method: ``init`` when given; else LoRAP's block with the uniform allocation (the most
    accurate start measured) and svd-llm when the ranks come from an allocation policy or a fixed
    or minimum rank (which LoRAP, allocating ranks and channels itself, does not take)."""
    if init is not None:
        return init
    if allocation == "uniform" and not {"fixed_rank", "min_rank"} & set(options):
        return "lorap"
    return "svd-llm"


def default_lr(init: str) -> float:
    """AdamW learning rate when none is given (measurements next to :data:`DEFAULTS`): larger after
    the plain SVD init, which starts further from the block's optimum, and after LoRAP's block
    (balanced attention factors, pruned MLP linears)."""
    return {"lorap": 3e-3, "svd": 1e-3}.get(init, 3e-4)


def default_balance(init: str) -> bool:
    """Whether the factors are rebalanced when ``balance`` is None: after the lorap init."""
    return init == "lorap"


def holdout_count(n_batches: int, holdout: int | float) -> int:
    """How many of the last batches are held out (always leaves one to train on)."""
    if n_batches <= 1:
        return 0
    if isinstance(holdout, float):
        k = max(1, round(holdout * n_batches)) if holdout > 0 else 0
    else:
        k = holdout
    return min(k, n_batches - 1)


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
        self.o = {**DEFAULTS, **options}
        check_distill_options(self.o)
        if self.o["init"] is None:
            raise ConfigError("DistillCompressor needs the init method's name (see resolve_init)")
        if self.o["lr"] is None:
            self.o["lr"] = default_lr(self.o["init"])
        if self.o["balance"] is None:
            self.o["balance"] = default_balance(self.o["init"])
        self.seed = int(seed)
        self.progress = progress
        self.needs = frozenset(init.needs) | {"gram"}
        self._warned_no_holdout = False

    # -- helpers --------------------------------------------------------------------------------

    def _autocast(self, device) -> contextlib.AbstractContextManager:
        dev = torch.device(device)
        if self.o["autocast"] and dev.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
            with self._autocast(ctx.device):
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
        self.init.compress_block(ctx)
        if self.o["balance"]:
            self._balance(ctx)
        params = self._trainable(ctx)
        if not params:
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
        masters = []
        for p in params:
            p.requires_grad_(True)
            p.grad = None
            # low-precision weights train through an fp32 master copy
            low = p.dtype in (torch.float16, torch.bfloat16)
            masters.append(p.detach().float().clone() if low else p)
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
        dist = _distributed()
        if dist is not None:  # data parallel: every process takes the same number of steps
            counts = [0.0] * dist.world_size()
            counts[dist.rank()] = float(total)
            total = int(min(dist.all_sum(counts)))

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
                    if dist is not None:
                        dist.allreduce_grads(params)  # average over the processes
                    for p, m in zip(params, masters, strict=True):
                        if m is not p and p.grad is not None:
                            m.grad = p.grad.float()
                            p.grad = None
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    for p, m in zip(params, masters, strict=True):
                        if m is not p:
                            with torch.no_grad():
                                p.copy_(m)
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
            loss_after = self._heldout_loss(ctx, held)
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
        """Per-matrix calibration error after training (the init's is kept in the notes)."""
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
    """Builder: split the options into distillation options and the init method's options."""
    options = dict(plan.options)
    dopts = {k: options.pop(k) for k in list(options) if k in DEFAULTS}
    merged = {**DEFAULTS, **dopts}
    check_distill_options(merged)
    merged["init"] = dopts["init"] = resolve_init(merged["init"], plan.allocation, options)
    plan.report.options.setdefault("init", merged["init"])  # the report names the init used
    init_plan = dataclasses.replace(plan, method=merged["init"], options=options)
    init = BLOCK_INITS.get(merged["init"], build_trainingfree)(init_plan)
    seed = int(plan.calibration.summary.get("seed") or 0)
    return DistillCompressor(init, dopts, seed=seed, progress=plan.progress)


def _register() -> None:
    init_opts: list[str] = []
    for spec in METHODS.values():
        init_opts += [o for o in spec.options if o not in init_opts]
    init_opts += [o for o in LORAP_OPTIONS if o not in init_opts]
    extra = ("fisher_batches", "min_rank", "fixed_rank")
    register_builder("distill", build_distill, tuple(DEFAULTS) + tuple(init_opts) + extra)


_register()
