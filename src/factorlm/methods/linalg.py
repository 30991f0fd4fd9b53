"""Float64 linear algebra shared by the activation-aware methods (pure functions, no hooks)."""

from __future__ import annotations

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


def truncated_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full thin SVD in float64 (U, S, Vh); callers slice to the rank they keep."""
    U, S, Vh = torch.linalg.svd(M.to(torch.float64), full_matrices=False)
    return U, S, Vh


def split_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U_r sqrt(S_r), B = sqrt(S_r) Vh_r (balanced factors)."""
    s = S[:rank].sqrt()
    return U[:, :rank] * s, s[:, None] * Vh[:rank]


def output_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor) -> float:
    """Relative calibration output error ||W X - W_hat X||^2 / ||W X||^2 = tr(D G D^T) / tr(W G W^T)."""
    W = W.to(torch.float64)
    D = W - W_hat.to(torch.float64)
    G = G.to(torch.float64)
    num = float(((D @ G) * D).sum())
    den = float(((W @ G) * W).sum())
    return num / den if den > 0 else 0.0
