"""End-to-end refinement: after the block pass of ``distill``, the whole compressed model is trained
against the dense model's next-token distributions on the calibration tokens.

Block-local distillation fits each block to the dense block's outputs, but corrections that are
optimal per block do not compose through a deep residual stack (the drift of a 40 % model is
mostly accumulated error). This stage trains every targeted linear of every block jointly on

    L = mean_t KL( p_dense(. | x_<t) || p_student(. | x_<t) ),   p = softmax(head(norm(h_L)))

with ``h_L`` the last block's output. The dense model's ``h_L`` costs nothing: it is the teacher
stream that distillation carries through the block pass (the dense model's activations), and the
final norm and the LM head are not compressed, so the teacher's distribution is one head matmul per
step. AdamW with a cosine decay to zero over the stage; the last ``holdout`` calibration batches are
not trained on, and with ``keep_best`` the stage is undone when both their KL and their
next-token cross-entropy (the calibration perplexity) rise.

All blocks are on the compute device at once (the factors, their gradients and AdamW's two moments:
about four times the compressed linears' size), unlike the block pass. Under torchrun each process
keeps the optimizer state of its share of the parameters only (ZeRO stage 1: it steps that share
and broadcasts it; the gradients are averaged over all processes as before). On a GPU the optimizer's
state can live on the host instead (``offload``, ZeRO-Offload's split): every step the gradients go
to the host, AdamW steps fp32 masters there, and the updated weights come back; "auto" does so
when the device's free memory would not hold the state next to the gradients and activations.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from factorlm import distributed
from factorlm.arch.modules import get_blocks, get_submodule, model_targets
from factorlm.arch.registry import ArchSpec
from factorlm.calibration.pipeline import Streams
from factorlm.errors import CalibrationError
from factorlm.methods.distill import (
    DistillCompressor,
    _is_norm,
    _slice_rows,
    _token_mask,
    holdout_count,
)
from factorlm.methods.train_step import (
    fp32_masters,
    master_step,
    owned,
    same_step_count,
    shard_owners,
    train_autocast,
)
from factorlm.utils import autocast_off, to_device

log = logging.getLogger(__name__)

__all__ = ["EndToEnd", "after_blocks", "kl_per_token", "next_token_ce", "refine_end_to_end"]


@dataclass(frozen=True)
class EndToEnd:
    """Settings of the stage (``DistillConfig``'s ``e2e_*`` options, its holdout and keep_best)."""

    epochs: int
    lr: float
    micro_batch: int
    holdout: int  # number of the last calibration batches (of this process) kept out
    keep_best: bool = True
    autocast: bool = True  # bf16 autocast of the blocks (train_step.train_autocast)
    offload: str = "auto"  # the optimizer state on the host: "on", "off", "auto" (when needed)
    train_norms: bool = False  # the blocks' norms are trained too
    seed: int = 0
    progress: bool = True


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, one value per position (float32)."""
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


class _Stage:
    def __init__(
        self, model, spec, inputs: Streams, teacher, opts: EndToEnd, device, ids=None
    ) -> None:
        if spec.final_norm is None or model.get_output_embeddings() is None:
            raise CalibrationError(
                "end-to-end refinement needs the architecture's final norm and LM head"
            )
        self.blocks = get_blocks(model, spec)
        self.norm = get_submodule(model, spec.final_norm)
        self.head = model.get_output_embeddings()
        self.inputs, self.teacher, self.o, self.device = inputs, teacher, opts, device
        self.ids = ids  # the calibration token ids per batch (None: no cross-entropy)
        self.config = getattr(model, "config", None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head in the head's own dtype, outside any autocast: the KL compares
        distributions over the whole vocabulary, which bf16 logits (~3 significant digits) blur."""
        with autocast_off(h.device):
            return self.head(self.norm(h.to(getattr(self.head, "weight", h).dtype)))

    def _forward(
        self, j: int, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Student and teacher logits of rows ``start:stop`` of batch ``j``, and their padding
        mask (None: every position counts)."""
        dev = self.device
        b = self.inputs.student[j].shape[0]
        kw = to_device(_slice_rows(self.inputs.kwargs[j], b, start, stop), dev)
        with train_autocast(self.o.autocast, dev):
            h = self.inputs.student[j][start:stop].to(dev)
            for block in self.blocks:
                h = DistillCompressor._forward(block, h, kw)
            with torch.no_grad():
                t = self.logits(self.teacher[j][start:stop].to(dev))
            s = self.logits(h)
        return s, t, _token_mask(kw, s)

    def loss(self, j: int, start: int, stop: int) -> tuple[torch.Tensor, int]:
        """Summed per-token KL of rows ``start:stop`` of batch ``j``, and the number of tokens."""
        s, t, mask = self._forward(j, start, stop)
        return _masked_sum(kl_per_token(s, t), mask)

    def heldout(self, batches: Sequence[int]) -> tuple[float, float | None]:
        """Mean KL per token over ``batches``, and the mean next-token cross-entropy where the
        token ids are known (else None)."""
        sums = [0.0, 0.0, 0.0, 0.0]  # KL, its tokens, cross-entropy, its positions
        with torch.no_grad():
            for j in batches:
                b = self.inputs.student[j].shape[0]
                for s in range(0, b, self.o.micro_batch):
                    stop = min(s + self.o.micro_batch, b)
                    logits, t, mask = self._forward(j, s, stop)
                    kl, n = _masked_sum(kl_per_token(logits, t), mask)
                    sums[0], sums[1] = sums[0] + float(kl), sums[1] + n
                    if self.ids is not None:
                        ce, n = next_token_ce(logits, self.ids[j][s:stop].to(logits.device), mask)
                        sums[2], sums[3] = sums[2] + float(ce), sums[3] + n
        kl_sum, kl_n, ce_sum, ce_n = distributed.all_sum(sums)
        return kl_sum / max(kl_n, 1.0), (ce_sum / max(ce_n, 1.0) if self.ids is not None else None)


def _masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Sum of per-position ``values`` where ``mask`` is set (everywhere without one), and the count."""
    if mask is None:
        return values.sum(), values.numel()
    m = mask.to(values.dtype)
    return (values * m).sum(), int(m.sum())


def next_token_ce(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of each position's next token (float32), and the number of positions
    counted: those whose own and next token are both unmasked."""
    ce = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
    ).view(ids.shape[0], -1)
    both = None if mask is None else mask[:, 1:] * mask[:, :-1]
    return _masked_sum(ce, both)


def refine_end_to_end(
    model: nn.Module,
    spec: ArchSpec,
    inputs: Streams,
    teacher: list[torch.Tensor],
    opts: EndToEnd,
    device,
    offload="cpu",
    token_ids: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train every targeted linear of ``model`` (in place) against the dense model's last-block
    outputs ``teacher`` (one tensor per calibration batch, aligned with ``inputs``: the first
    block's inputs and kwargs of the same batches). ``token_ids``: the same batches' token ids,
    for the held-out next-token cross-entropy that ``keep_best`` reads next to the KL (None: the
    KL alone). Returns the stage's record (held-out KL and cross-entropy before and after, steps,
    seconds, whether the init was kept)."""
    t0 = time.perf_counter()
    if len(teacher) != len(inputs.student):
        raise CalibrationError("end-to-end refinement: teacher and input batches differ in number")
    if token_ids is not None and [tuple(x.shape[:2]) for x in token_ids] != [
        tuple(h.shape[:2]) for h in inputs.student
    ]:
        raise CalibrationError("end-to-end refinement: token ids and input batches differ in shape")
    stage = _Stage(model, spec, inputs, teacher, opts, device, token_ids)
    n = len(inputs.student)
    k = min(opts.holdout, n - 1) if n > 1 else 0
    train, held = list(range(n - k)), (list(range(n - k, n)) if k else list(range(n)))
    params = [p for m in model_targets(model, spec).values() for p in m.parameters()]
    if opts.train_norms:
        # the blocks' norms; not the final one: the teacher's distribution goes through it
        norms = [m for b in stage.blocks for m in b.modules() if _is_norm(m)]
        params += [p for m in norms for p in m.parameters(recurse=False)]
    params = list({id(p): p for p in params if p.is_floating_point()}.values())
    flags = {id(p): p.requires_grad for p in model.parameters()}
    extra = [stage.norm, stage.head]
    home = [next(m.parameters()).device for m in extra]
    units = [
        (j, s, min(s + opts.micro_batch, inputs.student[j].shape[0]))
        for j in train
        for s in range(0, inputs.student[j].shape[0], opts.micro_batch)
    ]
    total = same_step_count(opts.epochs * len(units))
    record: dict[str, Any] = {"epochs": opts.epochs, "lr": opts.lr, "steps": total}
    model.requires_grad_(False)
    model.eval()
    # the block pass's weights, restored when the stage raises the held-out loss or runs out of
    # memory: the block pass's work is never lost to the stage
    saved = [p.detach().to(offload, copy=True) for p in params]
    bar = None
    try:
        for m in [*stage.blocks, *extra]:
            m.to(device)
        record["loss_before"], record["ce_before"] = stage.heldout(held)
        # every process keeps the optimizer state of its share of the parameters only
        owners = shard_owners(params)
        mine = owned(params, owners)
        record["state_share"] = sum(p.numel() for p in mine) / max(
            sum(p.numel() for p in params), 1
        )
        record["offload"] = _offload(opts.offload, params, mine, stage, device, offload)
        masters = fp32_masters(mine, on=offload if record["offload"] else None)
        for p in params:
            p.requires_grad_(True)
        opt = sched = None
        if masters:
            # offloaded: the host's fused AdamW (one pass over each tensor, several times faster
            # than the per-op loop on billions of host weights)
            opt = torch.optim.AdamW(
                masters, lr=opts.lr, weight_decay=0.0, fused=True if record["offload"] else None
            )
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(total, 1)))
            )
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + 7919)
        bar = tqdm(total=total, desc="end-to-end", unit="step", disable=not opts.progress)
        step = 0
        with torch.enable_grad():
            while step < total:
                for i in torch.randperm(len(units), generator=gen).tolist():
                    if step >= total:
                        break
                    loss, ntok = stage.loss(*units[i])
                    (loss / max(ntok, 1)).backward()
                    master_step(params, masters, opt, sched, owners)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(kl=f"{float(loss.detach()) / max(ntok, 1):.4f}")
        bar.close()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        del opt, masters
        record["loss_after"], record["ce_after"] = stage.heldout(held)
        record["kept_init"] = bool(opts.keep_best and _rose(record))
    except torch.OutOfMemoryError as e:
        for p in params:
            p.grad = None
        opt = masters = None  # noqa: F841  (frees the optimizer state before the restore)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        record["error"] = f"out of memory on {device}: {str(e).strip().splitlines()[0][:200]}"
        record["kept_init"] = True
    finally:
        if bar is not None:
            bar.close()
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
        for b in stage.blocks:
            b.to(offload)
        for m, d in zip(extra, home, strict=True):
            m.to(d)
    if record["kept_init"]:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)
    record["seconds"] = time.perf_counter() - t0
    if "error" in record:
        log.warning("end-to-end: %s; the block pass's weights were kept", record["error"])
        return record
    log.info(
        "end-to-end: held-out KL %.5f -> %.5f%s (%d steps, %.1f s)%s",
        record["loss_before"],
        record["loss_after"],
        _ce_text(record),
        total,
        record["seconds"],
        "; raised, the block pass's weights were kept" if record["kept_init"] else "",
    )
    return record


