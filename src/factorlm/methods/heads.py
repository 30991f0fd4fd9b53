"""Attention as modules (METHODS.md formula 3): the pure math, on weights and an input Gram.

q and k matter only through q_h^T R k_h per head, v and o only through W_o,h W_v,g (g the key /
value head that query head h reads). Both pairs are compressed as units, in float64:

* **value-output** (:func:`vo_fit`): for each key/value head g, the maps of its value head into
  the outputs of the query heads that read it, stacked, O_g = [W_o,h]_h (group·m x d_h), whitened
  by the input's Cholesky factor L (G = X X^T / n = L L^T): M_g = O_g W_v,g L. Its SVD (computed
  as O_g = Q R, R W_v,g L = U S V^T) gives the best rank-r_g value head: v rows U_r^T R W_v,g,
  o columns (Q U_r) per query head; r_g = head_dim reproduces the pair exactly. The kept
  components are the largest S across all groups (one budget per block), so the error is the
  whitened tail sqrt(sum dropped S^2 / sum S^2) of the stacked maps (the attention's mixing of
  tokens, which acts the same on every value dimension, is left out).
* **query-key** (:func:`qk_select`): a rotary pair (i, i + rotary/2) is rotated as one, so it is
  kept or removed as one unit, in k and in every query head that reads k (GQA). A unit's score is
  the product of its q and k energies' square roots, sqrt(sum_h E||q_h,u||^2) sqrt(E||k_u||^2)
  (E||w x||^2 = w G w^T): a bound on its share of the attention logits. Units are kept by score
  per dimension until the budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factorlm.arch.heads import HeadLayout
from factorlm.methods.anchored import ridge_eye
from factorlm.methods.linalg import whitening


@dataclass
class VOFit:
    v_weight: torch.Tensor  # (kept x d_in)
    v_bias: torch.Tensor | None
    v_slots: torch.Tensor  # positions of the kept v rows among kv_heads x head_dim
    o_weight: torch.Tensor  # (m x heads·kept/kv)
    o_slots: torch.Tensor  # positions of the kept o columns among heads x head_dim
    kept: list[int]  # value dimensions kept per key/value head
    rel_error: float  # sum dropped S^2 / sum S^2 (whitened, stacked maps)
    notes: list[str]


def vo_fit(
    Wv: torch.Tensor,
    bv: torch.Tensor | None,
    Wo: torch.Tensor,
    gram: torch.Tensor,
    layout: HeadLayout,
    keep: int,
    ridge: float = 1e-6,
) -> VOFit:
    """Keep ``keep`` value dimensions in all (the largest whitened singular values of the groups'
    stacked value-output maps); see the module docstring. ``keep`` in [1, kv_heads·head_dim]."""
    hd, kv, g = layout.head_dim, layout.kv_heads, layout.group
    if not 1 <= keep <= kv * hd:
        raise ValueError(f"keep must be in [1, {kv * hd}], got {keep}")
    Wv64, Wo64 = Wv.double(), Wo.double()
    G = gram.to(device=Wv.device, dtype=torch.float64)
    if ridge > 0:
        G = G + ridge_eye(G, ridge)
    wh = whitening(G, name="")
    L = wh.L
    m = Wo.shape[0]
    parts = []
    for j in range(kv):
        Wv_j = Wv64[j * hd : (j + 1) * hd]
        O_j = torch.cat([Wo64[:, h * hd : (h + 1) * hd] for h in range(j * g, (j + 1) * g)], 0)
        Q, R = torch.linalg.qr(O_j)  # (g m x hd), (hd x hd)
        U, S, _ = torch.linalg.svd(R @ Wv_j @ L, full_matrices=False)
        parts.append((Q, R, U, S))
    energy = torch.cat([S.square() for *_, S in parts])
    order = torch.argsort(energy, descending=True, stable=True)
    group_of = torch.cat([torch.full((len(p[3]),), j) for j, p in enumerate(parts)])
    kept = [int((group_of[order[:keep]] == j).sum()) for j in range(kv)]
    total = float(energy.sum())
    dropped = total - float(energy[order[:keep]].sum())
    v_rows, v_bias, v_slots, o_cols, o_slots = [], [], [], [], []
    for j, ((Q, R, U, _), r) in enumerate(zip(parts, kept, strict=True)):
        if r == 0:
            continue
        Ur = U[:, :r]
        v_rows.append(Ur.T @ R @ Wv64[j * hd : (j + 1) * hd])
        if bv is not None:
            v_bias.append(Ur.T @ R @ bv.double()[j * hd : (j + 1) * hd])
        v_slots.append(j * hd + torch.arange(r))
        QU = Q @ Ur  # (g m x r): the o columns of the group's query heads, stacked
        for i in range(g):
            o_cols.append(QU[i * m : (i + 1) * m])
            o_slots.append((j * g + i) * hd + torch.arange(r))
    return VOFit(
        v_weight=torch.cat(v_rows, 0),
        v_bias=torch.cat(v_bias) if bv is not None else None,
        v_slots=torch.cat(v_slots),
        o_weight=torch.cat(o_cols, 1),
        o_slots=torch.cat(o_slots),
        kept=kept,
        rel_error=dropped / total if total > 0 else 0.0,
        notes=list(wh.notes),
    )


@dataclass
class QKSelection:
    q_slots: torch.Tensor  # kept q rows among heads x head_dim
    k_slots: torch.Tensor  # kept k rows among kv_heads x head_dim
    kept: list[int]  # q/k dimensions kept per key/value head
    q_error: float  # share of the q rows' energy removed
    k_error: float


def row_energy(W: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """E||w_i x||^2 = w_i G w_i^T for every row i (float64)."""
    W64 = W.double()
    return ((W64 @ gram.double().to(W.device)) * W64).sum(1).clamp_min(0)


def qk_select(
    Wq: torch.Tensor, Wk: torch.Tensor, gram: torch.Tensor, layout: HeadLayout, keep: int
) -> QKSelection:
    """Keep at most ``keep`` q/k dimensions in all (counted per key/value head; each applies to
    k and to the group's query heads), whole rotary pairs only; at least one unit."""
    hd, kv, g = layout.head_dim, layout.kv_heads, layout.group
    eq = row_energy(Wq, gram).view(layout.heads, hd)
    ek = row_energy(Wk, gram).view(kv, hd)
    cands = []  # (score per dimension, group, unit)
    for j in range(kv):
        q_j = eq[j * g : (j + 1) * g].sum(0)
        for u in layout.units():
            idx = list(u)
            score = float(q_j[idx].sum().sqrt() * ek[j, idx].sum().sqrt())
            cands.append((score / len(u), j, u))
    cands.sort(key=lambda c: -c[0])
    chosen: list[set[int]] = [set() for _ in range(kv)]
    used = 0
    for _, j, u in cands:
        if used + len(u) > keep and used > 0:
            continue
        chosen[j].update(u)
        used += len(u)
    q_slots = [h * hd + d for h in range(layout.heads) for d in sorted(chosen[h // g])]
    k_slots = [j * hd + d for j in range(kv) for d in sorted(chosen[j])]
    q_slots_t, k_slots_t = torch.tensor(q_slots), torch.tensor(k_slots)
    eqf, ekf = eq.flatten(), ek.flatten()

    def removed(e: torch.Tensor, slots: torch.Tensor) -> float:
        total = float(e.sum())
        return 1.0 - float(e[slots].sum()) / total if total > 0 else 0.0

    return QKSelection(
        q_slots=q_slots_t,
        k_slots=k_slots_t,
        kept=[len(c) for c in chosen],
        q_error=removed(eqf, q_slots_t),
        k_error=removed(ekf, k_slots_t),
    )
