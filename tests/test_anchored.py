"""Math of the anchored fits (methods/anchored.py) on hand-made matrices."""

from __future__ import annotations

import torch

from factorlm.calibration.stats import LayerStats
from factorlm.methods.anchored import (
    anchored_lowrank,
    output_residual,
    refit_columns,
    ridge_leverage,
)
from factorlm.methods.svdllm import decompose_svdllm


def _data(m=12, n=10, t=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    X = mix @ torch.randn(n, t, generator=g, dtype=torch.float64)  # correlated channels
    shift = 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64)
    Xt = X + shift @ X + 0.2 * torch.randn(n, t, generator=g, dtype=torch.float64)
    return W, X, Xt


def _err(W, X, Xt, A, B):
    return float((W @ X - A @ B @ Xt).square().sum())


def test_anchored_with_equal_streams_is_svd_llm():
    W, X, _ = _data()
    G = X @ X.T
    for r in (1, 4, 9):
        A, B, _ = anchored_lowrank(W, G, G.clone(), r)
        A2, B2 = decompose_svdllm(
            W, LayerStats(n_tokens=X.shape[1], gram=G), whiten="cholesky"
        ).factors(r)
        torch.testing.assert_close(A @ B, A2 @ B2, atol=1e-9, rtol=1e-9)
        A3, B3, _ = anchored_lowrank(W, G, None, r)  # no cross-Gram: the same stream
        torch.testing.assert_close(A3 @ B3, A2 @ B2, atol=1e-9, rtol=1e-9)


def test_anchored_beats_svd_llm_on_a_shifted_input_and_is_optimal():
    W, X, Xt = _data()
    Gt, C = Xt @ Xt.T, X @ Xt.T
    for r in (2, 5, 8):
        A, B, _ = anchored_lowrank(W, Gt, C, r)
        A2, B2 = decompose_svdllm(
            W, LayerStats(n_tokens=X.shape[1], gram=Gt), whiten="cholesky"
        ).factors(r)
        e_anchor, e_plain = _err(W, X, Xt, A, B), _err(W, X, Xt, A2, B2)
        assert e_anchor < e_plain
        # no small perturbation of the rank-r product does better (first-order optimality)
        g = torch.Generator().manual_seed(r)
        for _ in range(5):
            dA = 1e-4 * torch.randn(A.shape, generator=g, dtype=torch.float64)
            assert _err(W, X, Xt, A + dA, B) >= e_anchor - 1e-9
    # full rank: the unconstrained least-squares optimum W C G̃^-1
    A, B, _ = anchored_lowrank(W, Gt, C, min(W.shape))
    torch.testing.assert_close(A @ B, W @ C @ torch.linalg.inv(Gt), atol=1e-7, rtol=1e-7)


def test_output_residual_from_sums_matches_direct_error():
    W, X, Xt = _data()
    A, B, _ = anchored_lowrank(W, Xt @ Xt.T, X @ Xt.T, 3)
    direct = _err(W, X, Xt, A, B) / float((W @ X).square().sum())
    via = output_residual(W, A @ B, X @ X.T, Xt @ Xt.T, X @ Xt.T)
    assert abs(direct - via) < 1e-9


def test_refit_is_least_squares_on_kept_channels_and_beats_slicing():
    W, H, Ht = _data(m=6, n=16, t=500, seed=1)
    keep = torch.tensor([0, 2, 3, 7, 8, 11, 15])
    Gt, C = Ht @ Ht.T, H @ Ht.T
    Wr = refit_columns(W, Gt, C, keep, ridge=0.0 + 1e-12)
    ref = torch.linalg.lstsq(Ht[keep].T, (W @ H).T).solution.T  # min ||W H - W' Ht_S||
    torch.testing.assert_close(Wr, ref, atol=1e-7, rtol=1e-7)
    sliced = W[:, keep]
    e_refit = float((W @ H - Wr @ Ht[keep]).square().sum())
    e_slice = float((W @ H - sliced @ Ht[keep]).square().sum())
    assert e_refit < e_slice
    # one stream (H = Ht): the Nyström refit; keeping every channel reproduces W
    full = torch.arange(16)
    torch.testing.assert_close(refit_columns(W, H @ H.T, None, full, ridge=1e-14), W)


