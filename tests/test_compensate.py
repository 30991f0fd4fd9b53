"""calibration/compensate.py: the first-order target that cancels the attention's error
(``modular``'s ``compensate="attention"``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import calib_ids, compress_tiny, make_model
from factorlm.calibration.compensate import AttentionError, attention_is_additive
from factorlm.errors import CalibrationError, ConfigError


class _Block(nn.Module):
    """h + a + down(relu(up(h + a))), a = o(h) (a norm after the attention when ``post_norm``)."""

    def __init__(self, post_norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.o, self.up, self.down = nn.Linear(6, 6), nn.Linear(6, 10), nn.Linear(10, 6)
        self.norm = nn.LayerNorm(6) if post_norm else nn.Identity()

    def forward(self, h):
        h = h + self.norm(self.o(h))
        return h + self.down(torch.relu(self.up(h)))


def test_attention_error_sums_the_output_error_against_the_mlp_input():
    blk = _Block()
    x = [torch.randn(3, 5, 6) for _ in range(2)]
    dense = [torch.randn(15, 6) for _ in range(2)]  # what o output before compression
    err = AttentionError(blk.o, blk.down, lambda j: dense[j])
    with torch.no_grad():
        with err:
            for j, xj in enumerate(x):
                err.set_batch(j)
                blk(xj)
                err.end_batch()
            blk(x[0])  # outside a batch: not counted
        want = torch.zeros(6, 10, dtype=torch.float64)
        for xj, aj in zip(x, dense, strict=True):
            a = blk.o(xj).reshape(-1, 6)
            hid = torch.relu(blk.up(xj + blk.o(xj))).reshape(-1, 10)
            want += (aj - a).double().T @ hid.double()
    assert torch.allclose(err.cross, want, atol=1e-4)
    assert not blk.o._forward_hooks and not blk.down._forward_pre_hooks  # hooks removed


def test_attention_error_refuses_a_logged_output_of_another_shape():
    blk = _Block()
    err = AttentionError(blk.o, blk.down, lambda j: torch.zeros(7, 6))
    with pytest.raises(CalibrationError, match="disagree"), torch.no_grad(), err:
        err.set_batch(0)
        blk(torch.randn(3, 5, 6))


def test_attention_is_additive_only_without_a_norm_after_the_attention():
    with torch.no_grad():
        blk = _Block()
        assert attention_is_additive(lambda: blk(torch.ones(3, 5, 6)), blk.o, blk.down)
        blk = _Block(post_norm=True)
        assert not attention_is_additive(lambda: blk(torch.ones(3, 5, 6)), blk.o, blk.down)
    assert not blk.o._forward_hooks and not blk.down._forward_hooks


def _first_block_error(arch: str, compensate) -> float:
    """||dense block 0 - compressed block 0||^2 over every calibration token (same input)."""
    from factorlm.arch.modules import get_blocks, get_spec

    dense, model = make_model(arch), make_model(arch)
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
            m(calib_ids())
        h.remove()
        outs.append(got[0])
    return float((outs[0] - outs[1]).double().square().sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_first_order_compensation_lowers_the_block_output_error(arch):
    assert _first_block_error(arch, "attention") < _first_block_error(arch, "off")


def test_first_order_compensation_leaves_a_post_norm_block_to_the_plain_refit():
    def weights(compensate):
        model = make_model("gemma2")
        compress_tiny(model, ratio=0.5, compensate=compensate, min_saving=0)
        return model.state_dict()

    a, b = weights("attention"), weights("off")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compensate_reads_booleans_and_refuses_other_values():
    from factorlm.methods.modular import ModularConfig

    assert ModularConfig(compensate=True).compensate == "block"
    assert ModularConfig(compensate=False).compensate == "off"
    assert ModularConfig(compensate="attention").changed_options() == {"compensate": "attention"}
    with pytest.raises(ConfigError, match="compensate"):
        ModularConfig(compensate="mlp")
    with pytest.raises(ConfigError, match="anchored"):
        ModularConfig(compensate="attention", anchored=True)


def test_the_structure_check_runs_once_per_block_class(monkeypatch):
    import factorlm.methods.modular_attn as modular_attn

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return attention_is_additive(*args, **kwargs)

    monkeypatch.setattr(modular_attn, "attention_is_additive", counting)
    model = make_model("llama")
    report = compress_tiny(model, ratio=0.5, compensate="attention", min_saving=0)
    assert model.config.num_hidden_layers > 1 and len(calls) == 1
    downs = [m for m in report.modules if m.name.endswith("down_proj")]
    assert downs and all("refit with compensate='attention'" in m.notes for m in downs)
