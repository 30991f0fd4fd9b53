"""The loss-sensitivity probe (factorlm.calibration.sensitivity) against a direct computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import calib_ids, make_model
from factorlm.arch.match import match
from factorlm.arch.modules import block_targets, get_blocks, get_spec
from factorlm.calibration.sensitivity import block_sensitivities, sublayer_outputs


def _direct(model, ids, outlier=None, grams=None):
    """κ per block and per sub-layer from one backward pass of the whole model (reference); with
    ``outlier``, tokens whose block update exceeds ``outlier`` x its median are left out. A dict
    ``grams`` receives (block, output linear) -> Σ_t g_t g_t^T of the loss's gradient at its
    output, over the same tokens."""
    spec = get_spec(model)
    pats = sublayer_outputs(spec)
    outs: dict[tuple[int, str, str], list[torch.Tensor]] = {}
    handles = []
    blocks = get_blocks(model, spec)
    io: list[list[torch.Tensor]] = [[] for _ in blocks]
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_hook(lambda _m, a, y, i=i: io[i].extend([a[0], y])))
        for r, m in block_targets(b, spec).items():
            for g, ps in pats.items():
                if any(match(p, r) for p in ps):
                    hook = lambda _m, _a, y, k=(i, g, r): outs.setdefault(k, []).append(y)  # noqa: E731
                    handles.append(m.register_forward_hook(hook))
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda _m, _a, y: y.requires_grad_(True)))
    logits = model(ids).logits.float()
    for h in handles:
        h.remove()
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    keys = list(outs)
    tensors = [t for k in keys for t in outs[k]]
    block_outs = [x[1][0] if isinstance(x[1], tuple) else x[1] for x in io]
    grads = torch.autograd.grad(loss, tensors + block_outs)
    kb, keep = [], []
    for i, x in enumerate(io):
        g = grads[len(tensors) + i]
        d2 = (block_outs[i] - x[0]).detach().square().sum(-1)
        keep.append(d2 <= outlier * d2.median() if outlier else torch.ones_like(d2, dtype=bool))
        kb.append(float((g.square().sum(-1) * d2)[keep[i]].sum()) / x[0].shape[-1])
    ks: dict[tuple[int, str], float] = {}
    j = 0
    for k in keys:
        for t in outs[k]:
            g = grads[j]
            prod = g.square().sum(-1) * t.detach().square().sum(-1)
            mask = keep[k[0]].reshape(t.shape[:-1])  # OPT's MLP runs on the flattened tokens
            ks[k[:2]] = ks.get(k[:2], 0.0) + float(prod[mask].sum()) / t.shape[-1]
            if grams is not None:
                rows = g[mask].double()
                grams[(k[0], k[2])] = grams.get((k[0], k[2]), 0) + rows.T @ rows
            j += 1
    return kb, ks


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "opt"])
def test_block_and_sublayer_sensitivities_equal_a_whole_model_backward(arch):
    model = make_model(arch)
    ids = calib_ids(4, 16)
    spec = get_spec(model)
    sens = block_sensitivities(model, spec, [ids[:2], ids[2:]], "cpu")
    kb, ks = _direct(model, ids)
    assert sens.block == pytest.approx(kb, rel=1e-4)
    assert [set(d) for d in sens.sublayer] == [{"attn", "mlp"}] * len(kb)
    for i, d in enumerate(sens.sublayer):
        for g, k in d.items():
            assert k == pytest.approx(ks[(i, g)], rel=1e-4)
            assert k > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_output_gradient_grams_equal_a_whole_model_backward(arch):
    """out_grams: per output linear of each sub-layer, Σ_t g g^T of the loss's gradient there."""
    model = make_model(arch)
    ids = calib_ids(4, 16)
    spec = get_spec(model)
    sens = block_sensitivities(model, spec, [ids[:2], ids[2:]], "cpu", out_grams=True)
    ref: dict[tuple[int, str], torch.Tensor] = {}
    _direct(model, ids, grams=ref)
    got = {(i, r): g for i, d in enumerate(sens.out_grams) for r, g in d.items()}
    assert set(got) == set(ref) and len({r for _, r in got}) == 2  # o / c_proj, down / mlp proj
    for key, g in got.items():
        assert g.shape == ref[key].shape
        assert torch.allclose(
            g.double(), ref[key], rtol=1e-4, atol=1e-6 * float(ref[key].abs().max())
        )
    assert block_sensitivities(model, spec, [ids], "cpu").out_grams == []


def test_blocks_without_both_sublayers_are_not_split():
    model = make_model("mamba")
    sens = block_sensitivities(model, get_spec(model), [calib_ids(2, 16)], "cpu")
    assert len(sens.block) == 2 and all(k > 0 for k in sens.block)
    assert sens.sublayer == [{}, {}]


@pytest.mark.parametrize("arch", ["llama", "opt"])  # opt: its MLP's outputs are flattened tokens
def test_tokens_with_a_massive_update_are_left_out(arch):
    """A token whose block update is 1000x the others' (an attention sink) is not counted."""
    model = make_model(arch)
    spec = get_spec(model)
    block = get_blocks(model, spec)[0]

    def massive(_m, a, y):
        out = y[0] if isinstance(y, tuple) else y
        out = out.clone()
        out[:, 0] = a[0][:, 0] + 1e3 * (out[:, 0] - a[0][:, 0])
        return (out, *y[1:]) if isinstance(y, tuple) else out

    handle = block.register_forward_hook(massive)
    try:
        ids = calib_ids(4, 16)
        every = block_sensitivities(model, spec, [ids], "cpu")
        trimmed = block_sensitivities(model, spec, [ids], "cpu", outlier=100.0, out_grams=True)
        grams: dict[tuple[int, str], torch.Tensor] = {}
        kb, ks = _direct(model, ids, outlier=100.0, grams=grams)
    finally:
        handle.remove()
    assert trimmed.block == pytest.approx(kb, rel=1e-4)
    for i, d in enumerate(trimmed.sublayer):
        for g, k in d.items():
            assert k == pytest.approx(ks[(i, g)], rel=1e-4)
    for (i, r), g in grams.items():  # the gradient Grams leave the same tokens out
        tol = 1e-6 * float(g.abs().max())
        assert torch.allclose(trimmed.out_grams[i][r].double(), g, rtol=1e-4, atol=tol)
    assert trimmed.block[0] < every.block[0]  # the massive tokens were left out
    if arch == "llama":  # where the first token's gradient is not small, most of block 0's κ
        assert trimmed.block[0] < 0.9 * every.block[0]
    assert all(k > 0 for k in trimmed.block)
