"""Anchored least-squares fits and the closed-form MLP refit: pure float64 math, no hooks.

Notation (METHODS.md): a linear y = W x; X is its calibration input in the *dense* model, X̃ the
same tokens' input in the partly compressed model (one column per token). The statistics are sums
over tokens, so they add across batches and processes:

    G̃ = X̃ X̃^T   (the compressed stream's Gram matrix)
    C  = X X̃^T   (the cross-Gram of the dense and the compressed stream)

1. **Anchored low-rank fit** (AA-SVD's objective): minimise ||W X - A B X̃||_F over rank r. With
   G̃ = L̃ L̃^T, ||W X - W' X̃||^2 = const + ||(W C G̃^-1 - W') L̃||^2, so

       A B = trunc_r(W C L̃^-T) L̃^-1.

   With X̃ = X (C = G̃) this is exactly svd-llm's trunc_r(W L) L^-1.
2. **Closed-form refit of an output linear on kept input channels** (MoDeGPT's Nyström step,
   anchored): keep channels S of the input of W (m x I); the least-squares optimum of
   ||W H - W' H̃_S|| is W' = W C[:, S] G̃[S, S]^-1 (H: the dense stream's input, H̃ the compressed
   stream's; with H̃ = H, C = G̃ and it reduces to the Nyström refit W G[:, S] G[S, S]^-1).
3. **Ridge leverage scores** diag(G (G + λ I)^-1) of the channels of an input Gram, to choose S.

Every function takes the *sums* (or means: the scale cancels, except in ``ridge`` which is
relative to mean(diag)).
"""

from __future__ import annotations

import torch

from factorlm.errors import NumericalError
from factorlm.methods.linalg import (
    ThinSVD,
    apply_metric,
    check_finite,
    metric_roots,
    split_factors,
    whitening,
)


