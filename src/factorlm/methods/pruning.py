"""Structured channel pruning of an MLP's intermediate dimension (LoRAP's FFN half): pure tensor math.

An MLP unit is a set of *input* linears that each produce the I intermediate channels (gate and
up, or a single fc1 / c_fc, or phi3's fused ``gate_up_proj`` with rows ``[gate; up]``) and one
*output* linear (down) that consumes them. Channel i is scored (LoRAP, Li et al. 2024) by

    s_i = sum over inputs ||(|W_in| * sqrt(q_in))[i, :]||_2 + ||(|W_down| * sqrt(q_down))[:, i]||_2

where q_x is the mean-square input of linear x, per input feature (q_down: of the intermediate
activation). Channels are sorted by ascending score; the lowest ``n_least`` are kept (the paper's
finding: the least important 1 % matter), the next ``n_remove`` are removed, the rest are kept.
Removing a channel deletes row i (and bias i) of every input linear (rows i and I + i of a fused
gate_up) and column i of the output linear. Nothing here touches a module or a hook.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from factorlm.errors import ConfigError


def _sqrt_q(q: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    if q is None:
        return torch.ones(n, dtype=torch.float64, device=like.device)
    q = q.to(device=like.device, dtype=torch.float64)
    if q.shape != (n,):
        raise ValueError(f"mean-square vector has shape {tuple(q.shape)}, expected ({n},)")
    return q.clamp_min(0).sqrt()


def input_scores(W: torch.Tensor, q: torch.Tensor | None, fused: bool = False) -> torch.Tensor:
    """Per-channel score of an input linear W (I x n, or 2I x n when ``fused``): row norms of
    |W| * sqrt(q); a fused [gate; up] matrix gives channel i the sum of rows i and I + i."""
    W = W.detach().to(torch.float64)
    s = (W.abs() * _sqrt_q(q, W.shape[1], W)[None, :]).norm(dim=1)
    if fused:
        if W.shape[0] % 2:
            raise ValueError(
                f"a fused gate_up matrix needs an even number of rows, got {W.shape[0]}"
            )
        half = W.shape[0] // 2
        s = s[:half] + s[half:]
    return s


def output_scores(W: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """Per-channel score of the output linear W (m x I): column norms of |W| * sqrt(q)."""
    W = W.detach().to(torch.float64)
    return (W.abs() * _sqrt_q(q, W.shape[1], W)[None, :]).norm(dim=0)


def channel_scores(
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    output: tuple[torch.Tensor, torch.Tensor | None],
    fused: bool = False,
) -> torch.Tensor:
    """LoRAP channel scores (float64, length I) of one MLP unit.

    ``inputs``: (W_in, q_in) per input linear (q_in: mean x^2 of its input, None = ones);
    ``output``: (W_down, q_down). ``fused``: the single input is phi3's [gate; up] matrix.
    """
    W_out, q_out = output
    s = output_scores(W_out, q_out)
    for W, q in inputs:
        si = input_scores(W, q, fused)
        if si.shape != s.shape:
            raise ValueError(
                f"input linear has {si.numel()} channels, the output linear {s.numel()}"
            )
        s = s + si.to(s.device)
    return s


def num_least(n_channels: int, keep_least: float) -> int:
    """Channels protected by the keep-least rule: ceil(keep_least x I) (0 disables it)."""
    if keep_least <= 0:
        return 0
    return min(n_channels, math.ceil(keep_least * n_channels - 1e-9))


def select_channels(scores: torch.Tensor, n_remove: int, n_least: int = 0) -> torch.Tensor:
    """Indices (ascending) of the channels to keep.

    Sort ascending by score (stable: ties keep their index order); keep the first ``n_least``,
    remove the next ``n_remove``, keep the rest.
    """
    n = scores.numel()
    if n_remove < 0 or n_least < 0 or n_least + n_remove > n:
        raise ValueError(f"cannot remove {n_remove} and protect {n_least} of {n} channels")
    order = torch.sort(scores.detach().cpu(), stable=True).indices
    removed = order[n_least : n_least + n_remove]
    mask = torch.ones(n, dtype=torch.bool)
    mask[removed] = False
    return torch.nonzero(mask).flatten()


def fused_rows(keep: torch.Tensor, n_channels: int) -> torch.Tensor:
    """Rows of a fused [gate; up] matrix for the kept channels: keep, then I + keep."""
    return torch.cat([keep, keep + n_channels])


def prune_rows(
    W: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W[keep], bias[keep]) of an input linear (out x in); fused: both halves, same channels."""
    rows = fused_rows(keep, W.shape[0] // 2) if fused else keep
    rows = rows.to(W.device)
    return W[rows].clone(), None if bias is None else bias[rows].clone()


def prune_cols(W: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W[:, keep] of the output linear (out x I)."""
    return W[:, keep.to(W.device)].clone()


# --- how many channels each unit loses ------------------------------------------------------------


@dataclass(frozen=True)
class UnitShape:
    """What the allocation needs to know about one MLP unit."""

    channels: int  # I
    cost: int  # parameters removed per channel (input rows + their biases + output column)
    n_least: int = 0  # channels protected by the keep-least rule


def valid_widths(unit: UnitShape, multiple: int) -> list[int]:
    """Kept widths allowed for a unit, ascending: multiples of ``multiple`` that keep at least the
    protected channels (and at least one), plus I itself (no pruning)."""
    low = max(1, unit.n_least)
    widths = [w for w in range(multiple, unit.channels, multiple) if w >= low]
    if not widths and unit.channels > 1:  # I smaller than the multiple: any width
        widths = [w for w in range(low, unit.channels)]
    return widths + [unit.channels]


def allocate_widths(
    units: Sequence[UnitShape], remove: float, multiple: int = 8
) -> tuple[list[int], int]:
    """Kept width per unit so that at least ``remove`` parameters go, within one channel step.

    Every unit first takes the same fraction remove / (sum I c) of its channels, rounded to the
    next allowed width below; then widths are handed back one step at a time (round robin) while
    the removal stays >= ``remove``. Returns (widths, parameters removed); the removal can fall
    short only when every unit is at its smallest allowed width.
    """
    if multiple < 1:
        raise ConfigError(f"channel_multiple must be >= 1, got {multiple}")
    allowed = [valid_widths(u, multiple) for u in units]
    if remove <= 0 or not units:
        return [u.channels for u in units], 0
    total = sum(u.channels * u.cost for u in units)
    frac = min(1.0, remove / total) if total else 0.0
    pos = []  # index into allowed[j]
    for u, ws in zip(units, allowed, strict=True):
        target = u.channels * (1 - frac)
        below = [i for i, w in enumerate(ws) if w <= target + 1e-9]
        pos.append(below[-1] if below else 0)

    def removed() -> int:
        return sum(
            (u.channels - ws[p]) * u.cost for u, ws, p in zip(units, allowed, pos, strict=True)
        )

    done = removed()
    changed = True
    while changed:
        changed = False
        for j, u in enumerate(units):
            if pos[j] + 1 < len(allowed[j]):
                gain = (allowed[j][pos[j] + 1] - allowed[j][pos[j]]) * u.cost
                if done - gain >= remove:
                    pos[j] += 1
                    done -= gain
                    changed = True
    return [ws[p] for ws, p in zip(allowed, pos, strict=True)], done
