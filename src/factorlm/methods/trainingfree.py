"""The training-free family (svd, fwsvd, asvd, svd-llm, nsvd) as a block compressor.

Per block: ranks from the allocation policy, one pure decomposition per targeted matrix, then the
matrix is replaced by a :class:`LowRankLinear`. Global allocation first runs a probe pass that
only records each matrix's spectrum in the method's own error metric.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import torch

from factorlm import distributed
from factorlm.arch.modules import linear_shape, linear_weight, replace_module
from factorlm.calibration.pipeline import BlockContext
from factorlm.calibration.stats import LayerStats
from factorlm.errors import FactorLMError, NumericalError
from factorlm.methods.base import MethodEntry
from factorlm.methods.linalg import output_error
from factorlm.nn.lowrank import LowRankLinear
from factorlm.rank.allocation import lowrank_params, uniform_ranks
from factorlm.report.schema import ModuleRecord

log = logging.getLogger(__name__)


def _named(fn, name: str):
    try:
        return fn()
    except NumericalError as e:
        raise NumericalError(f"{name}: {e}") from e
    except torch.linalg.LinAlgError as e:
        raise NumericalError(f"{name}: linear algebra failed ({e})") from e


def factorize_module(
    method: MethodEntry,
    module: torch.nn.Module,
    stats: LayerStats | None,
    rank: int,
    options: dict[str, Any],
    name: str,
) -> tuple[LowRankLinear, float | None, list[str]]:
    """Pure-ish step: returns the replacement module, its relative calibration error and notes."""
    W = linear_weight(module).detach()
    dec = _named(lambda: method.decompose(W.to(torch.float64), stats, **options), name)
    A, B = _named(partial(dec.factors, rank), name)
    notes = list(dec.notes)
    del dec  # free its workspace (whitening, singular vectors) before the error's: device memory
    err = None
    if stats is not None and stats.gram is not None:  # same ratio with the sum: no n x n mean copy
        err = output_error(W, A @ B, stats.gram)
    bias = getattr(module, "bias", None)
    new = LowRankLinear.from_factors(A, B, bias=None if bias is None else bias.detach(), like=W)
    return new, err, notes


class FactorizeCompressor:
    """Replace every targeted linear of a block by its rank-r factorization."""

    teacher_stream = False

    def __init__(
        self,
        method: MethodEntry,
        ratio: float,
        options: dict[str, Any],
        ranks: dict[str, int | None] | None = None,
        multiple: int = 8,
        fisher: dict[str, torch.Tensor] | None = None,
        group_of=None,
    ) -> None:
        self.method = method
        self.ratio = ratio
        self.options = options
        self.ranks = ranks
        self.multiple = multiple
        self.fisher = fisher or {}
        self.needs = (
            (method.needs - {"fisher", "absmax"})
            | {"gram"}
            | ({"absmax"} if options.get("scale") == "absmax" else set())
        )

    # ranks never depend on the other linears' statistics: each linear can be compressed as soon
    # as the calibration tokens reach it (one-pass pipeline)
    per_module = True

    def compress_block(self, ctx: BlockContext) -> None:
        self.compress_modules(ctx, list(ctx.targets))

    def compress_modules(self, ctx: BlockContext, rels: list[str]) -> None:
        """Factorize ``rels`` (a subset of the block's targets, whose statistics are in ctx)."""
        if "ranks" not in ctx.extra:  # once per block (the one-pass pipeline calls per linear)
            all_shapes = {rel: linear_shape(m) for rel, m in ctx.targets.items()}
            if self.ranks is not None:
                ranks = {rel: self.ranks[f"{ctx.prefix}.{rel}"] for rel in all_shapes}
            else:
                ranks = uniform_ranks(all_shapes, self.ratio, self.multiple)
            ctx.extra["ranks"] = ranks
        ranks = ctx.extra["ranks"]
        shapes = {rel: linear_shape(ctx.targets[rel]) for rel in rels}
        jobs = []  # (rel, method, options, stats, rank, fell back to plain SVD)
        for rel in rels:
            stats = ctx.stats.get(rel)
            full = f"{ctx.prefix}.{rel}"
            if full in self.fisher and stats is not None:
                stats.fisher_rows = self.fisher[full].to(ctx.device)
            if ranks[rel] is None:
                continue
            method, options, fallback = self.method, self.options, False
            if stats is None or stats.n_tokens == 0:
                # the parent reads .weight directly (Mamba dt_proj) or no token reached it (unused expert)
                from factorlm.methods.base import get_method

                method, options, fallback = get_method("svd"), {}, True
            jobs.append((rel, method, options, stats, ranks[rel], fallback))

        def compute(job):
            rel, method, options, stats, r, _ = job
            t0 = time.perf_counter()
            new, err, notes = factorize_module(
                method, ctx.targets[rel], stats, r, options, f"{ctx.prefix}.{rel}"
            )
            return new, err, notes, time.perf_counter() - t0

        # one process per job when distributed; every process gets every factorization. The
        # one-pass pipeline calls with a few linears at a time: the load carries over the block
        costs = [distributed.matrix_cost(*shapes[job[0]]) for job in jobs]
        load = ctx.extra.setdefault("spread_load", [0.0] * distributed.world_size())
        owners = distributed.assign(costs, load=load)
        done = distributed.spread(
            jobs,
            costs,
            compute,
            _pack_lowrank,
            lambda job, tensors, meta: _unpack_lowrank(ctx.targets[job[0]], tensors, meta),
            ctx.device,
            owners=owners,
        )
        dist = distributed.is_dist()
        results = {
            job[0]: (job, res, owner if dist else None)
            for job, res, owner in zip(jobs, done, owners, strict=True)
        }
        for rel in rels:
            mod = ctx.targets[rel]
            full = f"{ctx.prefix}.{rel}"
            m, n = shapes[rel]
            bias = getattr(mod, "bias", None)
            nb = 0 if bias is None else bias.numel()
            rec = ModuleRecord(
                name=full,
                group=ctx.spec.group_of(rel),
                shape=(m, n),
                kind="dense",
                params_before=m * n + nb,
            )
            if rel not in results:
                rec.params_after = rec.params_before
            else:
                (_, _, _, _, r, fallback), (new, err, notes, seconds), owner = results[rel]
                if fallback:
                    msg = f"{full}: no calibration input observed; plain SVD used"
                    ctx.report.warnings.append(msg)
                replace_module(ctx.block, rel, new)
                rec.kind, rec.rank, rec.rel_error, rec.notes = "lowrank", r, err, notes
                rec.params_after = lowrank_params(m, n, r) + nb
                rec.seconds, rec.computed_by = seconds, owner
                for note in notes:
                    ctx.report.warnings.append(f"{full}: {note}")
            ctx.report.modules.append(rec)


def _pack_lowrank(res) -> tuple[list[torch.Tensor], Any]:
    new, err, notes, seconds = res
    tensors = [new.A.weight.detach(), new.B.weight.detach()]
    if new.bias is not None:
        tensors.append(new.bias.detach())
    return tensors, (err, notes, seconds)


def _unpack_lowrank(module: torch.nn.Module, tensors: list[torch.Tensor], meta):
    """The owner's LowRankLinear, rebuilt from its broadcast weights (same dtype: exact copy)."""
    A, B, *bias = tensors
    W = linear_weight(module)
    new = LowRankLinear.from_factors(A, B, bias=bias[0] if bias else None, like=W)
    return (new, *meta)


class SpectrumProbe:
    """First pass of global allocation: record spectra, change nothing."""

    teacher_stream = False

    def __init__(
        self,
        method: MethodEntry,
        options: dict[str, Any],
        fisher: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.method = method
        self.options = options
        self.fisher = fisher or {}
        self.needs = (method.needs - {"fisher", "absmax"}) | (
            {"absmax"} if options.get("scale") == "absmax" else set()
        )
        self.spectra: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, int]] = {}

    def compress_block(self, ctx: BlockContext) -> None:
        jobs = []
        for rel, mod in ctx.targets.items():
            full = f"{ctx.prefix}.{rel}"
            stats = ctx.stats.get(rel)
            if full in self.fisher and stats is not None:
                stats.fisher_rows = self.fisher[full].to(ctx.device)
            method, options = self.method, self.options
            if stats is None or stats.n_tokens == 0:  # see FactorizeCompressor
                from factorlm.methods.base import get_method

                method, options = get_method("svd"), {}
            jobs.append((full, mod, method, options, stats))

        def spectrum(job):
            full, mod, method, options, stats = job
            W = linear_weight(mod).detach().to(torch.float64)
            dec = _named(lambda: method.decompose(W, stats, **options), full)
            return dec.spectrum.detach().cpu()

        costs = [distributed.matrix_cost(*linear_shape(job[1])) for job in jobs]
        spectra = distributed.spread(
            jobs, costs, spectrum, lambda s: ([s], None), lambda job, t, meta: t[0].cpu()
        )
        for (full, mod, *_), s in zip(jobs, spectra, strict=True):
            self.spectra[full] = s
            self.shapes[full] = linear_shape(mod)


