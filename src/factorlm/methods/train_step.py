"""The optimizer step shared by distill's block pass and its end-to-end stage: low-precision
weights train through fp32 master copies, gradients are averaged over the torchrun processes, and
every process takes the same number of steps."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from factorlm import distributed

__all__ = ["fp32_masters", "master_step", "same_step_count", "train_autocast"]


def fp32_masters(params: list[nn.Parameter], on=None) -> list[torch.Tensor]:
    """What the optimizer updates: an fp32 copy of each fp16 / bf16 parameter, the others as is.

    ``on`` (a device, e.g. the host): every parameter gets an fp32 copy there, so the optimizer's
    state (the masters and the moments it creates next to them) lives there instead of on the
    parameters' device; :func:`master_step` moves the gradients over and the weights back."""
    if on is not None:
        pin = torch.device(on).type == "cpu" and any(p.is_cuda for p in params)
        out = [p.detach().to(on, torch.float32, copy=True) for p in params]
        return [m.pin_memory() if pin else m for m in out]
    low = (torch.float16, torch.bfloat16)
    return [p.detach().float().clone() if p.dtype in low else p for p in params]


def master_step(params: list[nn.Parameter], masters: list[torch.Tensor], opt, sched=None) -> None:
    """After ``backward()``: average the gradients over the processes, step the optimizer (and the
    scheduler) on the masters, copy them back into the low-precision parameters."""
    distributed.allreduce_grads(params)
    for p, m in zip(params, masters, strict=True):
        if m is not p and p.grad is not None:
            m.grad, p.grad = p.grad.to(m.device, torch.float32), None
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, m in zip(params, masters, strict=True):
            if m is not p:
                p.copy_(m)


def same_step_count(total: int) -> int:
    """The fewest steps any process plans (data parallel: every process takes that many)."""
    if not distributed.is_dist():
        return total
    counts = [0.0] * distributed.world_size()
    counts[distributed.rank()] = float(total)
    return int(min(distributed.all_sum(counts)))


def train_autocast(enabled: bool, device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``enabled``; CPU always trains in the weights' dtype."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
