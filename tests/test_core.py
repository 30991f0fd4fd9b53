"""Foundation: adapters, LowRankLinear, full-rank exactness, save/load with both loaders, counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import factorlm
from conftest import ARCHS, EXPECTED_TARGETS, calib_ids, make_model
from factorlm.arch import (
    get_blocks,
    get_spec,
    linear_shape,
    linear_weight,
    model_targets,
    unfuse_experts,
)
from factorlm.arch.modules import count_params, set_submodule
from factorlm.methods import factorize
from factorlm.nn import LowRankLinear


def test_lowrank_linear_forward_and_counts():
    torch.manual_seed(0)
    A, B, b = torch.randn(6, 3), torch.randn(3, 5), torch.randn(6)
    mod = LowRankLinear.from_factors(A, B, bias=b)
    x = torch.randn(4, 5)
    assert torch.allclose(mod(x), x @ (A @ B).T + b, atol=1e-6)
    assert mod.rank == 3
    assert mod.num_parameters() == 3 * (6 + 5) + 6 == sum(p.numel() for p in mod.parameters())
    assert "rank=3" in repr(mod)
    half = LowRankLinear.from_factors(A, B, like=torch.zeros(1, dtype=torch.float16))
    assert half.A.weight.dtype == torch.float16 and half.B.weight.dtype == torch.float16


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_the_layers(arch):
    model = make_model(arch)
    spec = get_spec(model)
    unfuse_experts(model, spec)
    blocks = get_blocks(model, spec)
    targets = model_targets(model, spec)
    assert len(targets) == EXPECTED_TARGETS[arch] * len(blocks)
    for name in targets:
        rel = name.split(".", spec.blocks.count(".") + 2)[-1]
        assert spec.group_of(rel) != "other", name


def test_unknown_architecture_falls_back_with_warning(caplog):
    model = make_model("llama")
    model.config.model_type = "my-new-arch"
    with caplog.at_level("WARNING"):
        spec = get_spec(model)
    assert "falling back" in caplog.text and "llama" in caplog.text
    assert len(model_targets(model, spec)) == 7 * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_factorization_reproduces_logits(arch):
    model = make_model(arch)
    unfuse_experts(model)
    x = calib_ids(2, 16, seed=1)
    with torch.no_grad():
        ref = model(x).logits
        for name, mod in model_targets(model).items():
            W = linear_weight(mod).detach()
            A, B = factorize("svd", W.double(), None, min(W.shape))
            bias = getattr(mod, "bias", None)
            set_submodule(model, name, LowRankLinear.from_factors(A, B, bias=bias, like=W))
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_both_loaders_identical_logits(arch, tmp_path):
    model = make_model(arch)
    report = factorlm.compress(
        model,
        method="svd-llm",
        ratio=0.3,
        calibration=calib_ids(),
        n_samples=16,
        seqlen=32,
        progress=False,
    )
    x = calib_ids(2, 16, seed=2)
    with torch.no_grad():
        ref = model(x).logits
    out = factorlm.save(model, tmp_path / "m", report=report)
    m1 = factorlm.load(out)
    m2 = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(m1(x).logits, ref)
        assert torch.equal(m2(x).logits, ref)
    assert count_params(m1) == count_params(model) == report.params_total_after


@pytest.mark.parametrize("arch", ["llama", "phi", "mixtral", "gpt2"])
def test_parameter_counts_match_ranks(arch):
    model = make_model(arch)
    unfuse_experts(model)
    shapes = {n: linear_shape(m) for n, m in model_targets(model).items()}
    biases = {
        n: (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
        for n, m in model_targets(model).items()
    }
    total_before = count_params(model)
    report = factorlm.compress(
        model,
        method="svd",
        ratio=0.4,
        calibration=calib_ids(),
        n_samples=16,
        seqlen=32,
        progress=False,
    )
    expected_after = 0
    for rec in report.modules:
        m, n = shapes[rec.name]
        expected_after += (rec.rank * (m + n) if rec.kind == "lowrank" else m * n) + biases[
            rec.name
        ]
        if rec.kind == "lowrank":
            assert isinstance(model.get_submodule(rec.name), LowRankLinear)
            assert model.get_submodule(rec.name).rank == rec.rank
    assert report.params_targeted_after == expected_after
    assert report.params_targeted_before == sum(m * n for m, n in shapes.values()) + sum(
        biases.values()
    )
    assert report.params_total_before - report.params_total_after == total_before - count_params(
        model
    )
    assert report.achieved_ratio >= 0.4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_densify_gives_plain_model_with_same_logits(arch, tmp_path):
    model = make_model(arch)
    factorlm.compress(
        model,
        method="svd-llm",
        ratio=0.3,
        calibration=calib_ids(),
        n_samples=16,
        seqlen=32,
        progress=False,
    )
    dense = factorlm.densify(model)
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert type(dense) is type(model)
    x = calib_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(dense(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)
    dense.save_pretrained(tmp_path / "d")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_sequential_and_original_outputs_differ_but_both_work():
    ids = calib_ids()
    seq, orig = make_model("llama"), make_model("llama")
    r1 = factorlm.compress(
        seq, method="svd-llm", ratio=0.4, calibration=ids, n_samples=16, seqlen=32, progress=False
    )
    r2 = factorlm.compress(
        orig,
        method="svd-llm",
        ratio=0.4,
        calibration=ids,
        n_samples=16,
        seqlen=32,
        progress=False,
        sequential=False,
    )
    assert r1.ranks == r2.ranks
    w1 = seq.model.layers[1].self_attn.q_proj.A.weight
    w2 = orig.model.layers[1].self_attn.q_proj.A.weight
    assert not torch.allclose(w1, w2)  # block 1 saw different inputs
    assert all(b.rel_output_error is not None and b.rel_output_error > 0 for b in r1.blocks)


@pytest.mark.parametrize("arch", ["phi3", "llama", "gpt2", "mixtral", "opt"])
def test_densify_pruned_mlp_same_logits(arch):
    model = make_model(arch)
    factorlm.compress(
        model,
        method="lorap",
        ratio=0.3,
        calibration=calib_ids(),
        n_samples=16,
        seqlen=32,
        progress=False,
    )
    dense = factorlm.densify(model)
    x = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(dense(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_token_ids_outside_vocabulary_are_refused():
    model = make_model("llama")
    bad = calib_ids() + 1000
    with pytest.raises(factorlm.CalibrationError, match="vocabulary"):
        factorlm.compress(
            model, method="svd", ratio=0.3, calibration=bad, n_samples=16, seqlen=32, progress=False
        )


def test_nan_activation_error_names_the_full_layer():
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight.fill_(
            3e38
        )  # finite weight, overflowing activations
    with pytest.raises(factorlm.NumericalError, match=r"model\.layers\.1\.self_attn\.q_proj"):
        factorlm.compress(
            model,
            method="svd-llm",
            ratio=0.3,
            calibration=calib_ids(),
            n_samples=16,
            seqlen=32,
            progress=False,
        )


def test_bf16_calibration_passes_close_to_fp32():
    ids = calib_ids()
    a, b = make_model("llama"), make_model("llama")
    ra = factorlm.compress(
        a, method="svd-llm", ratio=0.3, calibration=ids, n_samples=16, seqlen=32, progress=False
    )
    rb = factorlm.compress(
        b,
        method="svd-llm",
        ratio=0.3,
        calibration=ids,
        n_samples=16,
        seqlen=32,
        progress=False,
        calib_dtype="bfloat16",
    )
    assert ra.ranks == rb.ranks and rb.calibration["autocast"] == "bfloat16"
    ea = sum(m.rel_error for m in ra.modules)
    eb = sum(m.rel_error for m in rb.modules)
    assert eb == pytest.approx(ea, rel=0.1)  # the statistics barely move
    wa = a.model.layers[0].self_attn.o_proj.A.weight  # its input is a bf16 matmul output
    wb = b.model.layers[0].self_attn.o_proj.A.weight
    assert not torch.equal(wa, wb)  # but they did come from bf16 activations
    with pytest.raises(factorlm.ConfigError, match="calib_dtype"):
        factorlm.compress(
            make_model("llama"),
            method="svd",
            ratio=0.3,
            calibration=ids,
            n_samples=16,
            seqlen=32,
            calib_dtype="int8",
        )


def test_report_peak_rss_is_measured_during_compression(monkeypatch):
    """report.peak_rss_bytes is the highest resident size sampled *during* the call: not the
    process's lifetime peak (ru_maxrss), not only the sizes at its start and end."""
    import threading

    from factorlm import utils
    from factorlm.calibration import pipeline

    GiB = 2**30
    rss = {"now": 1 * GiB, "reads": 0}
    read = threading.Condition()

    def fake_rss() -> int:
        with read:
            rss["reads"] += 1
            read.notify_all()
            return rss["now"]

    monkeypatch.setattr(utils, "current_rss_bytes", fake_rss)
    monkeypatch.setattr(utils, "peak_rss_bytes", lambda: 100 * GiB)  # an earlier, larger peak
    run_block = pipeline.run_block

    def spike_once(*args, **kwargs):
        if rss["now"] == 1 * GiB:  # the first block forward: 3 GiB until the sampler saw it
            with read:
                rss["now"], seen = 3 * GiB, rss["reads"]
                read.wait_for(lambda: rss["reads"] >= seen + 2, timeout=10)
                rss["now"] = 2 * GiB
        return run_block(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_block", spike_once)
    report = factorlm.compress(
        make_model("llama"),
        method="svd",
        ratio=0.3,
        calibration=calib_ids(),
        n_samples=16,
        seqlen=32,
        progress=False,
    )
    assert rss["now"] == 2 * GiB  # the spike happened, and ended
    assert report.peak_rss_bytes == 3 * GiB


def test_compress_warns_when_the_compressed_model_would_decode_slower(caplog):
    """Tiny matrices save fewer weights than a kernel launch costs: compress says so."""
    model = make_model("llama")
    with caplog.at_level("WARNING", logger="factorlm.api"):
        report = factorlm.compress(
            model,
            method="svd",
            ratio=0.3,
            calibration=calib_ids(),
            n_samples=8,
            seqlen=32,
            progress=False,
        )
    slow = [w for w in report.warnings if "decode at" in w]
    assert (
        len(slow) == 1 and "slower than dense" in slow[0] and "save less than a kernel" in slow[0]
    )
    assert "decode at" in caplog.text
