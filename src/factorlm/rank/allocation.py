"""Rank allocation policies: pure functions from matrix shapes (and spectra) to ranks.

Ratio semantics (METHODS.md): ``ratio`` is the fraction of the targeted linear parameters removed.
A rank-r factorization of an m x n matrix costs r (m + n) parameters. A rank of ``None`` means
"keep the matrix dense" (when a rank would save nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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
