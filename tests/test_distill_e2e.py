"""distill's end-to-end stage (``e2e_epochs``): the KL, the teacher it reads, training, keep_best,
epochs=0, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import factorlm
from conftest import ARCHS, calib_ids, make_model
from factorlm.arch import get_blocks, get_spec
from factorlm.calibration.pipeline import capture_block_inputs
from factorlm.methods import distill_e2e
from factorlm.methods.distill_e2e import kl_per_token

KW = dict(calibration=calib_ids(), n_samples=16, seqlen=32, batch_size=4, progress=False)
BASE = dict(init="svd-llm", steps=2, lr=1e-3, holdout=1)


def _distill(model, ratio=0.4, **opts):
    return factorlm.compress(model, method="distill", ratio=ratio, **KW, **{**BASE, **opts})


def test_kl_per_token_hand_computed():
    t = torch.tensor([[[0.0, 1.0, 2.0]]])
    s = torch.tensor([[[1.0, 0.0, 0.0]]])
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    want = float((p * (p.log() - q.log())).sum())
    got = kl_per_token(s, t)
    assert got.shape == (1, 1)
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(kl_per_token(t, t)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_per_token(t + 5.0, t)) == pytest.approx(0.0, abs=1e-6)  # logits' shift
    assert float(kl_per_token(t, s)) != pytest.approx(want, rel=1e-3)  # not symmetric


@pytest.mark.parametrize("init", ["svd-llm", "modular"])
def test_the_teacher_is_the_dense_models_last_block_output(init, monkeypatch):
    dense = make_model("llama")
    spec = get_spec(dense)
    streams = capture_block_inputs(dense, spec, list(calib_ids().split(4)), "cpu")
    want = []
    with torch.no_grad():
        for h, kw in zip(streams.student, streams.kwargs, strict=True):
            for block in get_blocks(dense, spec):
                h = block(h, **kw)
                h = h[0] if isinstance(h, tuple) else h
            want.append(h)
    seen = {}

    def capture(model, spec, inputs, teacher, opts, device, offload="cpu", token_ids=None):
        seen.update(teacher=teacher, inputs=inputs, opts=opts, ids=token_ids)
        return {"loss_before": 1.0, "loss_after": 1.0, "kept_init": False}

    monkeypatch.setattr(distill_e2e, "refine_end_to_end", capture)
    report = _distill(make_model("llama"), init=init, e2e_epochs=2, e2e_micro_batch=2)
    assert len(seen["teacher"]) == len(want) == 4
    for a, b in zip(seen["teacher"], want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the stage starts from the first block's inputs of the same batches
    torch.testing.assert_close(seen["inputs"].student[0], streams.student[0])
    # and the token ids of those batches, for the held-out cross-entropy
    assert [torch.equal(a, b) for a, b in zip(seen["ids"], calib_ids().split(4), strict=True)] == [
        True
    ] * 4
    assert (seen["opts"].epochs, seen["opts"].micro_batch, seen["opts"].holdout) == (2, 2, 1)
    assert report.end_to_end["loss_before"] == 1.0


def test_an_init_with_its_own_passes_gets_no_pipeline_statistics(monkeypatch):
    """modular runs the block's calibration passes itself: the pipeline's statistics pass (the
    dense block on every batch, for distill's per-matrix errors only) is not run for it."""
    from factorlm.methods.distill import DistillCompressor

    seen = []
    orig = DistillCompressor.compress_block

    def spy(self, ctx):
        seen.append((ctx.stats, len(ctx.dense_outputs), ctx.teacher_outputs))
        orig(self, ctx)

    monkeypatch.setattr(DistillCompressor, "compress_block", spy)
    report = _distill(make_model("llama"), init="modular", ratio=0.3)
    assert [s for s, _, _ in seen] == [{}, {}]
    assert [n for _, n, _ in seen] == [1, 1]  # the first batch's, for the block's error
    assert all(t is None for _, _, t in seen)  # the teacher's outputs come from distill itself
    assert all(b.loss_after is not None for b in report.blocks)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_the_stage_lowers_the_heldout_kl_and_trains_every_block(arch):
    blocks_only = make_model(arch)
    _distill(blocks_only, init="svd")  # far from the optimum: the stage has much to correct
    model = make_model(arch)
    report = _distill(model, init="svd", e2e_epochs=3, e2e_lr=1e-3)
    rec = report.end_to_end
    assert rec["steps"] == 3 * 12  # 3 training batches of 4 sequences, micro-batch 1
    assert rec["loss_after"] < rec["loss_before"] and not rec["kept_init"]
    assert any(
        line.startswith("end-to-end refinement: held-out KL") for line in report.summary_lines()
    )
    spec = get_spec(model)
    for a, b in zip(get_blocks(model, spec), get_blocks(blocks_only, spec), strict=True):
        changed = [
            n
            for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True)
            if not torch.equal(p, q)
        ]
        assert changed  # every block took part
        assert all("norm" not in n and "ln" not in n for n in changed)  # norms stay frozen
    flags = [p.requires_grad for p in blocks_only.parameters()]
    assert [p.requires_grad for p in model.parameters()] == flags  # restored as they were
    assert report.achieved_ratio >= 0.4 - 1e-9


