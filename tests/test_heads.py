"""Attention as modules: the math of factorlm.methods.heads on hand-made matrices, SlotLinear."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from factorlm.arch.heads import HeadLayout
from factorlm.methods.heads import qk_select, row_energy, vo_fit
from factorlm.nn.slots import SlotLinear

D = 24  # model width


def _layout(heads=4, kv=2, hd=6, rotary=6) -> HeadLayout:
    return HeadLayout(heads, kv, hd, rotary, "q", "k", "v", "o", True)


def _gram(n=D, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4 * n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, n)[:, None]
    return X @ X.T / X.shape[1]


def _weights(lay: HeadLayout, seed=1):
    g = torch.Generator().manual_seed(seed)
    Wv = torch.randn(lay.kv_heads * lay.head_dim, D, generator=g, dtype=torch.float64)
    Wo = torch.randn(D, lay.heads * lay.head_dim, generator=g, dtype=torch.float64)
    bv = torch.randn(lay.kv_heads * lay.head_dim, generator=g, dtype=torch.float64)
    return Wv, bv, Wo


def _stacked_error(Wv, Wo, fit, lay, gram) -> float:
    """sum over query heads of ||(W_o,h W_v,g - W'_o,h W'_v,g) L||^2 / ||W_o,h W_v,g L||^2."""
    L = torch.linalg.cholesky(gram)
    v_full = SlotLinear.from_weight(fit.v_weight, D, Wv.shape[0], out_slots=fit.v_slots)
    o_full = SlotLinear.from_weight(fit.o_weight, Wo.shape[1], D, in_slots=fit.o_slots)
    Wv2, Wo2 = v_full.dense_weight().detach(), o_full.dense_weight().detach()
    hd, g = lay.head_dim, lay.group
    num = den = 0.0
    for h in range(lay.heads):
        j = h // g
        P = Wo[:, h * hd : (h + 1) * hd] @ Wv[j * hd : (j + 1) * hd]
        P2 = Wo2[:, h * hd : (h + 1) * hd] @ Wv2[j * hd : (j + 1) * hd]
        num += float(((P - P2) @ L).square().sum())
        den += float((P @ L).square().sum())
    return num / den


def test_keeping_every_value_dimension_reproduces_each_heads_value_output_map():
    lay = _layout()
    Wv, bv, Wo = _weights(lay)
    fit = vo_fit(Wv, bv, Wo, _gram(), lay, keep=lay.kv_heads * lay.head_dim, ridge=0.0)
    assert fit.rel_error == pytest.approx(0.0, abs=1e-12)
    assert _stacked_error(Wv, Wo, fit, lay, _gram()) < 1e-20
    # the bias goes through the same map: W_o,h b_v,g is kept
    v = SlotLinear.from_weight(fit.v_weight, D, Wv.shape[0], out_slots=fit.v_slots, bias=fit.v_bias)
    o = SlotLinear.from_weight(fit.o_weight, Wo.shape[1], D, in_slots=fit.o_slots)
    for h in range(lay.heads):
        j, hd = h // lay.group, lay.head_dim
        ref = Wo[:, h * hd : (h + 1) * hd] @ bv[j * hd : (j + 1) * hd]
        got = o.dense_weight()[:, h * hd : (h + 1) * hd] @ v.dense_bias()[j * hd : (j + 1) * hd]
        torch.testing.assert_close(got, ref)


def test_the_reported_error_is_the_whitened_tail_and_falls_with_the_kept_dimensions():
    lay = _layout()
    Wv, bv, Wo = _weights(lay)
    gram = _gram()
    errors = []
    for keep in range(1, lay.kv_heads * lay.head_dim + 1):
        fit = vo_fit(Wv, None, Wo, gram, lay, keep, ridge=0.0)
        assert len(fit.v_slots) == keep and sum(fit.kept) == keep
        assert len(fit.o_slots) == keep * lay.group
        assert fit.o_weight.shape == (D, keep * lay.group) and fit.v_weight.shape == (keep, D)
        direct = _stacked_error(Wv, Wo, fit, lay, gram)
        assert fit.rel_error == pytest.approx(direct, rel=1e-8, abs=1e-12)
        errors.append(fit.rel_error)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[0] > errors[-1] + 0.1


def test_the_svd_beats_keeping_value_rows_as_they_are():
    lay = _layout()
    Wv, _, Wo = _weights(lay)
    gram = _gram()
    keep = 6
    fit = vo_fit(Wv, None, Wo, gram, lay, keep, ridge=0.0)
    # the naive module: keep the first rows of each value head, the matching o columns unchanged
    r = keep // lay.kv_heads
    hd = lay.head_dim
    v_slots = torch.cat([j * hd + torch.arange(r) for j in range(lay.kv_heads)])
    o_slots = torch.cat([h * hd + torch.arange(r) for h in range(lay.heads)])
    naive = SimpleNamespace(
        v_weight=Wv[v_slots], v_slots=v_slots, o_weight=Wo[:, o_slots], o_slots=o_slots
    )
    assert fit.rel_error < _stacked_error(Wv, Wo, naive, lay, gram)


def test_gqa_components_go_to_the_key_value_head_that_matters():
    lay = _layout(heads=6, kv=2, hd=4, rotary=4)
    Wv, _, Wo = _weights(lay)
    Wv[lay.head_dim :] *= 1e-3  # value head 1 (read by query heads 3..5) carries almost nothing
    fit = vo_fit(Wv, None, Wo, _gram(), lay, keep=4, ridge=0.0)
    assert fit.kept == [4, 0]
    # the o columns kept are those of the query heads 0..2 (the readers of value head 0)
    assert sorted({int(s) // lay.head_dim for s in fit.o_slots}) == [0, 1, 2]


def test_qk_units_are_whole_rotary_pairs_shared_by_the_group():
    lay = _layout(heads=4, kv=2, hd=8, rotary=8)
    g = torch.Generator().manual_seed(3)
    Wq = torch.randn(lay.heads * lay.head_dim, D, generator=g, dtype=torch.float64)
    Wk = torch.randn(lay.kv_heads * lay.head_dim, D, generator=g, dtype=torch.float64)
    Wk[1 * 8 + 2] = 0.0  # pair (2, 6) of key head 1: no logit contribution
    Wk[1 * 8 + 6] = 0.0
    Wk[1] *= 1e-3  # dimension 1 of key head 0 is weak, its rotary partner 5 is not
    sel = qk_select(Wq, Wk, _gram(), lay, keep=12)
    assert sum(sel.kept) == 12
    half = lay.rotary // 2
    for j in range(lay.kv_heads):
        kept = {int(s) - j * 8 for s in sel.k_slots if int(s) // 8 == j}
        assert all((i in kept) == (i + half in kept) for i in range(half))  # pairs stay whole
        for h in range(j * lay.group, (j + 1) * lay.group):  # the group's query heads: same dims
            assert {int(s) - h * 8 for s in sel.q_slots if int(s) // 8 == h} == kept
    assert {10, 14}.isdisjoint({int(s) for s in sel.k_slots})  # the dead pair went first
    e = row_energy(Wq, _gram())
    assert sel.q_error == pytest.approx(1 - float(e[sel.q_slots].sum() / e.sum()))


def test_partial_rotary_leaves_the_other_dimensions_single():
    lay = _layout(heads=2, kv=2, hd=8, rotary=4)
    assert lay.units() == [(0, 2), (1, 3), (4,), (5,), (6,), (7,)]
    assert _layout(rotary=0, hd=3).units() == [(0,), (1,), (2,)]


def test_keeping_every_qk_dimension_keeps_every_row():
    lay = _layout()
    Wv, _, Wo = _weights(lay)
    Wq = torch.randn(lay.heads * lay.head_dim, D, dtype=torch.float64)
    sel = qk_select(Wq, Wv, _gram(), lay, keep=lay.kv_heads * lay.head_dim)
    assert sel.q_slots.tolist() == list(range(lay.heads * lay.head_dim))
    assert sel.k_slots.tolist() == list(range(lay.kv_heads * lay.head_dim))
    assert sel.q_error == pytest.approx(0.0, abs=1e-12)


def test_slot_linear_equals_its_dense_weight_and_refuses_bad_slots():
    torch.manual_seed(0)
    W, b = torch.randn(3, 5), torch.randn(3)
    out_slots, in_slots = torch.tensor([0, 4, 6]), torch.tensor([1, 2, 5, 7, 8])
    rows = SlotLinear.from_weight(W, 5, 8, out_slots=out_slots, bias=b)
    x = torch.randn(2, 5)
    y = rows(x)
    assert y.shape == (2, 8)
    torch.testing.assert_close(y, x @ rows.dense_weight().T + rows.dense_bias())
    assert (y[:, [1, 2, 3, 5, 7]] == 0).all()
    cols = SlotLinear.from_weight(W, 9, 3, in_slots=in_slots, bias=b)
    x9 = torch.randn(2, 9)
    torch.testing.assert_close(cols(x9), x9[:, in_slots] @ W.T + b)
    torch.testing.assert_close(cols(x9), x9 @ cols.dense_weight().T + b)
    assert sum(p.numel() for p in cols.parameters()) == 3 * 5 + 3
    with pytest.raises(ValueError, match="increasing"):
        SlotLinear.from_weight(W, 9, 3, in_slots=torch.tensor([1, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="increasing"):
        SlotLinear.from_weight(W, 4, 3, in_slots=in_slots)
