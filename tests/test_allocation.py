"""Rank allocation policies (pure functions)."""

from __future__ import annotations

import math

import pytest
import torch

from factorlm.errors import ConfigError
from factorlm.rank import achieved_ratio, global_ranks, lowrank_params, uniform_ranks
from factorlm.rank.allocation import bottom_first_ranks

SHAPES = {
    "q": (576, 576),
    "k": (192, 576),
    "v": (192, 576),
    "o": (576, 576),
    "gate": (1536, 576),
    "up": (1536, 576),
    "down": (576, 1536),
}


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 0.6])
def test_uniform_formula_and_ratio(ratio):
    ranks = uniform_ranks(SHAPES, ratio, multiple=1)
    for k, (m, n) in SHAPES.items():
        assert ranks[k] >= math.floor(m * n * (1 - ratio) / (m + n))
    got = achieved_ratio(SHAPES, ranks)
    assert got >= ratio
    step = max(m + n for m, n in SHAPES.values()) / sum(m * n for m, n in SHAPES.values())
    assert got - ratio <= step


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_uniform_rounded_to_multiple_still_meets_ratio(ratio):
    ranks = uniform_ranks(SHAPES, ratio, multiple=8)
    assert all(r % 8 == 0 for r in ranks.values())
    got = achieved_ratio(SHAPES, ranks)
    assert (
        ratio
        <= got
        <= ratio
        + 8 * max(m + n for m, n in SHAPES.values()) / sum(m * n for m, n in SHAPES.values())
    )


def test_global_spends_budget_on_flat_spectra():
    shapes = {"flat": (64, 64), "steep": (64, 64)}
    spectra = {"flat": torch.ones(64), "steep": torch.logspace(0, -6, 64)}
    ranks = global_ranks(shapes, spectra, 0.5, multiple=8)
    assert ranks["flat"] > ranks["steep"]
    assert achieved_ratio(shapes, ranks) >= 0.5
    assert all(r % 8 == 0 for r in ranks.values())


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_global_meets_ratio_closely(ratio):
    g = torch.Generator().manual_seed(0)
    spectra = {
        k: torch.sort(torch.rand(min(m, n), generator=g) ** 3, descending=True).values
        for k, (m, n) in SHAPES.items()
    }
    ranks = global_ranks(SHAPES, spectra, ratio, multiple=8)
    got = achieved_ratio(SHAPES, ranks)
    assert ratio <= got <= ratio + 0.01
    for k, (m, n) in SHAPES.items():
        assert ranks[k] is None or lowrank_params(m, n, ranks[k]) < m * n


def test_global_rejects_impossible_minimum():
    with pytest.raises(ConfigError):
        global_ranks({"a": (16, 16)}, {"a": torch.ones(16)}, 0.9, multiple=8)


def test_bottom_first_compresses_first_blocks_only():
    blocks = [{f"b{i}.{k}": s for k, s in SHAPES.items()} for i in range(10)]
    ranks = bottom_first_ranks(blocks, 0.2, min_rank=64, multiple=8)
    flat = {k: s for b in blocks for k, s in b.items()}
    assert achieved_ratio(flat, ranks) >= 0.2 - 1e-12  # float rounding of an exact integer target
    assert ranks["b0.q"] == 64 and ranks["b9.q"] is None
    assert all(v is None for k, v in ranks.items() if k.startswith("b9."))


def test_kernel_rank_rounds_and_keeps_unprofitable_matrices_dense():
    from factorlm.rank import RankPolicy, kernel_rank, rank_policy

    assert rank_policy("cpu").multiple == 8 and rank_policy("cuda").multiple == 64
    policy = RankPolicy(multiple=8, launch_weights=1000)
    assert kernel_rank(576, 576, 235, policy) == 232  # rounded down to the multiple
    assert kernel_rank(576, 576, 288, policy) is None  # at the break-even m n / (m + n): dense
    assert kernel_rank(576, 576, 280, policy) == 280
    # saves 64 * 64 - 24 * 128 = 1024 weights: pays one launch of 1000, not one of 2000
    assert kernel_rank(64, 64, 24, policy) == 24
    assert kernel_rank(64, 64, 24, RankPolicy(8, 2000)) is None
    assert kernel_rank(64, 64, None, policy) is None


def test_estimated_time_ratio_counts_launches_and_stacking():
    from factorlm.rank import RankPolicy, estimated_time_ratio

    before = {"q": (576, 576), "k": (192, 576)}
    after = {"q": (576, 576, 64), "k": (192, 576, 32)}
    free = estimated_time_ratio(before, after, RankPolicy(8, 0))
    assert free == pytest.approx((64 * 1152 + 32 * 768) / (576 * 576 + 192 * 576))
    costly = RankPolicy(8, 200_000)
    unstacked = estimated_time_ratio(before, after, costly)
    stacked = estimated_time_ratio(before, after, costly, groups=[["q", "k"]])
    assert unstacked > 1 > free and stacked < unstacked  # stacking saves one launch
    assert stacked == pytest.approx(unstacked - 200_000 / (576 * 576 + 192 * 576 + 400_000))


def test_rank_multiple_defaults_to_the_compute_devices_tile_width():
    from types import SimpleNamespace

    from factorlm.api import CompressionPlan
    from factorlm.run_options import RunOptions

    def plan(run, device):
        return CompressionPlan(*(SimpleNamespace(),) * 3, run, None, torch.device(device), None)

    assert RunOptions().rank_multiple is None
    assert plan(RunOptions(), "cpu").rank_multiple == 8
    assert plan(RunOptions(), "cuda:1").rank_multiple == 64
    assert plan(RunOptions(rank_multiple=16), "cuda").rank_multiple == 16