__all__ = ["FactorizeCompressor", "SpectrumProbe", "build_trainingfree", "factorize_module"]


def plan_ranks(
    plan, method: MethodEntry | None, options: dict[str, Any], fisher=None
) -> dict[str, int | None] | None:
    """Ranks for the whole model from ``plan.allocation`` (None: uniform, decided per block)."""
    from factorlm.arch.modules import block_targets, get_blocks
    from factorlm.rank.allocation import bottom_first_ranks, global_ranks

    if plan.allocation == "global":
        if method is None:
            raise FactorLMError(
                f"global allocation needs a spectrum method (method {plan.method!r})"
            )
        probe = SpectrumProbe(method, options, fisher)
        plan.probe(probe, desc="spectra")
        return global_ranks(probe.shapes, probe.spectra, plan.ratio, plan.rank_multiple)
    if plan.allocation == "bottom-first":
        blocks = get_blocks(plan.model, plan.spec)
        block_shapes = [
            {
                f"{plan.spec.blocks}.{i}.{rel}": linear_shape(m)
                for rel, m in block_targets(b, plan.spec).items()
            }
            for i, b in enumerate(blocks)
        ]
        return bottom_first_ranks(
            block_shapes,
            plan.ratio,
            getattr(plan.config, "min_rank", None),
            multiple=plan.rank_multiple,
        )
    return None


