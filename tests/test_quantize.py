"""Tests of factorlm.quantize and factorlm.nn.quantized (weight-only int8 / int4, save -> load)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import factorlm
from conftest import calib_ids, make_model
from factorlm.errors import ConfigError, FormatError
from factorlm.nn.quantized import QuantLinear, pick_group
from factorlm.quantization import quantization_of
from test_fused import factorize

KW = dict(n_samples=8, seqlen=32, progress=False)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("bits,group", [(8, 48), (8, 16), (4, 16), (4, 48)])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 48, generator=g) * torch.linspace(0.1, 3, 48)
    q = QuantLinear.from_linear(w, None, bits, group)
    err = (q.dequantize() - w).abs().reshape(10, 48 // group, group)
    step = q.scale.float()[..., None]
    # scales are stored in float16: allow their rounding on top of half a step
    assert bool((err <= 0.5 * step + 2e-3 * w.abs().amax()).all())
    assert q.int_weight().min() >= (-127 if bits == 8 else 0)
    assert q.int_weight().max() <= (127 if bits == 8 else 15)
    if bits == 4:
        assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (10, 24)  # two per byte


def test_pick_group():
    assert pick_group(576, 32) == 32
    assert pick_group(40, 32) == 8  # 32 and 16 do not divide 40
    assert pick_group(36, 32) == 36  # nothing from 32 down to 8 divides it: one group per row
    assert pick_group(64, None) == 64


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_lowrank_save_load_equal_logits(scheme, tmp_path):
    model = factorize(make_model("qwen2"))  # biases on q/k/v
    ids = calib_ids(2, 16)
    ref = logits(model, ids)
    n = factorlm.quantize(model, scheme)
    assert n == 2 * 7 * model.config.num_hidden_layers  # both factors of every linear
    assert isinstance(model.model.layers[0].self_attn.q_proj.B, QuantLinear)
    got = logits(model, ids)
    err = (got - ref).norm() / ref.norm()
    assert 0 < err < (0.05 if scheme == "int8" else 0.5)
    out = factorlm.save(model, tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    int_dtype = torch.int8 if scheme == "int8" else torch.uint8
    assert state["model.layers.0.mlp.up_proj.A.qweight"].dtype == int_dtype
    assert "model.layers.0.mlp.up_proj.A.weight" not in state
    block = json.loads((out / "config.json").read_text())["factorlm"]
    assert block["format_version"] == 2 and block["quantization"]["scheme"] == scheme
    loaded = factorlm.load(out)
    assert torch.equal(logits(loaded, ids), got)
    remote = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    assert torch.equal(logits(remote, ids), got)


def test_int8_is_closer_than_int4_on_a_dense_model():
    ids = calib_ids(2, 16)
    ref = logits(make_model("llama"), ids)
    errs = {}
    for scheme in ("int8", "int4"):
        model = make_model("llama")
        factorlm.quantize(model, scheme)
        errs[scheme] = float((logits(model, ids) - ref).norm() / ref.norm())
    assert 0 < errs["int8"] < errs["int4"]


def test_pruned_and_quantized_model_round_trips(tmp_path):
    """LoRAP prunes the MLP linears (new shapes) and factorizes attention: both quantize and reload."""
    model = make_model("llama")
    factorlm.compress(model, method="lorap", ratio=0.3, calibration=calib_ids(), **KW)
    factorlm.quantize(model, "int4")
    ids = calib_ids(2, 16)
    ref = logits(model, ids)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert model.model.layers[0].mlp.down_proj.in_features < model.config.intermediate_size
    loaded = factorlm.load(factorlm.save(model, tmp_path / "m"))
    assert torch.equal(logits(loaded, ids), ref)
    assert quantization_of(loaded) == quantization_of(model)


def test_errors(tmp_path):
    model = make_model("llama")
    with pytest.raises(ConfigError, match="unknown quantization"):
        factorlm.quantize(model, "int3")
    factorlm.quantize(model, "int8")
    with pytest.raises(ConfigError, match="already quantized"):
        factorlm.quantize(model, "int8")
    out = factorlm.save(model, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    name = next(iter(cfg["factorlm"]["quantization"]["modules"]))
    cfg["factorlm"]["quantization"]["modules"][name]["bits"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="quantized module"):
        factorlm.load(out)