def _rose(record: dict[str, Any]) -> bool:
    """Whether the stage made the held-out calibration worse: the KL it trains on (distance to
    the dense model) rose and, where the token ids are known, so did the next-token cross-entropy
    (the perplexity a user measures). Either falling keeps the stage: the KL can rise a little
    while the cross-entropy falls (bench/results/distill-options-smollm2.md), and on text unlike
    the dense model's own (random tokens) the cross-entropy can rise while the student nears it."""
    kl = record["loss_after"] > record["loss_before"]
    if record.get("ce_before") is None or record.get("ce_after") is None:
        return kl
    return kl and record["ce_after"] > record["ce_before"]


def _ce_text(record: dict[str, Any]) -> str:
    if record.get("ce_before") is None or record.get("ce_after") is None:
        return ""
    return f", next-token cross-entropy {record['ce_before']:.5f} -> {record['ce_after']:.5f}"


def _offload(
    mode: str,
    params: list[nn.Parameter],
    mine: list[nn.Parameter],
    stage: _Stage,
    device,
    host,
) -> bool:
    """Whether the optimizer state of ``mine`` (this process's share of ``params``) goes to
    ``host``: ``mode`` "on" / "off", or ("auto") when the compute device is not the host and its
    free memory is less than the gradients of ``params``, the state of ``mine`` and one
    micro-batch's activations and logits (the weights are already there)."""
    if mode != "auto":
        return mode == "on"
    if torch.device(device).type == torch.device(host).type:
        return False
    from factorlm import memory

    free = memory.available_bytes(device)
    if free is None:
        return False
    x = stage.inputs.student[0]
    cfg = stage.config
    acts = memory.end_to_end_activation_bytes(
        n_blocks=len(stage.blocks),
        micro_batch=min(stage.o.micro_batch, x.shape[0]),
        seqlen=x.shape[1],
        hidden=x.shape[-1],
        vocab=stage.head.weight.shape[0],
        intermediate=getattr(cfg, "intermediate_size", None),
        n_heads=getattr(cfg, "num_attention_heads", None) or 1,
    )
    need = acts + sum(p.numel() * p.element_size() for p in params)
    need += sum(p.numel() * memory.optimizer_state_bytes(p.element_size()) for p in mine)
    if need <= free:
        return False
    log.info(
        "end-to-end: the optimizer state goes to the host (%.2f GiB needed on %s, %.2f GiB free)",
        need / memory.GiB,
        device,
        free / memory.GiB,
    )
    return True


