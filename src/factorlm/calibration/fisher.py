"""Empirical Fisher information of the LM loss w.r.t. targeted weights (for fwsvd).

F_ij = sum over calibration sequences of (dL_s/dW_ij)^2, with L_s the LM loss of sequence s (the
per-sample empirical Fisher; one sequence per backward pass also keeps the activations of the
backward small: a whole 8 x 512 batch of SmolLM2 took 11 GiB). fwsvd only needs its row sums, so
only those are kept (m floats per matrix). This needs full-model backward passes, so it runs on the
sequences of at most ``max_batches`` batches.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from factorlm.arch.modules import Conv1D


def fisher_row_sums(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: list[torch.Tensor],
    device=None,
    max_batches: int = 4,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    device = device or next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {name: mod.weight for name, mod in targets.items()}
    for w in weights.values():
        w.requires_grad_(True)
    out = {
        name: torch.zeros(
            w.shape[1] if isinstance(targets[name], Conv1D) else w.shape[0],
            dtype=torch.float64,
        )
        for name, w in weights.items()
    }
    try:
        seqs = [s[None] for b in batches[:max_batches] for s in b]
        for ids in tqdm(seqs, desc="fisher", unit="seq", disable=not progress):
            ids = ids.to(device)
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            for name, w in weights.items():
                g2 = w.grad.detach().double().square()
                out[name] += (g2.sum(0) if isinstance(targets[name], Conv1D) else g2.sum(1)).cpu()
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in flags.items():
            p.requires_grad_(f)
    return out
