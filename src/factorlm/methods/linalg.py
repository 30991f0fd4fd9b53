"""Float64 linear algebra shared by the activation-aware methods (pure functions, no hooks)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from factorlm.errors import NumericalError


@dataclass
class Whitening:
    """A factor L with L L^T = G (up to the recorded shift), and a way to apply L^-1 from the right."""

    L: torch.Tensor  # n x n, float64
    kind: str  # "cholesky" | "eig"
    shift: float = 0.0  # relative diagonal shift added to G (0 when none was needed)
    notes: list[str] = field(default_factory=list)
    _Linv: torch.Tensor | None = None

    def right_inverse(self, M: torch.Tensor) -> torch.Tensor:
        """M @ L^-1, computed stably."""
        if self.kind == "cholesky":
            # X L = M  <=>  L^T X^T = M^T
            return torch.linalg.solve_triangular(self.L.T, M.T, upper=True).T
        if self._Linv is None:
            raise NumericalError("eigen whitening has no inverse")
        return M @ self._Linv


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NumericalError(f"{what} contains NaN or Inf")


def whitening(
    G: torch.Tensor, kind: str = "cholesky", name: str = "layer", eig_floor: float = 1e-10
) -> Whitening:
    """Factor a (mean) Gram matrix G = X X^T / T.

    ``cholesky``: L = chol(G); when G is not positive definite (dead input channels, fewer tokens
    than channels), add the smallest diagonal shift eps * mean(diag G), eps = 1e-10, 1e-9, ... that
    makes it succeed, and say so in ``notes``. ``eig``: G = Q diag(l) Q^T with l clamped at
    ``eig_floor * max(l)``, L = Q diag(sqrt l) (NSVD-II).
    """
    G = G.to(torch.float64)
    where = f"{name}: " if name else ""
    check_finite(G, f"{where}Gram matrix")
    G = 0.5 * (G + G.T)
    n = G.shape[0]
    scale = float(G.diagonal().mean()) if n else 1.0
    if scale <= 0:
        raise NumericalError(
            f"{where}Gram matrix is zero (the layer never received a non-zero input)"
        )
    if kind == "eig":
        evals, Q = torch.linalg.eigh(G)
        floor = eig_floor * float(evals.max())
        n_clamped = int((evals < floor).sum())
        evals = evals.clamp_min(floor)
        sq = evals.sqrt()
        w = Whitening(L=Q * sq, kind="eig", _Linv=(Q / sq).T)
        if n_clamped:
            w.notes.append(
                f"{n_clamped} eigenvalues of the Gram matrix clamped to {eig_floor:g}*max"
            )
        return w
    if kind != "cholesky":
        raise ValueError(f"unknown whitening {kind!r}")
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return Whitening(L=L, kind="cholesky")
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    eps = 1e-10
    while eps <= 1e-1:
        L, info = torch.linalg.cholesky_ex(G + eps * scale * eye)
        if int(info) == 0:
            return Whitening(
                L=L,
                kind="cholesky",
                shift=eps,
                notes=[
                    f"Gram matrix not positive definite: diagonal shift {eps:.0e}*mean(diag) added"
                ],
            )
        eps *= 10
    raise NumericalError(f"{where}Gram matrix could not be made positive definite")


class ThinSVD:
    """Thin SVD of M in float64, from the eigendecomposition of its smaller Gram matrix.

    ``eigh`` of the min(m, n)-square Gram is ~3x faster than LAPACK's SVD of M. Singular values
    come out with an absolute error ~eps * S_0 (ample for spectra and truncation errors); the
    singular vectors of component i carry a relative error ~eps * (S_0 / S_i)^2, so a rank whose
    last kept value is below ``rel_floor * S_0`` is served by the exact SVD instead (computed
    once, on demand).
    """

    rel_floor = 1e-4

    def __init__(self, M: torch.Tensor) -> None:
        self.M = M.to(torch.float64)
        m, n = self.M.shape
        self.tall = m >= n
        G = self.M.T @ self.M if self.tall else self.M @ self.M.T
        evals, vecs = torch.linalg.eigh(G)
        self.S = evals.flip(0).clamp_min(0).sqrt()
        self._vecs = vecs.flip(1)
        self._exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def top(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_r, S_r, Vh_r) of the ``rank`` largest singular values."""
        S = self.S
        if self._exact is None and rank > 0 and S[rank - 1] > self.rel_floor * S[0]:
            s = S[:rank]
            if self.tall:
                V = self._vecs[:, :rank]
                return (self.M @ V) / s, s, V.T
            U = self._vecs[:, :rank]
            return U, s, (U.T @ self.M) / s[:, None]
        if self._exact is None:
            U, S_, Vh = torch.linalg.svd(self.M, full_matrices=False)
            self._exact = (U, S_, Vh)
            self.S = S_
        U, S_, Vh = self._exact
        return U[:, :rank], S_[:rank], Vh[:rank]