def after_blocks(
    plan, streams: Streams, options: dict[str, Any], seed: int, progress: bool
) -> None:
    """distill's stage after the block pass: ``streams.teacher`` holds the dense model's last-block
    outputs (the teacher stream after the last block); the stage's record goes to the report."""
    if streams.teacher is None:
        raise CalibrationError(
            "end-to-end refinement needs the dense model's last-block outputs: resume from a "
            "checkpoint written before the last block, or set e2e_epochs=0"
        )
    inputs = plan.capture()
    opts = EndToEnd(
        epochs=options["e2e_epochs"],
        lr=float(options["e2e_lr"]),
        micro_batch=options["e2e_micro_batch"],
        holdout=holdout_count(len(inputs.student), options["holdout"]),
        keep_best=options["keep_best"],
        autocast=options["autocast"],
        offload=options["e2e_offload"],
        train_norms=options["train_norms"],
        seed=seed,
        progress=progress,
    )
    ids = distributed.shard(plan.calibration.batches)  # the batches capture() ran
    rec = refine_end_to_end(
        plan.model, plan.spec, inputs, streams.teacher, opts, plan.device, plan.offload, ids
    )
    plan.report.end_to_end = rec
    if "error" in rec:
        plan.report.warnings.append(
            f"distill: the end-to-end stage failed ({rec['error']}); the block pass's weights "
            "were kept. It trains the whole compressed model at once: e2e_micro_batch=1 needs "
            "the least memory, e2e_epochs=0 skips it"
        )
    elif rec["kept_init"]:
        plan.report.warnings.append(
            f"distill: end-to-end refinement raised the held-out loss (KL {rec['loss_before']:.5f} "
            f"-> {rec['loss_after']:.5f}{_ce_text(rec)}); the block pass's weights were kept"
        )
    streams.teacher = None
