"""Tests of the save format: models saved by older factorlm versions keep loading.

``tests/fixtures/v1_lorap_llama`` was written by factorlm at commit f99ffa6 (format version 1): a
tiny Llama compressed with lorap (low-rank attention + pruned MLP linears), saved with
``factorlm.save``, plus ``expected_logits.safetensors`` (inputs and the compressed model's logits).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import factorlm
from factorlm.nn import modeling_factorlm

FIXTURE = Path(__file__).parent / "fixtures" / "v1_lorap_llama"
BUNDLED = ("modeling_factorlm.py", "lowrank.py", "experts.py")


def _expected():
    saved = load_file(str(FIXTURE / "expected_logits.safetensors"))
    return saved["input_ids"], saved["logits"]


def _check(model) -> None:
    ids, logits = _expected()
    assert "LowRankLinear" in {type(m).__name__ for m in model.modules()}
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.out_features < model.config.intermediate_size  # pruned widths restored
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-5)


def test_v1_fixture_loads_with_factorlm_load():
    _check(factorlm.load(FIXTURE))


def test_v1_fixture_loads_with_its_own_remote_code():
    _check(AutoModelForCausalLM.from_pretrained(str(FIXTURE), trust_remote_code=True))


def test_v1_fixture_loads_with_todays_remote_code(tmp_path):
    """An old directory whose bundled loader is replaced by today's still loads."""
    d = tmp_path / "m"
    shutil.copytree(FIXTURE, d)
    src = Path(modeling_factorlm.__file__).parent
    for name in BUNDLED:
        shutil.copyfile(src / name, d / name)
    _check(AutoModelForCausalLM.from_pretrained(str(d), trust_remote_code=True))


@pytest.mark.parametrize("loader", ["factorlm", "remote"])
def test_v1_fixture_logits_differ_when_weights_differ(tmp_path, loader):
    """The comparison can fail: a perturbed weight file changes the logits."""
    from safetensors.torch import save_file

    d = tmp_path / "m"
    shutil.copytree(FIXTURE, d)
    state = load_file(str(d / "model.safetensors"))
    key = next(k for k in state if k.endswith("q_proj.A.weight"))
    state[key] = state[key] + 0.5
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    if loader == "factorlm":
        model = factorlm.load(d)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(d), trust_remote_code=True)
    with pytest.raises(AssertionError):
        _check(model)