def test_a_stage_that_raised_the_loss_is_undone():
    ref = make_model("llama")
    _distill(ref)
    model = make_model("llama")
    report = _distill(model, e2e_epochs=1, e2e_lr=3.0)  # far too high: training diverges
    assert report.end_to_end["kept_init"]
    assert any("end-to-end refinement raised" in w for w in report.warnings)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    raw = make_model("llama")
    rec = _distill(raw, e2e_epochs=1, e2e_lr=3.0, keep_best=False).end_to_end
    assert rec["loss_after"] > rec["loss_before"] and not rec["kept_init"]


def test_next_token_ce_hand_computed():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3] * 3]]))
    ids = torch.tensor([[2, 1, 0]])
    total, n = distill_e2e.next_token_ce(logits, ids)
    # position 0 predicts token 1 (p 0.25), position 1 token 0 (p 0.1); the last predicts nothing
    assert n == 2 and float(total) == pytest.approx(-math.log(0.25) - math.log(0.1), rel=1e-6)
    # a padded position drops the prediction of it and the prediction from it
    total, n = distill_e2e.next_token_ce(logits, ids, torch.tensor([[1, 1, 0]]))
    assert n == 1 and float(total) == pytest.approx(-math.log(0.25), rel=1e-6)


def test_the_record_has_the_heldout_cross_entropy_of_the_calibration_tokens():
    model = make_model("llama")
    rec = _distill(model, e2e_epochs=1, e2e_lr=3e-3, autocast=False).end_to_end
    held = calib_ids()[12:]  # the last batch of 4 is held out (holdout=1)
    with torch.no_grad():
        want = float(model(input_ids=held, labels=held).loss)
    assert rec["ce_after"] == pytest.approx(want, rel=1e-5)
    assert rec["ce_before"] != rec["ce_after"]


@pytest.mark.parametrize(
    ("kl_after", "ce_after", "undone"),
    [(1.1, 1.9, False), (0.9, 2.1, False), (1.1, 2.1, True), (0.9, 1.9, False)],
)
def test_keep_best_undoes_a_stage_that_raised_both_heldout_kl_and_cross_entropy(
    monkeypatch, kl_after, ce_after, undone
):
    ref = make_model("llama")
    _distill(ref)  # the block pass only
    values = iter([(1.0, 2.0), (kl_after, ce_after)])  # held-out (KL, cross-entropy) before, after
    monkeypatch.setattr(distill_e2e._Stage, "heldout", lambda self, batches: next(values))
    model = make_model("llama")
    report = _distill(model, e2e_epochs=1, e2e_lr=3e-3)
    assert report.end_to_end["kept_init"] is undone
    same = all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True)
    )
    assert same is undone  # undone: the block pass's weights; kept: the stage trained them
    assert any("end-to-end refinement raised" in w for w in report.warnings) is undone


@pytest.mark.parametrize("fail_at", [1, 3])  # the held-out KL before; a training step
def test_a_stage_out_of_memory_keeps_the_block_pass(monkeypatch, fail_at):
    ref = make_model("llama")
    _distill(ref)
    loss, calls = distill_e2e._Stage.loss, []

    def oom(self, *args):
        calls.append(args)
        if len(calls) >= fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss(self, *args)

    monkeypatch.setattr(distill_e2e._Stage, "loss", oom)
    model = make_model("llama")
    report = _distill(model, e2e_epochs=2, e2e_lr=1e-3)  # completes: the block pass survives
    rec = report.end_to_end
    assert rec["error"].startswith("out of memory on cpu: CUDA out of memory") and rec["kept_init"]
    assert any("end-to-end stage failed" in w and "e2e_micro_batch=1" in w for w in report.warnings)
    assert "end-to-end refinement failed" in "\n".join(report.summary_lines())
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [p.requires_grad for p in model.parameters()] == [
        p.requires_grad for p in ref.parameters()
    ]
    assert all(p.grad is None for p in model.parameters())


