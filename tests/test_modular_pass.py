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
