"""Math of the loss's output metric (methods/loss_metric.py) on hand-made matrices: the shrunk
gradient Gram, v_proj's metric through o_proj, and fits / channel choices in those metrics."""

from __future__ import annotations

import pytest
import torch

from factorlm.arch.heads import HeadLayout
from factorlm.errors import NumericalError
from factorlm.methods.anchored import anchored_lowrank, greedy_refit_channels
from factorlm.methods.linalg import apply_metric, metric_roots
from factorlm.methods.loss_metric import shrunk_metric, value_metric

# 4 query heads reading 2 key/value heads (GQA: head h reads h // 2), head_dim 3, hidden 7
LAYOUT = HeadLayout(4, 2, 3, 2, "q", "k", "v", "o", True)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _psd(n, seed=0, rank=None):
    A = torch.randn(n, rank or n, generator=_gen(seed), dtype=torch.float64)
    return A @ A.T


def test_shrunk_metric_blends_the_normalised_gram_with_the_identity():
    F = _psd(6, 1)
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(shrunk_metric(F, 1.0), eye)
    assert torch.allclose(shrunk_metric(F, 0.0), F / F.diagonal().mean())
    M = shrunk_metric(3.0 * F, 0.3)  # the Gram's scale does not matter
    assert torch.allclose(M, 0.7 * F / F.diagonal().mean() + 0.3 * eye)
    assert float(M.diagonal().mean()) == pytest.approx(1.0)
    with pytest.raises(NumericalError):
        shrunk_metric(torch.zeros(3, 3), 0.5)


def _value_error(Wo, M, dV):
    """Σ_h tr(W_o,h ΔV_g(h) ΔV_g(h)^T W_o,h^T M): v's error (kv·hd x tokens) through o_proj's
    columns of each query head, the heads' errors independent, in o's output metric ``M``."""
    hd, g = LAYOUT.head_dim, LAYOUT.group
    total = torch.zeros((), dtype=torch.float64)
    for h in range(LAYOUT.heads):
        kv = h // g
        E = Wo[:, h * hd : (h + 1) * hd] @ dV[kv * hd : (kv + 1) * hd]
        total = total + torch.trace(E.T @ M @ E)
    return float(total)


def test_value_metric_is_the_error_through_each_query_heads_o_proj_columns():
    Wo = torch.randn(7, 12, generator=_gen(2), dtype=torch.float64)
    M = _psd(7, 3)
    dV = torch.randn(6, 9, generator=_gen(4), dtype=torch.float64)
    blocks = value_metric(Wo, M, LAYOUT)
    assert blocks.shape == (2, 3, 3)
    via_metric = float(torch.trace(dV.T @ torch.block_diag(*blocks) @ dV))
    assert via_metric == pytest.approx(_value_error(Wo, M, dV), rel=1e-10)


def test_the_value_fit_in_its_metric_loses_less_through_o_proj_than_the_plain_fit():
    Wv = torch.randn(6, 5, generator=_gen(5), dtype=torch.float64)
    Wo = torch.randn(7, 12, generator=_gen(6), dtype=torch.float64)
    X = torch.randn(5, 5, generator=_gen(7), dtype=torch.float64) @ torch.randn(
        5, 50, generator=_gen(8), dtype=torch.float64
    )
    G = X @ X.T
    M = shrunk_metric(_psd(7, 9, rank=2), 0.1)
    plain = anchored_lowrank(Wv, G, None, 2)
    fitted = anchored_lowrank(Wv, G, None, 2, out_metric=value_metric(Wo, M, LAYOUT))
    err_plain = _value_error(Wo, M, (Wv - plain[0] @ plain[1]) @ X)
    err_fit = _value_error(Wo, M, (Wv - fitted[0] @ fitted[1]) @ X)
    assert err_fit < 0.95 * err_plain


def _refit_error(W, G, M, keep):
    """tr(M (W G W^T - W G_:S G_SS^-1 G_S: W^T)): the refit's output error on kept channels S,
    in the output metric ``M``."""
    GS = G[:, keep]
    explained = GS @ torch.linalg.solve(G[keep][:, keep], GS.T)
    return float(torch.trace(M @ W @ (G - explained) @ W.T))


def test_greedy_in_the_metric_removes_the_channel_whose_refit_costs_least_there():
    W = torch.randn(4, 6, generator=_gen(10), dtype=torch.float64)
    H = torch.randn(6, 6, generator=_gen(11), dtype=torch.float64) @ torch.randn(
        6, 40, generator=_gen(12), dtype=torch.float64
    )
    G = H @ H.T
    M = shrunk_metric(_psd(4, 13, rank=1), 0.02)
    root = metric_roots(M)[0]
    scores = greedy_refit_channels(apply_metric(root, W), G, 5, ridge=0.0)
    removed = int(torch.argmin(scores))
    costs = [_refit_error(W, G, M, [i for i in range(6) if i != j]) for j in range(6)]
    assert removed == min(range(6), key=costs.__getitem__)
    euclid = int(torch.argmin(greedy_refit_channels(W, G, 5, ridge=0.0)))
    assert euclid != removed  # the metric changes the choice on this example