def split_factors(svd: ThinSVD, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U_r sqrt(S_r), B = sqrt(S_r) Vh_r (balanced factors)."""
    U, S, Vh = svd.top(rank)
    s = S.sqrt()
    return U * s, s[:, None] * Vh


def output_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor) -> float:
    """Relative calibration output error ||W X - W_hat X||^2 / ||W X||^2 = tr(D G D^T) / tr(W G W^T)."""
    W = W.to(torch.float64)
    D = W - W_hat.to(torch.float64)
    G = G.to(torch.float64)
    num = float(((D @ G) * D).sum())
    den = float(((W @ G) * W).sum())
    return num / den if den > 0 else 0.0


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale the rank-one components of ``A @ B`` so both factors have the same entry size.

    Component i becomes ``A[:, i] t_i`` and ``B[i, :] / t_i`` with
    ``t_i^2 = (||B[i]|| / sqrt(n)) / (||A[:, i]|| / sqrt(m))``: its two factors then have the same
    root-mean-square entry. The product is unchanged (up to rounding). A whitened or
    activation-scaled factorization puts the scale of the inputs into ``B`` (on SmolLM2 the entries
    of ``B`` are 10-100x those of ``A``); an optimizer with a fixed step per entry (Adam) would then
    move ``A`` by a much larger fraction than ``B``. Components with a zero factor are left alone.
    Computed in float64, returned in the factors' dtypes.
    """
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    m, n = A.shape[0], B.shape[1]
    rms_a = A64.norm(dim=0) / math.sqrt(m)
    rms_b = B64.norm(dim=1) / math.sqrt(n)
    ok = (rms_a > 0) & (rms_b > 0)
    t = torch.where(ok, (rms_b / rms_a.where(ok, 1.0)).sqrt(), torch.ones_like(rms_a))
    return (A64 * t).to(A.dtype), (B64 / t[:, None]).to(B.dtype)


def metric_roots(M: torch.Tensor, floor: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^1/2, M^-1/2) of a symmetric positive semi-definite metric, its eigenvalues clamped at
    ``floor`` x the largest (directions the metric does not see keep a small weight). A 3-D ``M``
    (b x d x d) is the block-diagonal metric of its b blocks (one eigendecomposition per block);
    the roots come back in the same form (:func:`apply_metric` multiplies by either form)."""
    M = M.to(torch.float64)
    evals, V = torch.linalg.eigh(0.5 * (M + M.mT))
    top = float(evals.max()) if evals.numel() else 0.0
    if not top > 0:
        raise NumericalError("the output metric is zero")
    e = evals.clamp_min(floor * top).unsqueeze(-2)
    return (V * e.sqrt()) @ V.mT, (V / e.sqrt()) @ V.mT


def apply_metric(S: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """S @ W for a matrix S (m x m), or for the block-diagonal matrix of a stack S (b x d x d,
    b·d = m)."""
    if S.dim() == 2:
        return S @ W
    b, d, _ = S.shape
    return (S @ W.reshape(b, d, -1)).reshape(W.shape)
