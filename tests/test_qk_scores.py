"""Math of the q/k score metrics (methods/qk_scores.py) and of fits in an output metric
(anchored_lowrank's ``out_metric``, linalg.metric_roots), on hand-made matrices."""

from __future__ import annotations

import pytest
import torch

from factorlm.arch.heads import HeadLayout
from factorlm.errors import NumericalError
from factorlm.methods.anchored import anchored_lowrank
from factorlm.methods.linalg import apply_metric, metric_roots
from factorlm.methods.qk_scores import score_metrics

# 4 query heads reading 2 key/value heads (GQA), head_dim 3, input width 5
LAYOUT = HeadLayout(4, 2, 3, 2, "q", "k", "v", "o", True)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _attention(seed=0, t=40):
    g = _gen(seed)
    Wq = torch.randn(12, 5, generator=g, dtype=torch.float64)
    Wk = torch.randn(6, 5, generator=g, dtype=torch.float64)
    X = torch.randn(5, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, t, generator=g, dtype=torch.float64
    )
    return Wq, Wk, X


def _full(stack):
    return torch.block_diag(*stack)


def _score_error(Wq, Wk, Wq2, Wk2, X):
    """sum over heads and all token pairs of (q_i^T k_j - q'_i^T k'_j)^2 (GQA: head h reads
    key head h // 2)."""
    total = 0.0
    for h in range(4):
        g = h // 2
        q, q2 = Wq[3 * h : 3 * h + 3] @ X, Wq2[3 * h : 3 * h + 3] @ X
        k, k2 = Wk[3 * g : 3 * g + 3] @ X, Wk2[3 * g : 3 * g + 3] @ X
        total += float((q.T @ k - q2.T @ k2).square().sum())
    return total


def test_key_metric_is_the_score_error_of_a_key_change():
    Wq, Wk, X = _attention()
    D = 0.1 * torch.randn(6, 5, generator=_gen(1), dtype=torch.float64)
    _, metric_k = score_metrics(Wq, Wk, X @ X.T, LAYOUT)
    exact = _score_error(Wq, Wk, Wq, Wk + D, X)
    assert exact == pytest.approx(float(((D @ X @ X.T @ D.T) * _full(metric_k)).sum()), rel=1e-10)


def test_query_metric_is_the_score_error_of_a_query_change():
    Wq, Wk, X = _attention()
    D = 0.1 * torch.randn(12, 5, generator=_gen(2), dtype=torch.float64)
    metric_q, _ = score_metrics(Wq, Wk, X @ X.T, LAYOUT)
    exact = _score_error(Wq, Wk, Wq + D, Wk, X)
    assert exact == pytest.approx(float(((D @ X @ X.T @ D.T) * _full(metric_q)).sum()), rel=1e-10)


def test_metrics_are_one_block_per_head():
    Wq, Wk, X = _attention()
    metric_q, metric_k = score_metrics(Wq, Wk, X @ X.T, LAYOUT)
    assert metric_q.shape == (4, 3, 3) and metric_k.shape == (2, 3, 3)


def test_metric_roots_invert_each_other_in_both_forms():
    A = torch.randn(6, 6, generator=_gen(3), dtype=torch.float64)
    M = A @ A.T
    S, S_inv = metric_roots(M)
    torch.testing.assert_close(S @ S, M)
    torch.testing.assert_close(S @ S_inv, torch.eye(6, dtype=torch.float64))
    stack = torch.stack([M[:3, :3], M[3:, 3:]])  # a block-diagonal metric as its two blocks
    Sb, Sb_inv = metric_roots(stack)
    W = torch.randn(6, 4, generator=_gen(4), dtype=torch.float64)
    S_full, _ = metric_roots(_full(stack))
    torch.testing.assert_close(apply_metric(Sb, W), S_full @ W)
    torch.testing.assert_close(apply_metric(Sb_inv, apply_metric(Sb, W)), W)
    with pytest.raises(NumericalError):
        metric_roots(torch.zeros(3, 3))


def _metric_err(W, X, A, B, M):
    D = (W - A @ B) @ X
    return float(((D @ D.T) * M).sum())


def test_identity_metric_is_the_plain_fit():
    Wq, _, X = _attention()
    G = X @ X.T
    A, B, _ = anchored_lowrank(Wq, G, None, 2)
    A2, B2, _ = anchored_lowrank(Wq, G, None, 2, out_metric=torch.eye(12, dtype=torch.float64))
    eye_blocks = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    A3, B3, _ = anchored_lowrank(Wq, G, None, 2, out_metric=eye_blocks)
    torch.testing.assert_close(A @ B, A2 @ B2, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(A @ B, A3 @ B3, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_fit_in_a_metric_is_optimal_in_that_metric(rank):
    """Its error in the metric is the Eckart-Young tail of M^1/2 W L, below the plain fit's."""
    Wq, Wk, X = _attention(t=60)
    G = X @ X.T
    metric_q, _ = score_metrics(Wq, Wk, G, LAYOUT)
    A, B, _ = anchored_lowrank(Wq, G, None, rank, out_metric=metric_q)
    A0, B0, _ = anchored_lowrank(Wq, G, None, rank)
    S, _ = metric_roots(_full(metric_q))
    sv = torch.linalg.svdvals(S @ Wq @ torch.linalg.cholesky(G))
    tail = float(sv[rank:].square().sum())
    M = _full(metric_q)
    assert _metric_err(Wq, X, A, B, M) == pytest.approx(tail, rel=1e-8)
    assert _metric_err(Wq, X, A, B, M) < 0.99 * _metric_err(Wq, X, A0, B0, M)


def test_low_rank_keys_fitted_in_the_metric_change_the_scores_less():
    Wq, Wk, X = _attention(t=60)
    G = X @ X.T
    _, metric_k = score_metrics(Wq, Wk, G, LAYOUT)
    A, B, _ = anchored_lowrank(Wk, G, None, 2, out_metric=metric_k)
    A0, B0, _ = anchored_lowrank(Wk, G, None, 2)
    weighted = _score_error(Wq, Wk, Wq, A @ B, X)
    plain = _score_error(Wq, Wk, Wq, A0 @ B0, X)
    assert weighted < 0.99 * plain
