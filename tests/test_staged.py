"""One calibration pass per block (calibration/staged.py): each linear is compressed as soon as
every batch has reached it, and later linears see the compressed earlier ones."""

from __future__ import annotations

import logging
import signal

import pytest
import torch

import factorlm
from conftest import calib_ids, make_model
from factorlm.arch.modules import block_targets, get_blocks, get_spec, linear_shape, set_submodule
from factorlm.calibration.pipeline import capture_block_inputs, run_block
from factorlm.calibration.stats import StatsCollector
from factorlm.methods.base import get_method, make_config
from factorlm.methods.trainingfree import factorize_module
from factorlm.rank.allocation import uniform_ranks

RATIO = 0.4


@pytest.fixture(autouse=True)
def _no_hang():
    """A synchronisation bug would hang: fail instead."""

    def boom(*_):
        raise TimeoutError("one-pass pipeline hung")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _compress(model, ids, **kw):
    return factorlm.compress(
        model, "svd-llm", RATIO, ids, n_samples=16, seqlen=32, batch_size=4, progress=False, **kw
    )


def _reference(model, ids):
    """Definition of the one-pass result, the slow way: for each linear in forward order, run the
    partly compressed block over every batch to collect that linear's statistics, compress it."""
    spec = get_spec(model)
    batches = list(ids.split(4))
    streams = capture_block_inputs(model, spec, batches, "cpu")
    method = get_method("svd-llm")
    options = make_config("svd-llm").decompose_options()
    for block in get_blocks(model, spec):
        targets = block_targets(block, spec)
        ranks = uniform_ranks({r: linear_shape(m) for r, m in targets.items()}, RATIO)
        for rel, mod in targets.items():  # module order == forward order for llama
            with torch.no_grad(), StatsCollector({rel: mod}, {"gram"}) as col:
                for h, kw in zip(streams.student, streams.kwargs, strict=True):
                    run_block(block, h, kw, "cpu")
                    col.new_batch()
            new, _, _ = factorize_module(method, mod, col.stats[rel], ranks[rel], options, rel)
            set_submodule(block, rel, new)
        with torch.no_grad():
            streams.student = [
                run_block(block, h, kw, "cpu")
                for h, kw in zip(streams.student, streams.kwargs, strict=True)
            ]
    return model


def test_one_pass_equals_linear_by_linear_reference():
    ids = calib_ids()
    model = make_model("llama")
    report = _compress(model, ids)
    assert report.calibration["passes_per_block"] == 1
    ref = _reference(make_model("llama"), ids)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert set(sd) == set(ref_sd)
    for k, v in sd.items():
        scale = max(float(ref_sd[k].abs().max()), 1e-12)
        assert float((v - ref_sd[k]).abs().max()) <= 1e-5 * scale, k


def test_one_pass_differs_from_two_pass_only_after_the_first_compressed_linear():
    ids = calib_ids()
    one, two = make_model("llama"), make_model("llama")
    r1 = _compress(one, ids)
    r2 = _compress(two, ids, one_pass=False)
    assert r2.calibration["passes_per_block"] == 2
    assert r1.ranks == r2.ranks
    a1, a2 = one.model.layers[0].self_attn, two.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):  # same inputs in both modes: same factors
        assert torch.allclose(getattr(a1, name).A.weight, getattr(a2, name).A.weight, atol=1e-6)
    # o_proj sees the attention computed with the compressed q/k/v in one pass only
    assert not torch.allclose(a1.o_proj.A.weight, a2.o_proj.A.weight, atol=1e-4)


def test_routed_experts_take_two_passes():
    model = make_model("mixtral")
    report = _compress(model, calib_ids())
    assert report.calibration["passes_per_block"] == 2
    assert report.achieved_ratio >= RATIO


def test_a_linear_called_twice_falls_back_to_two_passes(caplog):
    model = make_model("llama")
    mlp = model.model.layers[0].mlp
    orig = type(mlp).forward

    def twice(self, x):
        out = orig(self, x)
        return out + 0 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mlp.forward = twice.__get__(mlp)
    with caplog.at_level(logging.WARNING):
        report = _compress(model, calib_ids())
    assert "more than once" in caplog.text
    assert report.calibration["passes_per_block"] == 2
    assert all(b.rel_output_error is not None for b in report.blocks)
    n_lowrank = sum(1 for m in report.modules if m.kind == "lowrank")
    assert n_lowrank == 14 and len(report.modules) == 14  # nothing recorded twice


def test_one_pass_is_deterministic_whatever_the_thread_scheduling(monkeypatch):
    """Batches take turns in batch order and add into one float64 sum per linear: two runs, one of
    them with the threads' start order scrambled by sleeps, give bit-identical factors."""
    import threading
    import time

    ids = calib_ids(16, 32)
    a, b = make_model("llama"), make_model("llama")
    _compress(a, ids)
    init = threading.Thread.__init__

    def reversed_arrival(self, *args, target=None, **kw):
        if target is not None and kw.get("args"):  # a worker: batch k starts after batch k+1
            k, inner = kw["args"][0], target

            def target(*a):
                time.sleep(0.003 * (8 - k))
                return inner(*a)

        init(self, *args, target=target, **kw)

    monkeypatch.setattr(threading.Thread, "__init__", reversed_arrival)
    _compress(b, ids)
    pa = dict(a.named_parameters())
    assert all(torch.equal(p, pa[n]) for n, p in b.named_parameters())