def anchored_lowrank(
    W: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor | None,
    rank: int,
    ridge: float = 0.0,
    out_metric: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(A m x r, B r x n, notes) minimising ||W X - A B X̃||^2 + λ ||A B||^2 (``cross`` = X X̃^T;
    None: X = X̃).

    ``gram`` = X̃ X̃^T; ``ridge`` λ is relative to mean(diag G̃) (0: none). Float64 throughout; a
    Gram matrix that is not positive definite gets the smallest diagonal shift that makes its
    Cholesky factor exist (reported in the notes). ``out_metric`` M (m x m, or b x d x d: the
    block-diagonal matrix of b blocks, b·d = m; positive semi-definite) measures the output error
    in its metric, ||M^1/2 (W X - A B X̃)||: the fit of M^1/2 W, then A = M^-1/2 A
    (:func:`factorlm.methods.linalg.metric_roots`).
    """
    W = W.to(torch.float64)
    check_finite(W, "weight")
    if out_metric is not None:
        S, S_inv = metric_roots(out_metric.to(device=W.device))
        A, B, notes = anchored_lowrank(apply_metric(S, W), gram, cross, rank, ridge)
        return apply_metric(S_inv, A), B, notes
    G = gram.to(device=W.device, dtype=torch.float64)
    if ridge > 0:
        G = G + ridge_eye(G, ridge)
    wh = whitening(G, name="")
    if cross is None:
        target = W @ wh.L
    else:
        C = cross.to(device=W.device, dtype=torch.float64)
        check_finite(C, "cross-Gram matrix")
        # W C L̃^-T: solve L̃ Z = (W C)^T for Z = L̃^-1 C^T W^T, then transpose
        target = torch.linalg.solve_triangular(wh.L, (W @ C).T, upper=False).T
    A, B = split_factors(ThinSVD(target), rank)
    return A, wh.right_inverse(B), list(wh.notes)


def ridge_eye(G: torch.Tensor, ridge: float) -> torch.Tensor:
    scale = float(G.diagonal().mean()) if G.numel() else 0.0
    if not scale > 0:
        raise NumericalError("Gram matrix is zero (the layer never received a non-zero input)")
    return ridge * scale * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def refit_columns(
    W: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor | None,
    keep: torch.Tensor,
    ridge: float = 1e-6,
) -> torch.Tensor:
    """W' (m x |S|) = W C[:, S] (G̃[S, S] + λ I)^-1: the least-squares output on kept inputs.

    ``gram`` = H̃ H̃^T (I x I), ``cross`` = H H̃^T (None: H = H̃), ``keep`` the kept indices S.
    ``ridge`` λ is relative to mean(diag G̃[S, S]) and only guards against singular blocks.
    """
    W = W.to(torch.float64)
    G = gram.to(device=W.device, dtype=torch.float64)
    C = G if cross is None else cross.to(device=W.device, dtype=torch.float64)
    return refit_to_target(W @ C, G, keep, ridge)


def refit_to_target(
    target_cross: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-6
) -> torch.Tensor:
    """W' (m x |S|) = Y H̃[S]^T (G̃[S, S] + λ I)^-1: the least-squares map from the kept inputs
    to any target output Y (``target_cross`` = Y H̃^T, m x I; ``gram`` = H̃ H̃^T).

    Where G̃[S, S] + λ I does not factor (inputs of lower rank than their width, e.g. o_proj's
    behind a low-rank v_proj, rounding their zero eigenvalues below -λ), :func:`whitening` adds its
    smallest working diagonal shift: the minimum-norm solution, up to the shift, on the directions
    with no input."""
    YH = target_cross.to(torch.float64)
    G = gram.to(device=YH.device, dtype=torch.float64)
    keep = keep.to(YH.device)
    Gs = G[keep][:, keep]
    Gs = 0.5 * (Gs + Gs.T)
    rhs = YH[:, keep].T  # |S| x m
    # a Gram that does not factor gets whitening's smallest working shift on top (as in
    # greedy_refit_channels)
    L = whitening(Gs + ridge_eye(Gs, ridge), name="kept-channel").L
    sol = torch.cholesky_solve(rhs, L)
    check_finite(sol, "refit weight")
    return sol.T


def greedy_refit_channels(
    W: torch.Tensor, gram: torch.Tensor, k: int, ridge: float = 1e-6
) -> torch.Tensor:
    """Scores whose top ``k`` are the channels a greedy backward elimination keeps for the refit.

    The refit on kept channels S (ridge-regularised G = H̃ H̃^T + λ I) has coefficients
    β = W G[:, S] G[S, S]^-1; removing channel j from S and refitting raises the output error by
    exactly ||β[:, j]||^2 / (G[S, S]^-1)_jj. Each step removes the channel that raises it least and
    updates G[S, S]^-1 and β by a rank-one step (O(I^2 + m I) per removed channel, float64), so
    the choice accounts for channels that the refit can rebuild from the others (a duplicated
    channel costs nothing). Returns one score per channel: the step at which it was removed (earlier
    = lower), ``I`` for the kept ones.
    """
    W = W.to(torch.float64)
    G = gram.to(device=W.device, dtype=torch.float64)
    G = 0.5 * (G + G.T)
    n = G.shape[0]
    if not 0 <= k <= n:
        raise NumericalError(f"cannot keep {k} of {n} channels")
    # a singular G (few tokens, dead channels) gets whitening's smallest working shift on top
    Ginv = torch.cholesky_inverse(whitening(G + ridge_eye(G, ridge), name="").L)
    beta = (W @ G) @ Ginv
    alive = torch.ones(n, dtype=torch.bool, device=W.device)
    scores = torch.full((n,), float(n), dtype=torch.float64, device=W.device)
    for step in range(n - k):
        d = Ginv.diagonal()
        cost = beta.square().sum(0) / torch.where(alive, d, torch.ones_like(d))
        cost[~alive] = float("inf")
        j = int(torch.argmin(cost))
        alive[j] = False
        scores[j] = step
        g, b = Ginv[:, j].clone(), beta[:, j].clone()
        Ginv.addr_(g, g, alpha=-1.0 / float(g[j]))
        beta.addr_(b, g, alpha=-1.0 / float(g[j]))
    return scores


def ridge_leverage(gram: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """diag(G (G + λ I)^-1), λ = ``ridge`` x mean(diag G): each channel's ridge leverage score."""
    G = gram.to(torch.float64)
    G = 0.5 * (G + G.T)
    lam = ridge_eye(G, ridge)
    M = torch.linalg.solve(G + lam, G)  # (G + λ I)^-1 G, same diagonal as G (G + λ I)^-1
    return M.diagonal().clone()


def weighted_energy(W: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Channel i's share of the output energy ||W[:, i]||^2 G_ii (no refit assumed)."""
    W = W.to(torch.float64)
    return W.square().sum(0) * gram.to(device=W.device, dtype=torch.float64).diagonal()


def output_residual(
    W: torch.Tensor,
    W_hat: torch.Tensor,
    gram_dense: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor | None,
) -> float:
    """Relative error ||W X - W_hat X̃||^2 / ||W X||^2 from the three sums (``gram_dense`` = X X^T)."""
    W = W.to(torch.float64)
    Wh = W_hat.to(device=W.device, dtype=torch.float64)
    Gd = gram_dense.to(device=W.device, dtype=torch.float64)
    G = gram.to(device=W.device, dtype=torch.float64)
    C = G if cross is None else cross.to(device=W.device, dtype=torch.float64)
    den = float(((W @ Gd) * W).sum())
    num = den - 2 * float(((W @ C) * Wh).sum()) + float(((Wh @ G) * Wh).sum())
    return max(num, 0.0) / den if den > 0 else 0.0
