"""Low-Rank Feature Distillation (method="distill"): loss, training, locality, resume, options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import factorlm
from conftest import _ATTN, VOCAB, calib_ids, make_model
from factorlm.arch import get_blocks, get_spec
from factorlm.errors import ConfigError
from factorlm.methods.distill import (
    BLOCK_INIT_NAMES,
    BLOCK_INITS,
    DistillCompressor,
    default_balance,
    default_lr,
    holdout_count,
    resolve_init,
)
from factorlm.methods.distill_loss import cosine, feature_loss, token_loss
from factorlm.nn import LowRankLinear

KW = dict(calibration=calib_ids(), n_samples=16, seqlen=32, batch_size=4, progress=False)
LOG_SIG_1 = -F.logsigmoid(torch.tensor(1.0))


def _distill(model, ratio=0.3, **opts):
    opts.setdefault("init", "svd")  # far from the optimum: training has much to do (lr 3e-3 tests)
    return factorlm.compress(model, method="distill", ratio=ratio, **KW, **opts)


# --- the pure loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_of_identical_outputs_is_exactly_minus_log_sigmoid_1(dtype):
    a = 3 * torch.randn(4, 32, 48, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref = -F.logsigmoid(torch.tensor(1.0, dtype=dtype))
    assert torch.equal(cosine(a, a.clone()), torch.ones(4, 32, dtype=dtype))
    assert (token_loss(a, a.clone()) == ref).all()
    assert feature_loss(a, a.clone()) == ref
    assert feature_loss(a, a.clone(), mask=torch.ones(4, 32)) == ref


def test_loss_hand_computed():
    # token 0: a=(1,0), y=(0,1): mean|a-y| = 1, cos = 0   -> 1 + log 2
    # token 1: a=(2,0), y=(1,0): mean|a-y| = .5, cos = 1  -> .5 + log(1 + e^-1)
    # token 2: a=(0,0), y=(1,1): mean|a-y| = 1, cos := 0 -> 1 + log 2
    a = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    y = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    t = [1 + math.log(2), 0.5 + math.log(1 + math.exp(-1)), 1 + math.log(2)]
    torch.testing.assert_close(token_loss(a, y), torch.tensor([t], dtype=torch.float64))
    torch.testing.assert_close(feature_loss(a, y).item(), sum(t) / 3)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(feature_loss(a, y, mask).item(), (t[0] + t[1]) / 2)
    # opposite directions: cos = -1
    torch.testing.assert_close(
        token_loss(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])).item(),
        1.0 + math.log(1 + math.e),
    )
    # gradients exist and are finite even for a zero student output
    a0 = torch.zeros(1, 2, 4, requires_grad=True)
    feature_loss(a0, torch.randn(1, 2, 4)).backward()
    assert torch.isfinite(a0.grad).all()
    with pytest.raises(ValueError):
        token_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_default_lr_depends_on_the_init():
    assert default_lr("svd") == 1e-3 and default_lr("svd-llm") == 3e-4
    assert default_lr("lorap") == 3e-3
    assert default_lr("modular") == 3e-4
    assert default_balance("lorap") and not default_balance("svd-llm")


def test_holdout_count():
    assert holdout_count(4, 0.1) == 1
    assert holdout_count(20, 0.1) == 2
    assert holdout_count(8, 3) == 3
    assert holdout_count(4, 10) == 3  # always leaves one batch to train on
    assert holdout_count(1, 0.1) == 0
    assert holdout_count(4, 0) == 0 and holdout_count(4, 0.0) == 0


# --- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mixtral", "mamba", "phi"])
def test_distillation_lowers_heldout_block_loss(arch):
    model = make_model(arch)
    report = _distill(model, steps=12, lr=3e-3)
    blocks = get_blocks(model, get_spec(model))
    assert len(report.blocks) == len(blocks)
    for rec in report.blocks:
        assert rec.loss_before is not None and rec.loss_after is not None
        assert math.isfinite(rec.loss_before) and rec.loss_after >= LOG_SIG_1.item()
        assert rec.loss_after < rec.loss_before - 1e-4, (arch, rec)
    assert report.achieved_ratio >= 0.3
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert lowrank and all(not p.requires_grad for m in lowrank for p in m.parameters())
    if arch == "phi":  # biases of factorized layers are kept (and trained)
        assert all(m.bias is not None for m in lowrank)
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids(2, 16, seed=3)).logits).all()


def test_training_changes_the_init_and_records_errors():
    ref = make_model("llama")
    _distill(ref, init="svd-llm", steps=0)  # the init alone
    model = make_model("llama")
    report = _distill(model, init="svd-llm", steps=5, lr=1e-3)
    a = dict(ref.named_parameters())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, a[n])]
    assert changed and all(n.endswith((".A.weight", ".B.weight")) for n in changed)
    lr_mods = [m for m in report.modules if m.kind == "lowrank"]
    assert all(m.rel_error is not None for m in lr_mods)
    assert all(any("before distillation" in n for n in m.notes) for m in lr_mods)


def test_gradients_stay_local(monkeypatch):
    """No parameter outside the current block's low-rank factors (+ its norms with train_norms)
    ever receives a gradient; embeddings, lm_head, other norms and routers are unchanged."""
    model = make_model("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got: list[tuple[int, str]] = []
    orig = DistillCompressor.compress_block

    def spy(self, ctx):
        hooks = []
        for n, p in model.named_parameters():
            if p.requires_grad:
                hooks.append(
                    p.register_post_accumulate_grad_hook(
                        lambda _p, n=n, i=ctx.index: got.append((i, n))
                    )
                )
        try:
            orig(self, ctx)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(DistillCompressor, "compress_block", spy)
    _distill(model, steps=3, lr=1e-3, train_norms=True)
    assert got, "the norms of the current block should have received gradients"
    for i, n in got:  # only the norms of the block being trained
        assert n.startswith(f"model.layers.{i}.") and "norm" in n, (i, n)
    for n, p in model.named_parameters():
        assert p.grad is None, n
        if n in before and not any(k in n for k in ("norm", "experts", "self_attn")):
            assert torch.equal(p, before[n]), n  # embeddings, lm_head, routers
    assert not any(torch.equal(model.get_parameter(n), before[n]) for _, n in got)
    # without train_norms the norms are untouched too
    model = make_model("mixtral")
    _distill(model, steps=3, lr=1e-3)
    for n, p in model.named_parameters():
        assert p.grad is None, n
        if "norm" in n or "embed" in n or "lm_head" in n or "mlp.gate" in n:
            assert torch.equal(p, before[n]), n


# --- checkpoint / resume ---------------------------------------------------------------------------


def _three_blocks(arch: str) -> torch.nn.Module:
    torch.manual_seed(1)
    if arch == "mamba":
        config = tf.MambaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, state_size=4, expand=2
        )
    else:
        config = tf.LlamaConfig(vocab_size=VOCAB, **{**_ATTN, "num_hidden_layers": 3})
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "mamba"])
def test_resume_after_interruption_gives_identical_weights(arch, tmp_path, monkeypatch):
    base = _three_blocks(arch)
    opts = dict(steps=4, lr=1e-3, shuffle=True, micro_batch=2, init="svd-llm")
    ref_model = _three_blocks(arch)
    ref = _distill(ref_model, **opts)

    orig = DistillCompressor.compress_block

    def interrupted(self, ctx):
        if ctx.index == 2:
            raise KeyboardInterrupt("simulated interruption after block 1")
        orig(self, ctx)

    monkeypatch.setattr(DistillCompressor, "compress_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _distill(base, workdir=str(tmp_path), **opts)
    monkeypatch.setattr(DistillCompressor, "compress_block", orig)

    fresh = _three_blocks(arch)
    resumed = _distill(fresh, workdir=str(tmp_path), resume=True, **opts)
    a, b = ref_model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [(r.loss_before, r.loss_after) for r in resumed.blocks] == [
        (r.loss_before, r.loss_after) for r in ref.blocks
    ]


# --- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "allocation,opts",
    [("bottom-first", {"min_rank": 8}), ("global", {"init": "svd-llm"}), ("uniform", {})],
)
def test_rank_allocations(allocation, opts):
    model = make_model("llama")
    report = _distill(model, ratio=0.25, allocation=allocation, steps=2, **opts)
    assert report.achieved_ratio >= 0.25 - 1e-9
    assert all(r.loss_after is not None for r in report.blocks if r.loss_before is not None)
    if allocation == "bottom-first":
        assert all(r >= 8 for r in report.ranks.values())


@pytest.mark.parametrize("terms", ["teacher", "student"])
def test_single_loss_terms_and_init_options(terms):
    model = make_model("llama")
    report = _distill(model, loss_terms=terms, init="asvd", alpha=0.5, steps=6, lr=3e-3, holdout=1)
    assert all(r.loss_after < r.loss_before for r in report.blocks)


def test_no_holdout_warns_and_bf16_trains_through_fp32_masters():
    model = make_model("llama").to(torch.bfloat16)
    report = _distill(model, steps=6, lr=3e-3, holdout=0)
    assert any("no held-out" in w for w in report.warnings)
    assert all(r.loss_after < r.loss_before for r in report.blocks)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize(
    "opts",
    [
        {"lr": 0},
        {"lr": "fast"},
        {"betas": (0.9,)},
        {"epochs": -1},
        {"e2e_epochs": -1},
        {"e2e_epochs": 1.5},
        {"e2e_lr": 0},
        {"e2e_micro_batch": 0},
        {"holdout": 1.5},
        {"loss_terms": "both"},
        {"train_norms": "yes"},
        {"init": "distill"},
        {"micro_batch": 0},
        {"init": "svd", "alpha": 0.5},  # an asvd option with an svd init
        {"nonsense": 1},
    ],
)
def test_bad_options_are_config_errors(opts):
    with pytest.raises(ConfigError):
        _distill(make_model("llama"), **opts)


def test_lorap_init_trains_the_pruned_mlp_and_the_attention_factors(tmp_path):
    ref = make_model("llama")
    factorlm.compress(ref, method="lorap", ratio=0.3, **KW)  # the init alone
    model = make_model("llama")
    report = _distill(model, init="lorap", steps=12, lr=3e-3, keep_least=0.0, micro_batch=4)
    assert report.achieved_ratio >= 0.3
    a = dict(ref.named_parameters())
    assert set(a) == {n for n, _ in model.named_parameters()}  # same structure as lorap's
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, a[n])}
    mlp = {n for n in changed if ".mlp." in n}
    attn = {n for n in changed if ".self_attn." in n}
    assert mlp and attn and changed == mlp | attn, changed  # norms, embeddings untouched
    assert all(n.endswith((".A.weight", ".B.weight")) for n in attn)
    for rec in report.blocks:
        assert rec.loss_after < rec.loss_before - 1e-4, rec
    factorlm.save(model, tmp_path / "out")  # the trained pruned + factorized model round-trips
    ids = calib_ids(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, factorlm.load(tmp_path / "out")(ids).logits)
    with pytest.raises(ConfigError, match="init"):
        _distill(make_model("llama"), init="distill")


def test_balance_rescales_factors_without_changing_the_init():
    plain, balanced = make_model("llama"), make_model("llama")
    _distill(plain, init="svd-llm", steps=0)  # balance=False is the default
    _distill(balanced, init="svd-llm", steps=0, balance=True)
    pairs = [
        (m, dict(balanced.named_modules())[n])
        for n, m in plain.named_modules()
        if isinstance(m, LowRankLinear)
    ]
    assert pairs
    for p, b in pairs:
        assert torch.allclose(b.dense_weight(), p.dense_weight(), rtol=1e-4, atol=1e-6)
        rms_a = b.A.weight.norm(dim=0) / b.A.weight.shape[0] ** 0.5
        rms_b = b.B.weight.norm(dim=1) / b.B.weight.shape[1] ** 0.5
        assert torch.allclose(rms_a, rms_b, rtol=1e-4)
    assert any(not torch.equal(p.A.weight, b.A.weight) for p, b in pairs)


def test_default_init_is_lorap_unless_ranks_come_from_elsewhere():
    assert set(BLOCK_INITS) == set(BLOCK_INIT_NAMES)
    assert resolve_init(None, "uniform", None, {}) == "lorap"
    assert resolve_init(None, "global", None, {}) == "svd-llm"
    assert resolve_init(None, "uniform", 8, {}) == "svd-llm"  # a fixed rank
    assert resolve_init(None, "uniform", None, {"min_rank": 8}) == "svd-llm"
    assert resolve_init("svd", "uniform", None, {}) == "svd"
    kinds = {}
    for allocation in ("uniform", "global"):
        model = make_model("llama")
        report = factorlm.compress(
            model, method="distill", ratio=0.25, allocation=allocation, steps=1, **KW
        )
        kinds[allocation] = {m.kind for m in report.modules}
        assert report.options["init"] == resolve_init(None, allocation, None, {})
    assert "pruned" in kinds["uniform"] and "lowrank" in kinds["uniform"]  # LoRAP's block
    assert "pruned" not in kinds["global"]


def test_a_block_that_training_made_worse_keeps_its_init():
    kw = dict(init="svd-llm", steps=3, lr=0.5, holdout=1)  # far too high: training diverges
    raw = _distill(make_model("llama"), keep_best=False, **kw)
    assert any(b.loss_after > b.loss_before for b in raw.blocks)
    report = _distill(make_model("llama"), **kw)
    assert all(b.loss_after <= b.loss_before for b in report.blocks)
    kept = [w for w in report.warnings if "the init's weights were kept" in w]
    assert kept and len(kept) == sum(b.loss_after == b.loss_before for b in report.blocks)
    # a kept block holds the init's very weights: those of a run that trains 0 steps (block 0
    # and every block after a run of kept ones see the same inputs in both runs)
    model, untrained = make_model("llama"), make_model("llama")
    report = _distill(model, **kw)
    _distill(untrained, **{**kw, "steps": 0})
    assert report.blocks[0].loss_after == report.blocks[0].loss_before
    ours, init = get_blocks(model, get_spec(model)), get_blocks(untrained, get_spec(untrained))
    for rec, a, b in zip(report.blocks, ours, init, strict=True):
        if rec.loss_after != rec.loss_before:
            break
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), f"block {rec.index} {name}"