def test_epochs_zero_keeps_the_init_blocks_untrained():
    init = make_model("llama")
    factorlm.compress(init, method="svd-llm", ratio=0.4, one_pass=False, **KW)  # as distill
    model = make_model("llama")
    report = _distill(model, steps=None, epochs=0)
    assert all(b.loss_before is None for b in report.blocks)
    for (k, a), b in zip(model.state_dict().items(), init.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert report.end_to_end == {}


def test_resume_after_an_interrupted_stage_gives_identical_weights(tmp_path, monkeypatch):
    opts = dict(e2e_epochs=1, e2e_lr=3e-3)
    ref = make_model("llama")
    _distill(ref, **opts)
    orig = distill_e2e.refine_end_to_end

    def interrupted(*a, **k):
        raise KeyboardInterrupt("simulated interruption in the end-to-end stage")

    monkeypatch.setattr(distill_e2e, "refine_end_to_end", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _distill(make_model("llama"), workdir=str(tmp_path), **opts)
    monkeypatch.setattr(distill_e2e, "refine_end_to_end", orig)
    model = make_model("llama")
    report = _distill(model, workdir=str(tmp_path), resume=True, **opts)
    assert report.end_to_end["steps"] == 12
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_optimizer_state_offloaded_to_the_host_trains_the_same_weights(monkeypatch, dtype):
    """e2e_offload="on": the fp32 masters (and the AdamW moments made next to them) are separate
    copies on the host, the gradients go there and the weights come back: the same weights as
    the state kept with the parameters (to rounding: the offloaded step is the fused AdamW)."""
    from factorlm.methods import train_step

    seen = []
    orig = train_step.fp32_masters

    def spy(params, on=None):
        out = orig(params, on=on)
        seen.append((on, any(m is p for m, p in zip(out, params, strict=True))))
        return out

    monkeypatch.setattr(distill_e2e, "fp32_masters", spy)
    models, recs = [], []
    for mode in ("off", "on"):
        model = make_model("llama").to(dtype)
        report = _distill(model, e2e_epochs=2, e2e_lr=1e-3, e2e_offload=mode)
        recs.append(report.end_to_end)
        models.append(model)
    assert "optimizer state on the host" in "\n".join(report.summary_lines())
    assert [r["offload"] for r in recs] == [False, True]
    assert seen[-2:] == [(None, dtype == torch.float32), ("cpu", False)]
    assert recs[1]["loss_after"] < recs[1]["loss_before"]
    # the host's fused AdamW rounds differently from the per-op loop: equal to 1e-4 in fp32; in
    # bf16 weights rounded one unit apart in one path (~0.4 %; seen on an AVX512-BF16 CPU without
    # AMX) move the loss by ~0.15 %, against the 6.5 % training moves it
    fp32 = dtype == torch.float32
    assert recs[0]["loss_after"] == pytest.approx(recs[1]["loss_after"], rel=1e-4 if fp32 else 1e-2)
    # bf16: a few rounding units (2^-12 at 0.06); training moves the weights by ~1e-2
    tol = {"rtol": 1e-4, "atol": 1e-5} if fp32 else {"rtol": 1.6e-2, "atol": 1e-3}
    for (k, a), b in zip(
        models[0].state_dict().items(), models[1].state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=k, **tol)


def test_auto_offloads_the_optimizer_state_only_when_the_device_lacks_room(monkeypatch):
    from types import SimpleNamespace

    from factorlm import memory

    params = [torch.nn.Parameter(torch.zeros(1000, 1000, dtype=torch.bfloat16))]
    stage = SimpleNamespace(
        inputs=SimpleNamespace(student=[torch.zeros(4, 16, 8)]),
        o=SimpleNamespace(micro_batch=1),
        blocks=[None] * 2,
        head=torch.nn.Linear(8, 100),
        config=None,
    )
    # gradients 2 + masters 4 + moments 8 bytes per weight, + one micro-batch's activations
    need = 14 * 10**6 + memory.end_to_end_activation_bytes(2, 1, 16, 8, 100)
    free = {"bytes": need}
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: free["bytes"])
    assert not distill_e2e._offload("auto", params, params, stage, "cuda:0", "cpu")
    free["bytes"] = need - 1
    assert distill_e2e._offload("auto", params, params, stage, "cuda:0", "cpu")
    assert not distill_e2e._offload("auto", params, params, stage, "cpu", "cpu")  # one memory
    assert not distill_e2e._offload("off", params, params, stage, "cuda:0", "cpu")
    assert distill_e2e._offload("on", params, params, stage, "cpu", "cpu")
    # sharded over processes: this process keeps the state of half of the weights
    half = [torch.nn.Parameter(torch.zeros(500, 1000, dtype=torch.bfloat16))]
    assert distill_e2e._offload("auto", params, params, stage, "cuda:0", "cpu")
    assert not distill_e2e._offload("auto", params, half, stage, "cuda:0", "cpu")
    free["bytes"] = None  # unknown: the state stays with the parameters
    assert not distill_e2e._offload("auto", params, params, stage, "cuda:0", "cpu")


def test_train_norms_trains_the_blocks_norms_in_the_stage_but_not_the_final_one():
    init = make_model("llama")
    _distill(init, init="svd", epochs=0)
    model = make_model("llama")
    rec = _distill(
        model, init="svd", epochs=0, e2e_epochs=2, e2e_lr=1e-3, train_norms=True
    ).end_to_end
    assert rec["loss_after"] < rec["loss_before"] and not rec["kept_init"]
    changed = {
        k
        for (k, a), b in zip(model.state_dict().items(), init.state_dict().values(), strict=True)
        if not torch.equal(a, b)
    }
    block_norms = {k for k in init.state_dict() if "layers." in k and "norm" in k}
    assert block_norms and block_norms <= changed
    assert not any(k.startswith("model.norm") for k in changed)  # the teacher's final norm


def _matmul_dtypes(model, monkeypatch, has_bf16: bool, **opts) -> set[torch.dtype]:
    """The output dtypes of the first block's linears while distill trains (block pass and stage)."""
    from factorlm.methods import train_step

    monkeypatch.setattr(train_step, "cpu_has_bf16", lambda: has_bf16)
    seen: set[torch.dtype] = set()

    def hook(mod, _args, out):
        if torch.is_grad_enabled():
            seen.add(out.dtype)

    block = get_blocks(model, get_spec(model))[0]
    handles = [m.register_forward_hook(hook) for m in block.modules() if not list(m.children())]
    try:
        _distill(model, e2e_epochs=1, **opts)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_training_autocasts_to_bf16_on_cpus_with_native_bf16(monkeypatch):
    assert torch.bfloat16 in _matmul_dtypes(make_model("llama"), monkeypatch, True)
    assert torch.bfloat16 not in _matmul_dtypes(make_model("llama"), monkeypatch, False)
    no = _matmul_dtypes(make_model("llama"), monkeypatch, True, autocast=False)
    assert torch.bfloat16 not in no


def test_the_stage_computes_its_logits_outside_autocast():
    """The KL's logits are the head's dtype (fp32 here) even inside the blocks' bf16 autocast."""
    model = make_model("llama")
    spec = get_spec(model)
    streams = capture_block_inputs(model, spec, list(calib_ids().split(4)), "cpu")
    opts = distill_e2e.EndToEnd(epochs=1, lr=1e-3, micro_batch=1, holdout=0)
    stage = distill_e2e._Stage(model, spec, streams, streams.student, opts, "cpu")
    h = torch.randn(2, 8, model.config.hidden_size)
    want = stage.head(stage.norm(h))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = stage.logits(h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_refined_recipe_compresses_saves_and_reloads_every_architecture(arch, tmp_path):
    """distill:allocation=loss,e2e_epochs=... (modular's init with its loss-aware allocation and
    loss metric, block-local training, the end-to-end stage) on each supported architecture."""
    model = make_model(arch)
    init = {"min_saving": 0}  # tiny matrices save less than a CPU kernel launch: factorize anyway
    report = factorlm.compress(
        model,
        method="distill",
        ratio=0.3,
        allocation="loss",
        e2e_epochs=1,
        steps=1,
        init_options=init,
        **KW,
    )
    assert report.achieved_ratio >= 0.3 - 0.08
    assert "loss_aware" in report.calibration and report.end_to_end["steps"] > 0
    x = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        ref = model(x).logits
        assert torch.isfinite(ref).all()
        out = factorlm.save(model, tmp_path / "m", report=report)
        # equal up to float rounding (Mamba's reference scan differs in the last bit on reload)
        torch.testing.assert_close(factorlm.load(out)(x).logits, ref, rtol=0, atol=1e-5)