def build_trainingfree(plan) -> FactorizeCompressor:
    """The generic block compressor of a method with a per-matrix decomposition."""
    from factorlm.arch.modules import model_targets
    from factorlm.calibration.fisher import fisher_row_sums
    from factorlm.methods.base import get_method

    method = get_method(plan.method)
    config = plan.config
    options = config.decompose_options()
    fisher = None
    if "fisher" in method.needs:
        # full-model backward passes: they run where the model lives (the compute device holds
        # one block at a time, not the whole model)
        fisher = fisher_row_sums(
            plan.model,
            model_targets(plan.model, plan.spec),
            plan.calibration.batches,
            None,
            getattr(config, "fisher_batches", 4),
            plan.progress,
        )
    if config.rank is not None:
        ranks = fixed_ranks(plan, config.rank)
    else:
        ranks = plan_ranks(plan, method, options, fisher)
    return FactorizeCompressor(method, plan.ratio, options, ranks, plan.rank_multiple, fisher)


def fixed_ranks(plan, rank: int) -> dict[str, int | None]:
    """One rank for every matrix; a matrix where it would save nothing stays dense."""
    from factorlm.arch.modules import model_targets
    from factorlm.rank.allocation import max_useful_rank

    out = {}
    for name, mod in model_targets(plan.model, plan.spec).items():
        m, n = linear_shape(mod)
        out[name] = rank if rank <= max_useful_rank(m, n) else None
    return out
