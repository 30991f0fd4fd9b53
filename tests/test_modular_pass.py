"""methods/modular_pass.py: the block's structure checks behind ``compensate`` (on by default)."""

from __future__ import annotations

import pytest
import torch

from conftest import compress_tiny, make_model
from factorlm.calibration.anchored import ResidualTarget
from factorlm.errors import ConfigError

NOTE = "refit to the dense block's output (compensate)"


def _down_notes(report) -> list[list[str]]:
    return [m.notes for m in report.modules if m.name.endswith(("down_proj", "mlp.c_proj"))]


def test_compensate_is_the_default_and_checked_once_per_block_class(monkeypatch):
    calls = []
    check = ResidualTarget.check

    def counting(self, fn):
        calls.append(1)
        return check(self, fn)

    monkeypatch.setattr(ResidualTarget, "check", counting)
    model = make_model("llama")
    report = compress_tiny(model, ratio=0.5, min_saving=0)
    assert model.config.num_hidden_layers > 1 and len(calls) == 1
    notes = _down_notes(report)
    assert notes and all(NOTE in n for n in notes)


@pytest.mark.parametrize("options", [{"anchored": True}, {"refit": False}, {"compensate": False}])
def test_compensate_is_off_where_it_does_not_apply(options):
    report = compress_tiny(make_model("llama"), ratio=0.5, min_saving=0, **options)
    assert not any(NOTE in n for n in _down_notes(report))


def test_a_post_norm_block_keeps_the_plain_refit():
    def weights(**options):
        model = make_model("gemma2")
        compress_tiny(model, ratio=0.5, min_saving=0, **options)
        return model.state_dict()

    a, b = weights(), weights(compensate=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compensate_with_anchored_fits_is_refused():
    from factorlm.methods.modular import ModularConfig

    assert ModularConfig().compensate is None
    with pytest.raises(ConfigError, match="anchored"):
        ModularConfig(compensate=True, anchored=True)
    with pytest.raises(ConfigError, match="compensate"):
        ModularConfig(compensate="yes")


# --- the block's outputs from what pass (2) kept -------------------------------------------------


def _counting_pipeline_forwards(monkeypatch) -> list[int]:
    from factorlm.calibration import pipeline

    calls, real = [], pipeline.run_block

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "run_block", counting)
    return calls


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "opt"])
def test_kept_inputs_give_the_blocks_outputs_without_the_output_pass(arch, monkeypatch):
    """With room for pass (2)'s kept inputs, each block's outputs are computed from them (equal to
    a forward of the compressed block on every batch) and the pipeline's output pass is skipped;
    without room, that pass runs."""
    from factorlm.calibration.pipeline import run_block
    from factorlm.methods import modular, modular_pass

    real, diffs = modular.outputs_from_kept, []

    def checked(ctx, *a, **k):
        outs = real(ctx, *a, **k)
        for h, kw, o in zip(ctx.streams.student, ctx.streams.kwargs, outs or [], strict=False):
            ref = run_block(ctx.block, h, kw, ctx.device, ctx.offload, ctx.autocast)
            diffs.append(float((ref - o).abs().max() / ref.abs().max()))
        return outs

    monkeypatch.setattr(modular, "outputs_from_kept", checked)

    def run(free):
        monkeypatch.setattr(modular_pass, "available_bytes", lambda _dev: free)
        calls = _counting_pipeline_forwards(monkeypatch)
        model = make_model(arch)
        report = compress_tiny(model, ratio=0.5, min_saving=0)
        with torch.no_grad():
            logits = model(torch.arange(24).reshape(2, 12) % 90).logits
        return len(calls), report, logits

    n_short, rep_short, logits_short = run(2**40)
    n_blocks = len(rep_short.blocks)
    assert len(diffs) == n_blocks * 4 and max(diffs) < 1e-6  # 16 sequences in batches of 4
    n_pass, rep_pass, logits_pass = run(0)  # nothing fits: the pipeline's output pass
    assert n_pass - n_short == n_blocks * 4
    # the same model up to rounding (which the next block's least-squares fits amplify)
    assert float((logits_short - logits_pass).norm() / logits_pass.norm()) < 1e-2
    pairs = zip(rep_short.blocks, rep_pass.blocks, strict=True)
    assert all(
        a.rel_output_error == pytest.approx(b.rel_output_error, rel=1e-2, abs=1e-7)
        for a, b in pairs
    )


class _Ctx:
    """The parts of a BlockContext that outputs_from_kept reads."""

    def __init__(self, block, hidden):
        self.block, self.prefix = block, "blk"
        self.streams = type("S", (), {"student": hidden, "kwargs": [{} for _ in hidden]})()
        self.device, self.offload, self.autocast = "cpu", "cpu", None


def _pruned(blk, keep):
    up, down = torch.nn.Linear(6, len(keep)), torch.nn.Linear(len(keep), 6)
    with torch.no_grad():
        up.weight.copy_(blk.up.weight[keep]), up.bias.copy_(blk.up.bias[keep])
        down.weight.copy_(torch.randn(6, len(keep))), down.bias.copy_(blk.down.bias)
    blk.up, blk.down = up, down


@pytest.mark.parametrize("wrong", [False, True])
def test_outputs_from_kept_equal_a_forward_and_are_checked(wrong):
    from factorlm.methods.modular_pass import outputs_from_kept
    from test_anchored_streams import _Block

    blk = _Block()
    hidden = [torch.randn(3, 5, 6) for _ in range(3)]
    rt = ResidualTarget(blk.down, blk.down.bias)
    with torch.no_grad():
        assert rt.check(lambda: blk(hidden[0]))
        rt.keep_to("cpu")
        with rt:
            for h in hidden:
                rt.run(lambda h=h: blk(h), torch.randn(3, 5, 6))
        keep = torch.tensor([0, 2, 3, 7, 9])
        _pruned(blk, keep)
        outs = outputs_from_kept(_Ctx(blk, hidden), rt, "down", keep.flip(0) if wrong else keep)
        if wrong:  # other channels than the pruned linears compute: the first batch's check fails
            assert outs is None
        else:
            assert len(outs) == 3
            assert all(
                torch.allclose(o, blk(h), atol=1e-6) for o, h in zip(outs, hidden, strict=True)
            )
    assert rt.kept is None  # released
