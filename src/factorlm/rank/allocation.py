"""Rank allocation policies: pure functions from matrix shapes (and spectra) to ranks.

Ratio semantics (METHODS.md): ``ratio`` is the fraction of the targeted linear parameters removed.
A rank-r factorization of an m x n matrix costs r (m + n) parameters. A rank of ``None`` means
"keep the matrix dense" (when a rank would save nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from factorlm.errors import ConfigError


def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
        raise ConfigError(
            f"ratio must be a number in (0, 1) (fraction of parameters removed), got {ratio!r}"
        )
    return float(ratio)


def max_useful_rank(m: int, n: int) -> int:
    """Largest rank that still saves parameters: r (m + n) < m n."""
    return max(0, math.ceil(m * n / (m + n)) - 1)


def lowrank_params(m: int, n: int, rank: int | None) -> int:
    return m * n if rank is None else rank * (m + n)


def uniform_ranks(
    shapes: Mapping[str, tuple[int, int]], ratio: float, multiple: int = 8
) -> dict[str, int | None]:
    """r = floor(m n (1 - ratio) / (m + n)) per matrix, rounded down to ``multiple``.

    Rounding down only removes more parameters, so the achieved ratio is >= the requested one;
    the leftover budget is then handed back ``multiple`` ranks at a time (largest matrices first)
    while the achieved ratio stays >= the requested one.
    """
    check_ratio(ratio)
    ranks: dict[str, int | None] = {}
    for name, (m, n) in shapes.items():
        r = math.floor(m * n * (1 - ratio) / (m + n))
        rr = (r // multiple) * multiple if multiple > 1 else r
        ranks[name] = max(rr, min(r, multiple), 1)
    return _top_up(
        shapes,
        ranks,
        ratio,
        multiple,
        order=sorted(shapes, key=lambda k: -shapes[k][0] * shapes[k][1]),
    )


def _budget(shapes: Mapping[str, tuple[int, int]], ratio: float) -> int:
    total = sum(m * n for m, n in shapes.values())
    return math.floor(total * (1 - ratio))


def _top_up(shapes, ranks, ratio, multiple, order: Sequence[str]) -> dict[str, int | None]:
    return top_up(shapes, ranks, _budget(shapes, ratio), multiple, order)


def top_up(
    shapes: Mapping[str, tuple[int, int]],
    ranks: dict[str, int | None],
    budget: int,
    multiple: int,
    order: Sequence[str],
) -> dict[str, int | None]:
    """Hand ``multiple`` ranks back to the matrices, round-robin in ``order``, while the kept
    parameters stay <= ``budget`` and each rank still saves parameters (dense matrices: None)."""
    used = sum(lowrank_params(*shapes[k], ranks[k]) for k in shapes)
    changed = True
    while changed:
        changed = False
        for k in order:
            r = ranks[k]
            if r is None:
                continue
            m, n = shapes[k]
            step = multiple * (m + n)
            if used + step <= budget and r + multiple <= max_useful_rank(m, n):
                ranks[k] = r + multiple
                used += step
                changed = True
    return ranks


def global_ranks(
    shapes: Mapping[str, tuple[int, int]],
    spectra: Mapping[str, torch.Tensor],
    ratio: float,
    multiple: int = 8,
    min_rank: int | None = None,
    normalize: bool = True,
) -> dict[str, int | None]:
    """Spend the parameter budget where the spectra lose least.

    Every singular value i of matrix k has value s_ki^2 (divided by the matrix's total energy when
    ``normalize``: the relative output error it avoids) and cost (m + n) parameters. Groups of
    ``multiple`` consecutive singular values are taken in order of value per parameter until the
    budget (1 - ratio) x targeted parameters is spent, after each matrix got ``min_rank``
    (default ``multiple``). A matrix whose rank would save nothing stays dense.
    """
    check_ratio(ratio)
    min_rank = multiple if min_rank is None else min_rank
    budget = _budget(shapes, ratio)
    ranks: dict[str, int] = {}
    used = 0
    chunks: list[tuple[float, str, int]] = []
    for k, (m, n) in shapes.items():
        s2 = spectra[k].to(torch.float64).square()
        if normalize:
            s2 = s2 / s2.sum().clamp_min(1e-300)
        r_cap = min(max_useful_rank(m, n), s2.numel())
        r0 = min(min_rank, r_cap) if r_cap > 0 else 0
        ranks[k] = r0
        used += r0 * (m + n)
        for start in range(r0, r_cap, multiple):
            stop = min(start + multiple, r_cap)
            chunks.append(
                (float(s2[start:stop].sum()) / ((stop - start) * (m + n)), k, stop - start)
            )
    if used > budget:
        raise ConfigError(f"ratio {ratio} leaves less than the minimum rank {min_rank} per matrix")
    chunks.sort(key=lambda c: -c[0])
    closed: set[str] = (
        set()
    )  # a matrix whose next chunk did not fit takes no later chunk (keeps prefixes)
    for _value, k, width in chunks:
        if k in closed:
            continue
        m, n = shapes[k]
        cost = width * (m + n)
        if used + cost > budget:
            closed.add(k)
            continue
        ranks[k] += width
        used += cost
    return {k: (r if r > 0 else None) for k, r in ranks.items()}


def achieved_ratio(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int | None]) -> float:
    before = sum(m * n for m, n in shapes.values())
    after = sum(lowrank_params(m, n, ranks.get(k)) for k, (m, n) in shapes.items())
    return 1 - after / before


def bottom_first_ranks(
    block_shapes: Sequence[Mapping[str, tuple[int, int]]],
    ratio: float,
    min_rank: int | None = None,
    min_rank_fraction: float = 0.25,
    multiple: int = 8,
) -> dict[str, int | None]:
    """Lillama's "bottom-first" search: lower the first blocks to the minimum rank until the target is met.

    Blocks are taken from the first one on; each gets its matrices' minimum rank (``min_rank`` or
    ``min_rank_fraction`` x min(m, n), rounded to ``multiple``) while that does not overshoot the
    parameter target; the block where the target is reached gets the uniform ratio that meets it
    exactly; later blocks stay dense (rank None).
    """
    check_ratio(ratio)
    total = sum(m * n for shapes in block_shapes for m, n in shapes.values())
    target = math.ceil(total * ratio)
    removed = 0
    ranks: dict[str, int | None] = {}
    done = False
    for shapes in block_shapes:
        if done:
            ranks.update({k: None for k in shapes})
            continue
        mins = {}
        for k, (m, n) in shapes.items():
            r = min_rank if min_rank is not None else int(min_rank_fraction * min(m, n))
            r = max(multiple, (r // multiple) * multiple)
            mins[k] = min(r, max_useful_rank(m, n))
        saving = sum(m * n - mins[k] * (m + n) for k, (m, n) in shapes.items())
        if removed + saving < target:
            ranks.update(mins)
            removed += saving
            continue
        block_total = sum(m * n for m, n in shapes.values())
        need = (target - removed) / block_total
        if need > 0:
            block_ranks = uniform_ranks(shapes, min(need, 0.999), multiple)
            ranks.update({k: max(r, mins[k]) for k, r in block_ranks.items()})
            removed += sum(m * n - ranks[k] * (m + n) for k, (m, n) in shapes.items())
        else:
            ranks.update({k: None for k in shapes})
        done = removed >= target
    if not done:
        raise ConfigError(
            f"bottom-first allocation cannot remove {ratio:.0%} with minimum rank {min_rank or min_rank_fraction}"
        )
    return ranks


@dataclass(frozen=True)
class RankPolicy:
    """What a factorization must satisfy to run faster than the dense matmul on a device.

    ``multiple``: ranks are rounded down to it (kernel tile widths). ``launch_weights``: the time
    of one extra kernel launch, in weights read (a rank-r factorization of an m x n matrix reads
    r (m + n) weights in two matmuls instead of m n in one: it pays when the weights it saves
    outweigh the extra launch).
    """

    multiple: int
    launch_weights: int


# per device type; CUDA's tile width is 64 (128 for the largest matrices is also common)
RANK_POLICIES: dict[str, RankPolicy] = {
    "cpu": RankPolicy(multiple=8, launch_weights=16_384),
    "cuda": RankPolicy(multiple=64, launch_weights=1_000_000),
}


def rank_policy(device: torch.device | str | None) -> RankPolicy:
    kind = torch.device(device).type if device is not None else "cpu"
    return RANK_POLICIES.get(kind, RANK_POLICIES["cpu"])


def kernel_rank(m: int, n: int, rank: int | None, policy: RankPolicy) -> int | None:
    """``rank`` rounded down to the policy's multiple, or None (stay dense) when the factorization
    would not save time: rank at or above the break-even m n / (m + n), or a saving of weights
    below one kernel launch."""
    if rank is None:
        return None
    r = (rank // policy.multiple) * policy.multiple if rank >= policy.multiple else rank
    if r < 1 or r > max_useful_rank(m, n) or m * n - r * (m + n) < policy.launch_weights:
        return None
    return r


def estimated_time_ratio(
    before: Mapping[str, tuple[int, int]],
    after: Mapping[str, tuple[int, int, int | None]],
    policy: RankPolicy,
    groups: Sequence[Sequence[str]] = (),
) -> float:
    """Estimated batch-1 decode time of the targeted linears, compressed / dense: weights read plus
    one launch per matmul. ``before``: {name: (out, in)} of the dense linears; ``after``: {name:
    (out, in, rank or None)} of the compressed ones (a pruned linear is dense with its new shape).
    Low-rank members of a ``groups`` entry (linears that read one input) share one stacked first
    matmul. > 1 means slower than dense."""
    launch = policy.launch_weights
    dense = sum(m * n + launch for m, n in before.values())
    comp = 0
    for m, n, r in after.values():
        comp += m * n + launch if r is None else r * (m + n) + 2 * launch
    for group in groups:
        lowrank = [k for k in group if k in after and after[k][2] is not None]
        comp -= max(0, len(lowrank) - 1) * launch
    return comp / dense
