"""The optimizer step shared by distill's block pass and its end-to-end stage: low-precision
weights train through fp32 master copies, gradients are averaged over the torchrun processes, and
every process takes the same number of steps. The end-to-end stage also shards the optimizer's
state over the processes (each steps its share of the parameters and broadcasts it)."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from factorlm import distributed

__all__ = [
    "cpu_has_bf16",
    "fp32_masters",
    "master_step",
    "owned",
    "same_step_count",
    "shard_owners",
    "train_autocast",
]


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


def shard_owners(params: list[nn.Parameter]) -> list[int]:
    """The process that steps each parameter (ZeRO stage 1's partition, balanced by size; all 0
    in a single process): each process keeps the optimizer state of its own share only."""
    return distributed.assign([float(p.numel()) for p in params])


def owned(params: list[nn.Parameter], owners: list[int]) -> list[nn.Parameter]:
    """The parameters this process steps."""
    r = distributed.rank()
    return [p for p, o in zip(params, owners, strict=True) if o == r]


def master_step(
    params: list[nn.Parameter],
    masters: list[torch.Tensor],
    opt,
    sched=None,
    owners: list[int] | None = None,
) -> None:
    """After ``backward()``: average the gradients over the processes, step the optimizer (and the
    scheduler) on the masters, copy them back into the low-precision parameters.

    ``owners`` (from :func:`shard_owners`): ``masters`` (and ``opt``, None when this process owns
    nothing) cover this process's share of ``params`` only; every parameter then comes from its
    owner's step (a broadcast)."""
    distributed.allreduce_grads(params)
    mine = params
    if owners is not None:
        mine = owned(params, owners)
        keep = {id(p) for p in mine}
        for p in params:
            if id(p) not in keep:
                p.grad = None
    for p, m in zip(mine, masters, strict=True):
        if m is not p and p.grad is not None:
            m.grad, p.grad = p.grad.to(m.device, torch.float32), None
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if sched is not None:
        sched.step()
    with torch.no_grad():
        for p, m in zip(mine, masters, strict=True):
            if m is not p:
                p.copy_(m)
        if owners is not None:
            distributed.broadcast_from_owners([p.detach() for p in params], owners)


def same_step_count(total: int) -> int:
    """The fewest steps any process plans (data parallel: every process takes that many)."""
    if not distributed.is_dist():
        return total
    counts = [0.0] * distributed.world_size()
    counts[distributed.rank()] = float(total)
    return int(min(distributed.all_sum(counts)))


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16), where bf16
    matmuls run several times faster than fp32 ones; elsewhere torch emulates them (slower)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def train_autocast(enabled: bool, device) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``enabled``, on CUDA and on CPUs with native bf16 matmuls
    (:func:`cpu_has_bf16`); other CPUs train in the weights' dtype."""
    kind = torch.device(device).type
    if enabled and (kind == "cuda" or (kind == "cpu" and cpu_has_bf16())):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()