def test_ridge_leverage_ranks_an_independent_channel_above_a_duplicated_one():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 200, generator=g, dtype=torch.float64)
    H = torch.cat([base, base[:1] * 1.0001], 0)  # channel 3 duplicates channel 0
    lev = ridge_leverage(H @ H.T, ridge=1e-3)
    assert lev.shape == (4,)
    assert bool((lev >= 0).all()) and bool((lev <= 1 + 1e-9).all())
    assert lev[1] > lev[0] and lev[2] > lev[3]  # shared information halves the duplicates' scores


def _refit_err(W, H, keep):
    Wn = refit_columns(W, H @ H.T, None, keep, ridge=1e-9)
    return float((W @ H - Wn @ H[keep]).square().sum())


def test_greedy_selection_skips_duplicated_channels_and_beats_energy():
    from factorlm.methods.anchored import greedy_refit_channels, weighted_energy

    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 500, generator=g, dtype=torch.float64)
    # channels 0 and 1 are one strong signal twice; 2, 3, 4 weaker independent ones
    H = torch.stack([3 * base[0], 3 * base[0], base[1], base[2], 0.5 * base[3]])
    W = torch.randn(6, 5, generator=g, dtype=torch.float64)
    scores = greedy_refit_channels(W, H @ H.T, 3)
    keep = torch.sort(torch.topk(scores, 3).indices).values
    assert not {0, 1} <= set(keep.tolist())  # never both copies
    energy = torch.sort(torch.topk(weighted_energy(W, H @ H.T), 3).indices).values
    assert {0, 1} <= set(energy.tolist())  # energy keeps both copies here
    assert _refit_err(W, H, keep) < _refit_err(W, H, energy)


def test_greedy_removal_order_is_the_brute_force_one():
    """Every step removes the channel whose removal (and refit) raises the error least."""
    from factorlm.methods.anchored import greedy_refit_channels, refit_to_target

    g = torch.Generator().manual_seed(7)
    n, k = 40, 12
    H = torch.randn(n, 600, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g)
    H[5] = H[3] + 0.01 * H[9]  # a near-duplicate channel
    W = torch.randn(6, n, generator=g, dtype=torch.float64)
    Y = W @ H
    G = H @ H.T
    scores = greedy_refit_channels(W, G, k, 1e-12)
    alive = list(range(n))
    for step in range(n - k):

        def err(j):
            keep = torch.tensor([c for c in alive if c != j])
            Wk = refit_to_target(W @ G, G, keep, ridge=1e-12)
            return float((Y - Wk @ H[keep]).square().sum())

        j = min(alive, key=err)
        assert scores[j] == step
        alive.remove(j)
    assert all(scores[c] == n for c in alive)


def test_greedy_first_removal_is_the_cheapest_and_errors_grow_along_the_order():
    from factorlm.methods.anchored import greedy_refit_channels

    W, X, _ = _data(m=5, n=8)
    scores = greedy_refit_channels(W, X @ X.T, 0)  # remove every channel, in order
    assert sorted(scores.tolist()) == list(range(8))
    first = int(torch.argmin(scores))
    everything = torch.arange(8)
    errs = [_refit_err(W, X, everything[everything != j]) for j in range(8)]
    assert first == min(range(8), key=errs.__getitem__)
    # keeping the top k by score: the error grows as channels go
    order = torch.argsort(scores, descending=True)
    errs = [_refit_err(W, X, torch.sort(order[:k]).values) for k in range(8, 0, -1)]
    assert all(a <= b + 1e-9 for a, b in zip(errs, errs[1:], strict=False))


def test_refit_on_rank_deficient_inputs_raises_the_ridge_until_it_factors():
    """Inputs of rank 3 in 10 channels (o_proj behind a rank-3 v_proj), whose Gram has rounding
    eigenvalues below -λ: the refit still comes out, and reproduces the targets on those inputs."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)
    Xt = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 200, generator=g, dtype=torch.float64
    )
    X = Xt + 0.1 * torch.randn(10, 200, generator=g, dtype=torch.float64)
    G = Xt @ Xt.T
    G -= 1e-6 * float(G.diagonal().mean()) * torch.eye(10, dtype=torch.float64)  # rounding
    assert int(torch.linalg.cholesky_ex(G + 1e-6 * G.diagonal().mean() * torch.eye(10))[1]) != 0
    keep = torch.arange(10)
    W2 = refit_columns(W, G, X @ Xt.T, keep, ridge=1e-6)
    best = torch.linalg.lstsq(Xt.T, (W @ X).T).solution.T  # a least-squares optimum
    err = float((W @ X - W2 @ Xt).square().sum())
    assert torch.isfinite(W2).all()
    assert err <= 1.01 * float((W @ X - best @ Xt).square().sum())
