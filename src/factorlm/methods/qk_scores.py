"""q and k fitted for the attention scores: the pure math, float64, no hooks.

q and k matter only through the scores q_h^T R k_g of each query head h and the key/value head g
it reads (GQA: g = h // group). A low-rank k' = k + Δk changes the scores of key token j by
q_i^T R Δk_j for every query token i, so over the calibration tokens

    sum_i,j (q_i^T Δk_j)^2 = sum_j Δk_j^T Q_g Δk_j,   Q_g = sum_(h reads g) W_q,h G W_q,h^T

(G = X X^T the input's Gram matrix, shared by q and k), and likewise the query error is weighted
by K_g = W_k,g G W_k,g^T. So each of the two fits minimises its error in the metric of the *other*
side's per-head covariance, ||M^1/2 (W - W') X||, instead of ||(W - W') X||:
:func:`factorlm.methods.anchored.anchored_lowrank` with ``out_metric`` M. Dimensions of k that meet
no query energy are given up first, and the query heads whose keys are large keep more.

The rotary rotation R between the two tokens is left out (R = I): attention mostly reads near
tokens, whose rotation is small, and averaging R over all the token distances of a window (which
weights distant pairs as much as near ones) measured no better. Biases are left out of the
covariances (the statistics hold no input mean).
"""

from __future__ import annotations

import torch

from factorlm.arch.heads import HeadLayout


def score_metrics(
    Wq: torch.Tensor, Wk: torch.Tensor, gram: torch.Tensor, layout: HeadLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_q, M_k): the block-diagonal metrics in which the query and the key fits measure their
    errors, as stacks of their head_dim x head_dim blocks (heads x hd x hd, kv_heads x hd x hd),
    from the *dense* q/k weights and the input Gram ``gram``."""
    hd, kv, g = layout.head_dim, layout.kv_heads, layout.group
    G = gram.to(device=Wq.device, dtype=torch.float64)
    G = 0.5 * (G + G.T)
    Q = Wq.to(torch.float64).reshape(layout.heads, hd, -1)
    K = Wk.to(torch.float64).reshape(kv, hd, -1)
    cov_q = torch.einsum("hdn,nm,hem->hde", Q, G, Q)  # per query head
    cov_k = torch.einsum("hdn,nm,hem->hde", K, G, K)  # per key head
    metric_k = cov_q.reshape(kv, g, hd, hd).sum(1)  # the queries that read each key head
    metric_q = cov_k.repeat_interleave(g, 0)  # each query head: the key head it reads
    return metric_q, metric_k
