"""LoRAP: channel scores and selection by hand, the pruned MLP against the original, low-rank-degree
ranks under grouped-query attention, achieved ratio, options, and save -> load."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import transformers as tf
from torch import nn

import factorlm
from conftest import VOCAB, calib_ids, make_model
from factorlm.arch import get_blocks, get_spec, linear_weight
from factorlm.errors import ConfigError
from factorlm.methods import pruning
from factorlm.methods.lorap import attention_fractions, attention_ranks, find_units

KW = dict(n_samples=16, seqlen=32, progress=False)


def run(model, ratio=0.2, **options):
    return factorlm.compress(
        model, method="lorap", ratio=ratio, calibration=calib_ids(), **KW, **options
    )


@functools.cache
def _compressed(arch: str):
    model = make_model(arch)
    factorlm.arch.unfuse_experts(model)
    orig = copy.deepcopy(model)
    report = run(model)
    return orig, model, report


def compressed(arch):
    """(dense copy, compressed model, report) at ratio 0.2 with the defaults; shared, read-only."""
    return _compressed(arch)


def records(report, **where):
    return [r for r in report.modules if all(getattr(r, k) == v for k, v in where.items())]


# --- pure functions, by hand ---------------------------------------------------------------------


def hand_mlp():
    """6 channels, 2 input features; q_in = [4, 1], q_down = 4 everywhere.

    |W_up| row i = [c_i / 2, 0] -> norm c_i * 1; |W_gate| row i = [0, g_i] -> g_i;
    |W_down| column i = [d_i, 0] -> 2 d_i. Signs are mixed to check the absolute values.
    """
    c = torch.tensor([5.0, 1.0, 4.0, 2.0, 6.0, 3.0])
    g = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.5])
    d = torch.tensor([0.0, 0.25, 0.0, 0.0, 0.0, 0.0])
    W_up = torch.stack([-c / 2, torch.zeros(6)], 1).double()
    W_gate = torch.stack([torch.zeros(6), g * torch.tensor([1, 1, 1, 1, 1, -1.0])], 1).double()
    W_down = torch.stack([-d, torch.zeros(6)], 0).double()
    q_in = torch.tensor([4.0, 1.0], dtype=torch.float64)
    q_down = torch.full((6,), 4.0, dtype=torch.float64)
    expected = torch.tensor([5.5, 1.5, 4.0, 2.0, 6.0, 3.5], dtype=torch.float64)
    return W_up, W_gate, W_down, q_in, q_down, expected


def test_channel_scores_by_hand():
    W_up, W_gate, W_down, q_in, q_down, expected = hand_mlp()
    s = pruning.channel_scores([(W_gate, q_in), (W_up, q_in)], (W_down, q_down))
    torch.testing.assert_close(s, expected)
    # phi3's fused [gate; up] gives the same scores
    fused = pruning.channel_scores(
        [(torch.cat([W_gate, W_up]), q_in)], (W_down, q_down), fused=True
    )
    torch.testing.assert_close(fused, expected)
    # the mean-square weighting matters: q_in = 1 changes the up term from c_i to c_i / 2
    s1 = pruning.channel_scores([(W_gate, None), (W_up, None)], (W_down, q_down))
    torch.testing.assert_close(s1, expected - torch.tensor([5, 1, 4, 2, 6, 3.0]).double() / 2)


def test_selection_keeps_the_least_then_removes_the_next():
    *_, scores = hand_mlp()  # ascending order: 1 (1.5), 3 (2), 5 (3.5), 2 (4), 0 (5.5), 4 (6)
    n_least = pruning.num_least(6, 0.1)  # ceil(0.6) = 1 channel protected
    assert n_least == 1 and pruning.num_least(6, 0.0) == 0 and pruning.num_least(1536, 0.01) == 16
    assert pruning.select_channels(scores, 2, n_least).tolist() == [0, 1, 2, 4]
    assert pruning.select_channels(scores, 2, 0).tolist() == [0, 2, 4, 5]
    assert pruning.select_channels(scores, 0, 1).tolist() == list(range(6))
    with pytest.raises(ValueError):
        pruning.select_channels(scores, 6, 1)


def test_slicing_rows_fused_and_columns():
    W = torch.arange(12.0).reshape(6, 2)  # fused: 3 channels, rows [g0 g1 g2 u0 u1 u2]
    b = torch.arange(6.0)
    keep = torch.tensor([0, 2])
    Wk, bk = pruning.prune_rows(W, b, keep, fused=True)
    assert Wk.tolist() == [W[0].tolist(), W[2].tolist(), W[3].tolist(), W[5].tolist()]
    assert bk.tolist() == [0.0, 2.0, 3.0, 5.0]
    D = torch.arange(12.0).reshape(4, 3)
    assert pruning.prune_cols(D, keep).tolist() == D[:, [0, 2]].tolist()


def test_allocate_widths_meets_the_target_within_one_step():
    unit = pruning.UnitShape(channels=64, cost=96, n_least=1)
    for remove in (1, 500, 1108, 3000, 5000):
        (w,), got = pruning.allocate_widths([unit], remove, 8)
        assert w % 8 == 0 and got >= remove and got - remove < 8 * 96
        assert got == (64 - w) * 96
    assert pruning.allocate_widths([unit], 6000, 8) == ([8], 56 * 96)  # smallest width: short
    experts = [unit] * 4
    widths, got = pruning.allocate_widths(experts, 5000, 8)
    assert got >= 5000 and got - 5000 < 8 * 96 and max(widths) - min(widths) <= 8
    assert pruning.allocate_widths([unit], 0, 8) == ([64], 0)


def test_attention_ranks_low_rank_degree_and_dense_switch():
    # MHA, square: v and o keep a x the parameters of q and k
    shapes = {"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64)}
    total = 4 * 64 * 64
    ranks = attention_ranks(shapes, {"v", "o"}, 0.6 * total, a=3, multiple=1)
    assert (ranks["q"], ranks["k"], ranks["v"], ranks["o"]) == (
        7,
        6,
        19,
        19,
    )  # 6.4 / 19.2 + hand-back
    assert abs(ranks["v"] - 3 * ranks["k"]) <= 3
    removed = sum(m * n - ranks[k] * (m + n) for k, (m, n) in shapes.items())
    assert 0 <= removed - 0.6 * total < 128
    # at 20 % v / o would reach full rank: they stay dense, q and k take the cut
    ranks = attention_ranks(shapes, {"v", "o"}, 0.2 * total, a=3, multiple=8)
    assert ranks["v"] is None and ranks["o"] is None and ranks["q"] and ranks["k"]
    assert attention_fractions(shapes, {"v", "o"}, 0.8 * total, 3)["q"] == pytest.approx(0.6)


# --- on models ---------------------------------------------------------------------------------------


def kept_channels(W_orig: torch.Tensor, W_new: torch.Tensor) -> list[int]:
    """Original row index of every row of W_new (rows are exact copies)."""
    out = []
    for row in W_new:
        hits = torch.nonzero((W_orig == row).all(1)).flatten().tolist()
        assert len(hits) == 1
        out.append(hits[0])
    return out


def _units(model):
    spec = get_spec(model)
    from factorlm.arch.modules import block_targets

    for i, block in enumerate(get_blocks(model, spec)):
        for unit in find_units(spec, block_targets(block, spec)):
            yield i, block, unit


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "mixtral"])
def test_pruned_mlp_equals_original_restricted_to_kept_channels(arch):
    orig, model, report = compressed(arch)
    spec = get_spec(model)
    oblocks = get_blocks(orig, spec)
    n_checked = 0
    for i, block, unit in _units(model):
        ob = oblocks[i]
        first = unit.inputs[0]
        W_new, W_old = (
            linear_weight(block.get_submodule(first)),
            linear_weight(ob.get_submodule(first)),
        )
        assert isinstance(block.get_submodule(unit.output), nn.Linear)
        n_ch = linear_weight(ob.get_submodule(unit.output)).shape[1]
        if unit.fused:
            W_new, W_old = W_new[: W_new.shape[0] // 2], W_old[:n_ch]
        keep = kept_channels(W_old, W_new)
        assert keep == sorted(keep) and W_new.shape[0] < n_ch
        rec = records(report, name=f"{spec.blocks}.{i}.{unit.output}")[0]
        assert rec.kind == "pruned" and rec.width == len(keep)
        # the original MLP with the removed channels' down columns zeroed
        mlp_path = unit.output.rpartition(".")[0]
        old_mlp = copy.deepcopy(ob.get_submodule(mlp_path) if mlp_path else ob)
        removed = sorted(set(range(n_ch)) - set(keep))
        down = old_mlp.get_submodule(unit.output[len(mlp_path) + 1 :] if mlp_path else unit.output)
        with torch.no_grad():
            if type(down) is nn.Linear:
                down.weight[:, removed] = 0
            else:  # GPT-2 Conv1D (in x out)
                down.weight[removed, :] = 0
        new_mlp = block.get_submodule(mlp_path) if mlp_path else block
        if mlp_path:
            x = torch.randn(3, 5, W_old.shape[1], generator=torch.Generator().manual_seed(i))
            with torch.no_grad():
                torch.testing.assert_close(new_mlp(x), old_mlp(x), atol=1e-5, rtol=1e-5)
            n_checked += 1
    assert n_checked > 0


def test_block0_keeps_exactly_the_channels_the_score_says():
    orig, model, _ = compressed("llama")
    ob, nb = get_blocks(orig)[0], get_blocks(model)[0]
    xs = {}

    def hook(name):
        def f(_m, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            xs.setdefault(name, []).append(x)

        return f

    hs = [
        ob.mlp.gate_proj.register_forward_pre_hook(hook("in")),
        ob.mlp.down_proj.register_forward_pre_hook(hook("down")),
    ]
    with torch.no_grad():
        orig(calib_ids())  # block 0 sees the dense embeddings in the sequential run too
    for h in hs:
        h.remove()
    q_in = torch.cat(xs["in"]).square().mean(0)
    q_down = torch.cat(xs["down"]).square().mean(0)
    mlp = ob.mlp
    Wg, Wu, Wd = (m.weight.detach().double() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    scores = (  # the formula, written out independently of factorlm.methods.pruning
        (Wg.abs() * q_in.sqrt()).norm(dim=1)
        + (Wu.abs() * q_in.sqrt()).norm(dim=1)
        + (Wd.abs() * q_down.sqrt()[None, :]).norm(dim=0)
    )
    n_ch = scores.numel()
    width = nb.mlp.gate_proj.out_features
    order = torch.argsort(scores).tolist()  # ascending
    n_least = math.ceil(0.01 * n_ch)
    assert n_least == 1
    expect = sorted(order[:n_least] + order[n_least + n_ch - width :])
    assert kept_channels(mlp.gate_proj.weight, nb.mlp.gate_proj.weight) == expect
    assert kept_channels(mlp.up_proj.weight, nb.mlp.up_proj.weight) == expect
    assert order[0] in expect and order[1] not in expect  # the least important channel survives


def _gqa_model(kv_heads: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=128,
    )  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.config.architectures = [type(model).__name__]
    return model


def _frac(rec):
    return rec.params_after / rec.params_before


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_gqa_ranks_valid_and_low_rank_degree(kv_heads):
    model = _gqa_model(kv_heads)
    a = 3.0
    report = run(model, ratio=0.5, a=a, rank_multiple=1)
    for blk in range(2):
        rec = {
            r.name.rsplit(".", 1)[-1]: r
            for r in report.modules
            if f"layers.{blk}.self_attn" in r.name
        }
        for name, r in rec.items():
            m, n = r.shape
            assert r.kind == "lowrank", name
            assert 1 <= r.rank and r.rank * (m + n) < m * n
            assert r.params_after == r.rank * (m + n)
        assert rec["k_proj"].shape == (8 * kv_heads, 64)
        # k, v ranks come from their own shapes: same kept fraction as q (resp. o), one rank apart
        for narrow, wide in (("k_proj", "q_proj"), ("v_proj", "o_proj")):
            m, n = rec[narrow].shape
            assert abs(_frac(rec[narrow]) - _frac(rec[wide])) <= (m + n) / (m * n) + 1e-9
        # o has q's shape: a x its parameters (one rank step of slack each)
        q, o = rec["q_proj"], rec["o_proj"]
        assert abs(o.params_after - a * q.params_after) <= (a + 1) * 128
        if kv_heads == 8:  # plain MHA: params(v) = a x params(q) literally
            assert abs(rec["v_proj"].params_after - a * q.params_after) <= (a + 1) * 128


def test_default_ratio_keeps_v_o_dense_and_cuts_q_k():
    _, _, report = compressed("llama")
    for r in records(report, group="attn"):
        role = r.name.rsplit(".", 1)[-1]
        assert r.kind == ("dense" if role in ("v_proj", "o_proj") else "lowrank"), r.name
    attn_before = sum(r.params_before for r in records(report, group="attn"))
    attn_after = sum(r.params_after for r in records(report, group="attn"))
    assert 1 - attn_after / attn_before >= 0.2


def _block_step(model, report, rank_multiple=8, channel_multiple=8):
    """One channel step of the MLP units (the MLP absorbs the rounding), per block, in parameters."""
    steps = []
    for _i, block, unit in _units(model):
        m_out = linear_weight(block.get_submodule(unit.output)).shape[0]
        cost = m_out
        for rel in unit.inputs:
            mod = block.get_submodule(rel)
            per = 2 if unit.fused else 1
            cost += per * (linear_weight(mod).shape[1] + (mod.bias is not None))
        steps.append(channel_multiple * cost)
    return max(steps)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "phi", "phi3", "mixtral"])
def test_achieved_ratio_within_one_step(arch):
    _, model, report = compressed(arch)
    n_blocks = len(get_blocks(model))
    step = _block_step(model, report)
    assert report.achieved_ratio >= 0.2
    assert report.achieved_ratio - 0.2 <= n_blocks * (step + 1) / report.params_targeted_before
    assert report.params_targeted_after == sum(r.params_after for r in report.modules)
    assert report.params_targeted_before == sum(r.params_before for r in report.modules)
    assert report.params_total_after < report.params_total_before


@pytest.mark.parametrize("ratio", [0.1, 0.35])
def test_fine_steps_give_a_tight_ratio(ratio):
    model = make_model("llama")
    report = run(model, ratio=ratio, rank_multiple=1, channel_multiple=1)
    step = _block_step(model, report, 1, 1)
    assert ratio <= report.achieved_ratio <= ratio + 2 * (step + 1) / report.params_targeted_before


def test_sub_layer_ratio_options():
    model = make_model("llama")
    report = run(model, ratio=0.3, attn_ratio=0.1, channel_multiple=1, rank_multiple=1)
    attn = records(report, group="attn")
    frac = 1 - sum(r.params_after for r in attn) / sum(r.params_before for r in attn)
    assert 0.1 <= frac < 0.2  # the attention took its own share, the MLP the rest
    assert report.achieved_ratio >= 0.3
    model = make_model("llama")
    report = run(model, ratio=0.3, mlp_ratio=0.0)
    assert all(r.kind == "dense" for r in records(report, group="mlp"))
    assert report.achieved_ratio >= 0.3


def test_keep_least_changes_the_kept_channels():
    widths, gates = {}, {}
    for kl in (0.0, 0.01):
        model = make_model("llama")
        run(model, keep_least=kl)
        gates[kl] = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
        widths[kl] = gates[kl].shape[0]
    assert widths[0.0] == widths[0.01]
    assert not torch.equal(gates[0.0], gates[0.01])


def test_uniform_attention_gives_equal_shares():
    model = _gqa_model(2)
    report = run(model, ratio=0.5, uniform_attention=True, rank_multiple=1)
    rec = {r.name.rsplit(".", 1)[-1]: r for r in report.modules if "layers.0.self_attn" in r.name}
    fracs = [_frac(r) for r in rec.values()]
    assert all(r.kind == "lowrank" for r in rec.values())
    assert max(fracs) - min(fracs) <= 2 * (64 + 64) / (64 * 64)
    low_rank_degree = {
        r.name.rsplit(".", 1)[-1]: r
        for r in run(_gqa_model(2), ratio=0.5, rank_multiple=1).modules
        if "layers.0.self_attn" in r.name
    }
    assert _frac(low_rank_degree["o_proj"]) > 2 * _frac(low_rank_degree["q_proj"])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "phi3", "mixtral"])
def test_save_load_identical_logits(arch, tmp_path):
    _, model, report = compressed(arch)
    factorlm.save(model, tmp_path / "m", report=report)
    loaded = factorlm.load(tmp_path / "m")
    x = calib_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    assert factorlm.arch.modules.count_params(loaded) == report.params_total_after
    for rec in records(report, kind="pruned"):
        mod = loaded.get_submodule(rec.name)
        assert type(mod) is nn.Linear and rec.width in (
            mod.in_features,
            mod.out_features,
            mod.out_features // 2,
        )
    assert report.params_total_after < report.params_total_before


def test_bad_options_are_rejected():
    model = make_model("llama")
    with pytest.raises(ConfigError, match="no option"):
        run(model, alpha=0.5)
    for bad in (
        dict(a=0),
        dict(a="3"),
        dict(keep_least=0.9),
        dict(channel_multiple=0),
        dict(uniform_attention=1),
        dict(attn_ratio=1.0),
    ):
        with pytest.raises(ConfigError):
            run(model, **bad)
    with pytest.raises(ConfigError, match="allocation"):
        factorlm.compress(model, method="lorap", allocation="global", calibration=calib_ids(), **KW)


def test_report_records_every_target_with_exact_counts():
    _, model, report = compressed("qwen2")
    spec = get_spec(model)
    n_targets = len(factorlm.arch.model_targets(model, spec))
    assert len(report.modules) == n_targets
    for r in report.modules:
        mod = model.get_submodule(r.name)
        n = (
            mod.num_parameters()
            if isinstance(mod, factorlm.LowRankLinear)
            else sum(p.numel() for p in mod.parameters())
        )
        assert r.params_after == n
        if r.kind == "lowrank":
            assert r.rel_error is not None and 0 <= r.rel_error < 1
        if r.kind == "pruned":
            assert r.rel_error is not None and 0 < r.rel_error < 1
    assert math.isfinite(report.blocks[0].rel_output_error)


def test_refit_option_lowers_the_down_proj_error_and_keeps_the_shapes():
    plain_model, refit_model = make_model("llama"), make_model("llama")
    plain, refit = run(plain_model, ratio=0.4), run(refit_model, ratio=0.4, refit=True)
    downs = [
        (a, b)
        for a, b in zip(plain.modules, refit.modules, strict=True)
        if a.name.endswith("down_proj")
    ]
    assert downs and all(a.width == b.width and a.width is not None for a, b in downs)
    assert all(b.rel_error < a.rel_error for a, b in downs)
    assert plain.params_total_after == refit.params_total_after
    assert refit.blocks[0].rel_output_error < plain.blocks[0].rel_output_error
    # in the first block (same inputs in both runs) only down_proj differs
    for (n, p), (_, q) in zip(
        plain_model.named_parameters(), refit_model.named_parameters(), strict=True
    ):
        if ".layers.0." in n and "down_proj" not in n:
            assert torch.equal(p, q), n


def test_attention_ranks_keep_unprofitable_factorizations_dense():
    # SmolLM2's attention: k / v are 192 x 576 (GQA)
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576)}
    total = sum(m * n for m, n in shapes.values())
    plain = attention_ranks(shapes, {"v", "o"}, 0.05 * total, a=3, multiple=8)
    saved = {
        k: m * n - (m * n if plain[k] is None else plain[k] * (m + n))
        for k, (m, n) in shapes.items()
    }
    assert plain["k"] is not None and 0 < saved["k"] < 16_384  # k barely pays without the floor
    ranks = attention_ranks(shapes, {"v", "o"}, 0.05 * total, a=3, multiple=8, min_saving=16_384)
    assert ranks["k"] is None and ranks["q"] is not None
    removed = sum(
        m * n - (m * n if ranks[k] is None else ranks[k] * (m + n)) for k, (m, n) in shapes.items()
    )
    assert removed >= 0.05 * total  # q took k's cut
    assert all(
        m * n - r * (m + n) >= 16_384 for k, (m, n) in shapes.items() if (r := ranks[k]) is not None
    )
    # nothing pays: the attention stays dense (the MLP takes the cut)
    assert attention_ranks(shapes, {"v", "o"}, 0.01 * total, min_saving=10**9) == dict.fromkeys(
        shapes
    )
