"""Pure math of the training-free methods, on hand-made matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factorlm.calibration.stats import LayerStats, StatsCollector, accumulate
from factorlm.errors import ConfigError, NumericalError
from factorlm.methods import factorize, get_method
from factorlm.methods.linalg import balance_factors, output_error, whitening

ALL = frozenset({"gram", "abs", "sq", "absmax"})


def make_case(m=24, n=16, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    # anisotropic, correlated inputs: what makes activation-aware methods matter
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(
        -1.5, 0.5, n, dtype=torch.float64
    )
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    st = LayerStats()
    accumulate(st, X, ALL, gram_dtype=torch.float64)
    st.fisher_rows = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    return W, X, st


@pytest.mark.parametrize("method", ["svd", "fwsvd", "asvd", "svd-llm", "nsvd"])
def test_full_rank_reproduces_w(method):
    W, _, st = make_case()
    A, B = factorize(method, W, st, min(W.shape))
    torch.testing.assert_close(A @ B, W, atol=1e-8, rtol=1e-8)


def test_svd_error_is_tail_singular_values():
    W, _, _ = make_case()
    S = torch.linalg.svdvals(W)
    for r in (1, 5, 11):
        A, B = factorize("svd", W, None, r)
        assert float((W - A @ B).square().sum()) == pytest.approx(
            float(S[r:].square().sum()), rel=1e-9
        )


@pytest.mark.parametrize("seed", range(5))
def test_calibration_error_ordering(seed):
    W, X, st = make_case(seed=seed)
    G = st.gram_mean
    errs = {
        m: output_error(W, (lambda ab: ab[0] @ ab[1])(factorize(m, W, st, 6)), G)
        for m in ("svd", "asvd", "svd-llm")
    }
    assert errs["svd-llm"] <= errs["asvd"] + 1e-12
    assert errs["svd-llm"] <= errs["svd"] + 1e-12


def test_asvd_usually_beats_svd():
    wins = 0
    for seed in range(10):
        W, _, st = make_case(seed=seed)
        e = {
            m: output_error(W, torch.matmul(*factorize(m, W, st, 6)), st.gram_mean)
            for m in ("svd", "asvd")
        }
        wins += e["asvd"] <= e["svd"]
    assert wins >= 7


def test_svdllm_error_is_exactly_the_whitened_tail():
    W, X, st = make_case()
    L = torch.linalg.cholesky(st.gram_mean)
    S = torch.linalg.svdvals(W @ L)
    for r in (2, 7):
        A, B = factorize("svd-llm", W, st, r)
        err = float(((W - A @ B) @ X.T).square().sum()) / st.n_tokens
        assert err == pytest.approx(float(S[r:].square().sum()), rel=1e-7)


def test_svdllm_is_optimal_against_other_rank_r_choices():
    W, X, st = make_case()
    A, B = factorize("svd-llm", W, st, 5)
    best = output_error(W, A @ B, st.gram_mean)
    for m in ("svd", "asvd", "fwsvd", "nsvd"):
        A2, B2 = factorize(m, W, st, 5)
        assert best <= output_error(W, A2 @ B2, st.gram_mean) + 1e-12


def test_nsvd_k1_share_one_equals_svdllm():
    W, _, st = make_case()
    A1, B1 = factorize("svd-llm", W, st, 6)
    A2, B2 = factorize("nsvd", W, st, 6, k1_share=1.0)
    torch.testing.assert_close(A1 @ B1, A2 @ B2, atol=1e-10, rtol=1e-10)


def test_nsvd_second_stage_reduces_weight_error():
    W, _, st = make_case()
    A1, B1 = factorize("svd-llm", W, st, 10)
    A2, B2 = factorize("nsvd", W, st, 10, k1_share=0.8)
    assert A2.shape == (24, 10) and B2.shape == (10, 16)
    # the residual stage is plain SVD of the weight: nested result is closer to W in Frobenius norm
    assert float((W - A2 @ B2).norm()) < float((W - A1 @ B1).norm())


def test_nsvd_variant_two_uses_eigen_whitening():
    W, _, st = make_case()
    A, B = factorize("nsvd", W, st, 16, variant="II", k1_share=1.0)
    torch.testing.assert_close(A @ B, W, atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="variant"):
        factorize("nsvd", W, st, 4, variant="III")


def test_fwsvd_row_weights_matter():
    W, _, st = make_case()
    st.fisher_rows = torch.ones(24, dtype=torch.float64)
    st.fisher_rows[0] = 1e6  # row 0 is very important: it must be reconstructed almost exactly
    A, B = factorize("fwsvd", W, st, 3)
    A0, B0 = factorize("svd", W, None, 3)
    assert float((W - A @ B)[0].norm()) < 0.1 * float((W - A0 @ B0)[0].norm())


def test_stats_two_batches_equal_one_concatenated_batch():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(3, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)
    lin = nn.Linear(5, 4)
    with StatsCollector({"l": lin}, ALL) as col:
        lin(x1)
        col.new_batch()
        lin(x2)
    with StatsCollector({"l": lin}, ALL) as one:
        lin(torch.cat([x1, x2]))
    a, b = col.stats["l"], one.stats["l"]
    assert a.n_tokens == b.n_tokens == 35
    for k in ("gram", "abs_sum", "sq_sum", "abs_max"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), atol=1e-5, rtol=1e-6)
    assert not lin._forward_pre_hooks  # hooks always removed


def test_statistics_are_exact_inside_the_calibrations_bf16_autocast():
    """calib_dtype=bfloat16 runs the passes (and so the hooks) under autocast: the Gram's own
    matmul must not be rounded to bf16 (it was: SmolLM2's down_proj Grams lost positive
    definiteness and modular at 40 % went from 59 to 594 wiki perplexity)."""
    lin = nn.Linear(64, 8)
    x = torch.randn(4, 50, 64) + 3.0  # a mean offset: bf16 rounding of x^T x shows clearly
    with StatsCollector({"l": lin}, {"gram"}) as ref:
        lin(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), StatsCollector({"l": lin}, {"gram"}) as ac:
        lin(x)
    torch.testing.assert_close(ac.stats["l"].gram, ref.stats["l"].gram, rtol=1e-6, atol=1e-6)


def test_shared_inputs_share_one_accumulator_and_hooks_removed_on_error():
    q, k = nn.Linear(5, 4), nn.Linear(5, 2)
    x = torch.randn(2, 3, 5)
    with StatsCollector({"q": q, "k": k}, {"gram"}) as col:
        q(x)
        k(x)
    assert col.stats["q"] is col.stats["k"] and col.stats["q"].n_tokens == 6
    with pytest.raises(NumericalError, match="q"):
        with StatsCollector({"q": q}, {"gram"}):
            q(torch.full((1, 5), float("nan")))
    assert not q._forward_pre_hooks


def test_rank_deficient_gram_is_handled_and_reported():
    W, X, _ = make_case(n=16, tokens=8)  # fewer tokens than channels: G singular
    X[:, 3] = 0  # a dead input channel
    st = LayerStats()
    accumulate(st, X, ALL, gram_dtype=torch.float64)
    dec = get_method("svd-llm").decompose(W, st, whiten="cholesky")
    assert any("shift" in n for n in dec.notes)
    A, B = dec.factors(4)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    wh = whitening(st.gram_mean, kind="eig")
    assert wh.notes and torch.isfinite(wh.L).all()


def test_nan_weight_is_a_clear_error():
    W, _, st = make_case()
    W[2, 3] = float("nan")
    for m in ("svd", "svd-llm", "asvd"):
        with pytest.raises(NumericalError, match="NaN"):
            factorize(m, W, st, 4)


def test_rank_outside_range_is_rejected():
    W, _, st = make_case()
    with pytest.raises(ConfigError, match="rank"):
        factorize("svd", W, st, 17)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
def test_thin_svd_matches_lapack(shape):
    from factorlm.methods.linalg import ThinSVD

    g = torch.Generator().manual_seed(0)
    M = torch.randn(*shape, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    svd = ThinSVD(M)
    assert torch.allclose(svd.S, S, rtol=1e-10, atol=1e-12)
    for r in (1, 7, min(shape)):
        Ur, Sr, Vhr = svd.top(r)
        assert torch.allclose(
            Ur @ torch.diag(Sr) @ Vhr, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], atol=1e-10
        )
        assert torch.allclose(Ur.T @ Ur, torch.eye(r, dtype=torch.float64), atol=1e-10)
    assert svd._exact is None  # well conditioned: the Gram route served every rank


def test_thin_svd_falls_back_to_exact_svd_for_tiny_singular_values():
    from factorlm.methods.linalg import ThinSVD, split_factors

    g = torch.Generator().manual_seed(1)
    Q1, _ = torch.linalg.qr(torch.randn(30, 20, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    S = torch.logspace(0, -10, 20, dtype=torch.float64)
    M = Q1 @ torch.diag(S) @ Q2.T
    svd = ThinSVD(M)
    A, B = split_factors(svd, 20)
    assert svd._exact is not None  # singular values down to 1e-10 need LAPACK's SVD
    assert float((A @ B - M).abs().max()) < 1e-13
    A5, B5 = split_factors(svd, 5)
    err = float(torch.linalg.matrix_norm(M - A5 @ B5) ** 2)
    assert err == pytest.approx(float((S[5:] ** 2).sum()), rel=1e-8)


def test_fisher_rows_are_the_per_sequence_squared_gradients():
    from conftest import calib_ids, make_model
    from factorlm.arch.modules import get_spec, model_targets
    from factorlm.calibration.fisher import fisher_row_sums

    model = make_model("llama")
    ids = calib_ids(n=3, seqlen=16)
    targets = model_targets(model, get_spec(model))
    got = fisher_row_sums(model, targets, [ids[:2], ids[2:]], max_batches=1, progress=False)
    name = "model.layers.1.mlp.down_proj"
    w = targets[name].weight
    expected = torch.zeros(w.shape[0], dtype=torch.float64)
    for s in ids[:2]:  # only the sequences of the first batch (max_batches=1)
        loss = model(input_ids=s[None], labels=s[None]).loss
        (g,) = torch.autograd.grad(loss, [w])
        expected += g.double().square().sum(1)
    assert torch.allclose(got[name], expected, rtol=1e-5)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_balance_factors_keeps_the_product_and_equalizes_entry_sizes(dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 6, generator=g, dtype=torch.float64) * 0.01
    B = torch.randn(6, 24, generator=g, dtype=torch.float64) * torch.logspace(-1, 2, 6)[:, None]
    A[:, 3] = 0  # a dead component stays as it is
    A, B = A.to(dtype), B.to(dtype)
    A2, B2 = balance_factors(A, B)
    assert A2.dtype == dtype and B2.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    prod, prod2 = (A @ B).double(), (A2 @ B2).double()
    assert (prod2 - prod).norm() <= tol * prod.norm()
    rms_a = A2.double().norm(dim=0) / 40**0.5
    rms_b = B2.double().norm(dim=1) / 24**0.5
    live = torch.arange(6) != 3
    assert torch.allclose(rms_a[live], rms_b[live], rtol=1e-5)
    assert torch.equal(B2[3], B[3]) and torch.equal(A2[:, 3], A[:, 3])
    # before: entry sizes up to 1e4 apart
    assert (B.double().norm(dim=1) / 24**0.5 / (A.double().norm(dim=0) / 40**0.5))[live].max() > 100
