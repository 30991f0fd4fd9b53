"""Tests of factorlm.nn.fused: stacked first factors of linears that read the same input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import factorlm
from conftest import calib_ids, make_model
from factorlm.arch.modules import model_targets, replace_module, unfuse_experts
from factorlm.nn.fused import FusedMember, StackedInput, fuse, is_fused, unfuse
from factorlm.nn.lowrank import LowRankLinear


def factorize(model: torch.nn.Module, rank: int = 6, seed: int = 1) -> torch.nn.Module:
    """Every targeted linear replaced by random rank-``rank`` factors (biases kept)."""
    g = torch.Generator().manual_seed(seed)
    unfuse_experts(model)
    for name, m in model_targets(model).items():
        if not isinstance(m, torch.nn.Linear):
            continue
        A = torch.randn(m.out_features, rank, generator=g) / rank**0.5
        B = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
        replace_module(model, name, LowRankLinear.from_factors(A, B, m.bias, like=m.weight))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi", "opt", "mixtral"])
def test_fused_lowrank_logits_equal(arch):
    model = factorize(make_model(arch))
    ids = calib_ids(2, 16)
    ref = logits(model, ids)
    n = fuse(model)
    per_block = {"llama": 2, "qwen2": 2, "phi": 1, "opt": 1, "mixtral": 1 + 4}  # q/k/v (+ gate/up)
    assert n == model.config.num_hidden_layers * per_block[arch]
    assert is_fused(model)
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=0)
    with torch.inference_mode():  # inference tensors have no version counter
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)


def test_one_stacked_matmul_per_group(monkeypatch):
    """q/k/v read their stacked product once: the stacked weight is multiplied once per forward."""
    model = factorize(make_model("llama"))
    fuse(model)
    attn = model.model.layers[0].self_attn
    st = attn.fused_q_proj_k_proj_v_proj
    assert isinstance(st, StackedInput) and st.widths == [6, 6, 6]
    orig = torch.nn.functional.linear
    n_stacked = []

    def counting(x, w, b=None):
        if w is st.weight:
            n_stacked.append(1)
        return orig(x, w, b)

    monkeypatch.setattr("factorlm.nn.fused.F.linear", counting)
    logits(model, calib_ids(1, 8))
    assert len(n_stacked) == 1
    assert st._z is None  # the cache is dropped once every member has read it


def test_members_called_on_other_inputs_are_exact():
    """A member called on a different tensor than the cached one computes its own product."""
    model = factorize(make_model("llama"))
    attn = model.model.layers[0].self_attn
    x1, x2 = torch.randn(3, 32), torch.randn(3, 32)
    ref = [attn.q_proj(x1), attn.k_proj(x2), attn.v_proj(x1), attn.q_proj(x1)]
    fuse(model)
    got = [attn.q_proj(x1), attn.k_proj(x2), attn.v_proj(x1), attn.q_proj(x1)]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    x3 = x1.clone()
    attn.q_proj(x3)
    x3.mul_(2)  # modified in place after q read it: k must not reuse the stale product
    fused_k = attn.k_proj(x3)
    unfuse(model)
    torch.testing.assert_close(fused_k, attn.k_proj(x3), atol=1e-6, rtol=0)


def test_dense_groups_and_mixed_groups():
    """Plain linears are stacked whole next to low-rank members (dense=True only); groups of
    plain linears only with plain_groups=True alone."""
    model = make_model("qwen2")  # q/k/v have biases
    ids = calib_ids(2, 16)
    ref = logits(model, ids)
    assert fuse(model, dense=False) == 0
    assert fuse(model) == 0  # as the dense model runs them
    assert fuse(model, plain_groups=True) == 2 * model.config.num_hidden_layers
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=0)
    unfuse(model)
    mixed = make_model("qwen2")
    attn = mixed.model.layers[0].self_attn
    for leaf, rank in (("q_proj", 4), ("k_proj", 3)):  # biased low-rank members, dense biased v
        old = getattr(attn, leaf)
        g = torch.Generator().manual_seed(rank)
        A = torch.randn(old.out_features, rank, generator=g)
        B = torch.randn(rank, old.in_features, generator=g)
        bias = torch.randn(old.out_features, generator=g)
        setattr(attn, leaf, LowRankLinear.from_factors(A, B, bias, like=old.weight))
    ref = logits(mixed, ids)
    before = {k: v.clone() for k, v in mixed.state_dict().items()}
    assert fuse(mixed, dense=False) == 0
    assert fuse(mixed) == 1  # block 0's q/k/v; the plain groups stay
    st = attn.fused_q_proj_k_proj_v_proj
    assert st.widths == [4, 3, attn.v_proj.out_features]
    assert isinstance(attn.q_proj, FusedMember) and attn.v_proj.A is None
    torch.testing.assert_close(logits(mixed, ids), ref, atol=1e-5, rtol=0)
    unfuse(mixed)
    assert isinstance(attn.q_proj, LowRankLinear) and type(attn.v_proj) is torch.nn.Linear
    after = mixed.state_dict()
    assert set(after) == set(before)
    for k in after:
        assert torch.equal(after[k], before[k]), k
    torch.testing.assert_close(logits(mixed, ids), ref, atol=1e-5, rtol=0)


def test_unfuse_restores_modules_and_state_dict():
    model = factorize(make_model("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse(model)
    unfuse(model)
    assert not is_fused(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_fused_model_saves_unfused_and_loads_fused(tmp_path):
    model = factorize(make_model("llama"))
    ids = calib_ids(2, 16)
    ref = logits(model, ids)
    fuse(model)
    factorlm.save(model, tmp_path / "m")
    assert is_fused(model)  # fused again after saving
    keys = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert "model.layers.0.self_attn.q_proj.B.weight" in keys
    assert not any("fused_" in k for k in keys)
    loaded = factorlm.load(tmp_path / "m", fuse=True)
    assert is_fused(loaded)
    torch.testing.assert_close(logits(loaded, ids), ref, atol=1e-5, rtol=0)
    plain = factorlm.load(tmp_path / "m")
    assert not is_fused(plain)
    torch.testing.assert_close(logits(plain, ids), ref, atol=1e-5, rtol=0)


def test_compiled_groups_run_one_stacked_matmul():
    """Under torch.compile the stacked product is traced once per group (not one matmul per
    member's rows), and the compiled logits equal the unfused model's."""
    model = factorize(make_model("llama")).eval()
    ids = calib_ids(2, 16)
    ref = logits(model, ids)
    fuse(model)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=capture, dynamic=False)(ids).logits
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert len(graphs) == 1  # no graph break
    linears = [
        n
        for n in graphs[0].graph.nodes
        if n.op == "call_function" and n.target is torch._C._nn.linear
    ]
    # per block: q/k/v stacked + 3 A, o_proj B + A, gate/up stacked + 2 A, down B + A; the head
    per_block = 1 + 3 + 2 + 1 + 2 + 2
    assert len(linears) == model.config.num_hidden_layers * per_block + 1
    st = model.model.layers[0].self_attn.fused_q_proj_k_proj_v_proj
    assert st._traced == {}  # nothing kept after the graph
