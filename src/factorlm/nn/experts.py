"""Per-expert linear layers for mixture-of-experts blocks whose experts are stored fused.

Recent ``transformers`` store Mixtral-style experts as two 3D parameters
(``gate_up_proj``: E x 2I x H and ``down_proj``: E x H x I). Low-rank factorization and channel
pruning work on individual matrices, so :class:`UnfusedExperts` holds one small MLP per expert with
plain ``nn.Linear`` layers (``<i>.gate_proj``, ``<i>.up_proj``, ``<i>.down_proj``) and computes exactly
what the fused module computed. This file depends on torch only (it is bundled into saved models).
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act_fn: nn.Module, dtype=None, device=None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in replacement of a fused experts module: ``forward(hidden, top_k_index, top_k_weights)``."""

    @classmethod
    def from_fused(cls, fused: nn.Module, copy_weights: bool = True) -> UnfusedExperts:
        gate_up, down = fused.gate_up_proj, fused.down_proj
        n_exp, two_i, hidden = gate_up.shape
        inter = two_i // 2
        mods = cls(
            ExpertMLP(hidden, inter, fused.act_fn, dtype=gate_up.dtype, device=gate_up.device)
            for _ in range(n_exp)
        )
        if copy_weights:
            with torch.no_grad():
                for e, m in enumerate(mods):
                    m.gate_proj.weight.copy_(gate_up[e, :inter])
                    m.up_proj.weight.copy_(gate_up[e, inter:])
                    m.down_proj.weight.copy_(down[e])
        return mods

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, k_pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and isinstance(
        getattr(module, "down_proj", None), nn.Parameter
    )
