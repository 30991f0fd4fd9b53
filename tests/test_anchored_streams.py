"""The two-stream hooks of calibration/anchored.py: the early stop of a statistics-only pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import calib_ids, compress_tiny, make_model
from factorlm.calibration import anchored as streams_mod
from factorlm.calibration.anchored import EarlyStop
from factorlm.errors import CalibrationError


class _Chain(nn.Module):
    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.twice = twice
        self.calls = 0
        self.c.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def forward(self, x):
        x = self.b(self.a(x))
        if self.twice:
            x = self.a(x)
        return self.c(x)


def test_early_stop_skips_what_follows_the_last_needed_module():
    m, x = _Chain(), torch.randn(2, 4)
    with EarlyStop({"b": m.b, "a": m.a}) as stop:
        assert stop.run(lambda: m(x)) is not None  # the first forward runs whole (learns order)
        assert stop.run(lambda: m(x)) is None and stop.run(lambda: m(x)) is None
        assert m(x).shape == (2, 4)  # outside run(): not cut
    assert m.calls == 2
    assert m(x).shape == (2, 4) and m.calls == 3  # hooks removed


def test_early_stop_never_cuts_a_module_called_twice():
    m, x = _Chain(twice=True), torch.randn(2, 4)
    with EarlyStop({"a": m.a, "b": m.b}) as stop:
        for _ in range(3):
            assert stop.run(lambda: m(x)) is not None
    assert m.calls == 3


class _NoStop(EarlyStop):
    def run(self, fn):
        return fn()


def _modular_weights(monkeypatch, cut: bool, **options):
    if not cut:
        monkeypatch.setattr("factorlm.methods.modular_pass.EarlyStop", _NoStop)
    model = make_model("llama")
    compress_tiny(model, min_saving=0, **options)
    monkeypatch.setattr("factorlm.methods.modular_pass.EarlyStop", streams_mod.EarlyStop)
    return model.state_dict()


def test_cut_passes_give_the_same_model(monkeypatch):
    for options in ({}, {"anchored": True}):
        a = _modular_weights(monkeypatch, True, **options)
        b = _modular_weights(monkeypatch, False, **options)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


class _Block(nn.Module):
    """out = x + down(act(up(x))) (+ a norm after the MLP when ``post_norm``)."""

    def __init__(self, post_norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(6, 10), nn.Linear(10, 6)
        self.norm = nn.LayerNorm(6) if post_norm else nn.Identity()

    def forward(self, x):
        return x + self.norm(self.down(torch.relu(self.up(x))))


def test_residual_target_cross_sums_what_the_linear_must_output():
    from factorlm.calibration.anchored import ResidualTarget

    blk = _Block()
    x = [torch.randn(3, 5, 6) for _ in range(2)]
    targets = [torch.randn(3, 5, 6) for _ in range(2)]
    rt = ResidualTarget(blk.down, blk.down.bias)
    with torch.no_grad():
        assert rt.check(lambda: blk(x[0]))
        with rt:
            for xi, ti in zip(x, targets, strict=True):
                rt.run(lambda xi=xi: blk(xi), ti)
        want = torch.zeros(6, 10, dtype=torch.float64)
        for xi, ti in zip(x, targets, strict=True):
            h = torch.relu(blk.up(xi)).reshape(-1, 10).double()
            y = (ti - xi).reshape(-1, 6).double() - blk.down.bias.double()  # the down output wanted
            want += y.T @ h
    assert torch.allclose(rt.cross, want, atol=1e-4)
    assert blk(x[0]).shape == (3, 5, 6) and not blk.down._forward_hooks  # hooks removed


def test_cross_sums_are_exact_inside_the_calibrations_bf16_autocast():
    """The cross-Grams of the anchored fits and of compensate are float64 sums of fp32 products
    also when the passes run under bf16 autocast (calib_dtype): only the block's own matmuls are
    rounded."""
    from factorlm.calibration.anchored import ResidualTarget, add_cross
    from factorlm.calibration.stats import LayerStats

    a, b = torch.randn(200, 64) + 3.0, torch.randn(200, 64) - 2.0
    ref, ac = LayerStats(), LayerStats()
    add_cross(ref, a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        add_cross(ac, a, b)
    torch.testing.assert_close(ac.cross, ref.cross, rtol=1e-6, atol=1e-6)

    blk = _Block()
    x, t = torch.randn(3, 5, 6) + 2.0, torch.randn(3, 5, 6)
    rt = ResidualTarget(blk.down, blk.down.bias)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert rt.check(lambda: blk(x))
        with rt:
            rt.run(lambda: blk(x), t)
        h = torch.relu(blk.up(x)).reshape(-1, 10).double()  # the same bf16 forward's input
    y = (t - x).reshape(-1, 6).double() - blk.down.bias.double()
    torch.testing.assert_close(rt.cross, y.T @ h, rtol=1e-4, atol=1e-4)


def test_residual_target_refuses_a_norm_after_the_linear():
    from factorlm.calibration.anchored import ResidualTarget

    blk = _Block(post_norm=True)
    rt = ResidualTarget(blk.down, blk.down.bias)
    with torch.no_grad():
        assert not rt.check(lambda: blk(torch.randn(3, 5, 6)))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16's wider tolerance still refuses
            assert not rt.check(lambda: blk(torch.randn(3, 5, 6)))
    with pytest.raises(CalibrationError):
        rt.run(lambda: blk(torch.randn(3, 5, 6)), torch.zeros(3, 5, 6))


def _first_block_error(arch: str, compensate: bool) -> float:
    """||dense block 0 - compressed block 0||^2 over every calibration token (same input)."""
    from factorlm.arch.modules import get_blocks, get_spec

    dense = make_model(arch)
    model = make_model(arch)
    ids = calib_ids()
    # min_saving=0: the tiny attention stays low-rank, an error to compensate
    compress_tiny(model, ratio=0.5, compensate=compensate, min_saving=0)
    outs = []
    for m in (dense, model):
        blk = get_blocks(m, get_spec(m))[0]
        got = []
        h = blk.register_forward_hook(
            lambda _m, _a, y, got=got: got.append(y[0] if isinstance(y, tuple) else y)
        )
        with torch.no_grad():
            m(ids)
        h.remove()
        outs.append(got[0])
    return float((outs[0] - outs[1]).double().square().sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compensated_refit_lowers_the_block_output_error(arch):
    plain, comp = _first_block_error(arch, False), _first_block_error(arch, True)
    assert comp < plain
