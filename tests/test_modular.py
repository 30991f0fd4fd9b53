"""The ``modular`` recipe on tiny random models of every supported architecture."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import factorlm
from conftest import ARCHS, calib_ids, compress_tiny, make_model
from factorlm.arch.modules import count_params
from factorlm.errors import ConfigError


@functools.cache
def _compressed(arch: str, ratio: float = 0.3, allocation: str = "uniform", **options):
    # tiny matrices save fewer weights than a CPU kernel launch costs: min_saving=0 keeps their
    # attention low-rank (the default is tested on its own)
    options.setdefault("min_saving", 0)
    model = make_model(arch)
    return model, compress_tiny(model, ratio=ratio, allocation=allocation, **options)


def _check_round_trip(model, report, tmp_path) -> None:
    """Saved, reloaded with both loaders to equal logits, densified to the same function, and the
    reloaded parameter count is the report's."""
    x = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        ref = model(x).logits
    out = factorlm.save(model, tmp_path / "m", report=report)
    m1 = factorlm.load(out)
    m2 = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    dense = factorlm.densify(m1)
    with torch.no_grad():
        assert torch.equal(m1(x).logits, ref)
        assert torch.equal(m2(x).logits, ref)
        torch.testing.assert_close(dense(x).logits, ref, atol=1e-4, rtol=1e-4)
    assert count_params(m1) == report.params_total_after


@pytest.mark.parametrize("allocation", ["loss", "uniform"])  # "loss": the recipe's default
@pytest.mark.parametrize("arch", ARCHS)
def test_compresses_saves_reloads_densifies(arch, allocation, tmp_path):
    model, report = _compressed(arch, allocation=allocation)
    assert report.achieved_ratio >= 0.3 - 0.08  # within one rank / channel step of tiny shapes
    assert report.params_total_after < report.params_total_before
    _check_round_trip(model, report, tmp_path)
    if allocation == "loss":  # the default recipe weighs its MLP channel choice in the loss metric
        notes = {n for r in report.modules for n in r.notes}
        # (not a routed expert's: its rows are not one per token, so it has no gradient Gram)
        weighed = arch != "mixtral" and any(r.kind == "pruned" for r in report.modules)
        assert ("channels chosen in the loss's output metric (loss_metric)" in notes) is weighed


@pytest.mark.parametrize("arch", ["llama", "mixtral", "phi3", "gpt2"])
def test_anchored_two_stream_variant(arch):
    model, report = _compressed(arch, 0.3, anchored=True)
    assert report.achieved_ratio >= 0.3 - 0.08
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids(2, 16, seed=5)).logits).all()
    # the two streams differ after block 0, so the anchored fit differs from the one-stream fit
    _, plain = _compressed(arch, 0.3)
    errs = [r.rel_error for r in report.modules if r.name.startswith(f"{_prefix(arch)}.1.")]
    plain_errs = [r.rel_error for r in plain.modules if r.name.startswith(f"{_prefix(arch)}.1.")]
    assert errs != plain_errs


def _block_weights(index: int, **options) -> dict[str, torch.Tensor]:
    """Block ``index``'s weights of the tiny llama compressed by ``modular`` at 0.3 with ``options``."""
    model, _ = _compressed("llama", 0.3, **options)
    return {k: v for k, v in model.state_dict().items() if f".layers.{index}." in k}


def test_anchor_weight_interpolates_between_plain_and_anchored():
    """anchor_weight=0 gives the plain fits' weights, 1 the anchored ones, 0.5 neither."""
    plain, full = (
        _block_weights(1, refit_o=False, compensate=False),
        _block_weights(1, anchored=True),
    )
    none = _block_weights(1, anchored=True, anchor_weight=0.0)
    half = _block_weights(1, anchored=True, anchor_weight=0.5)
    same_shapes = [k for k in plain if k in full and plain[k].shape == full[k].shape]
    assert any(not torch.equal(plain[k], full[k]) for k in same_shapes)
    for k in plain:
        torch.testing.assert_close(none[k], plain[k], atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(half[k], plain[k], atol=1e-5) for k in same_shapes)
    assert any(not torch.allclose(half[k], full[k], atol=1e-5) for k in same_shapes)


def test_anchor_mlp_false_anchors_the_attention_only():
    """anchor_mlp=False: the down_proj refit is the plain one. In block 0 both streams enter
    equal, so the anchored attention is the plain one and the whole block must match the plain
    run's, while the fully anchored run's down_proj (anchored to the dense MLP input) differs."""
    plain, full = (
        _block_weights(0, refit_o=False, compensate=False),
        _block_weights(0, anchored=True),
    )
    attn_only = _block_weights(0, anchored=True, anchor_mlp=False)
    for k in plain:
        torch.testing.assert_close(attn_only[k], plain[k], atol=1e-5, rtol=1e-4)
    down = [k for k in full if "down_proj" in k]
    assert down and any(not torch.allclose(full[k], plain[k], atol=1e-5) for k in down)


def test_anchor_mlp_false_runs_the_dense_stream_once_per_block(monkeypatch):
    """The dense stream goes through each block once (the attention's pass); the MLP's pass, with
    nothing of it to read, does not run it again (through the half-compressed block)."""
    import factorlm.methods.modular_pass as modular

    taps = []

    class Counting(modular.InputTap):
        def __enter__(self):
            taps.append(1)
            return super().__enter__()

    monkeypatch.setattr(modular, "InputTap", Counting)
    model = make_model("llama")
    compress_tiny(model, ratio=0.3, anchored=True, anchor_mlp=False, min_saving=0)
    assert len(taps) == model.config.num_hidden_layers * 4  # 16 sequences in batches of 4


def _prefix(arch: str) -> str:
    from factorlm.arch.modules import get_spec

    return get_spec(make_model(arch)).blocks


def test_parameter_counts_follow_the_formulas():
    _, report = _compressed("llama")
    seen = set()
    for rec in report.modules:
        m, n = rec.shape
        if rec.kind == "lowrank":
            assert rec.params_after == rec.rank * (m + n)
        elif rec.kind == "pruned":  # gate/up lose rows, down loses columns: width x the other side
            other = n if rec.name.endswith(("gate_proj", "up_proj")) else m
            assert rec.params_after == rec.width * other
            seen.add(rec.kind)
    assert seen == {"pruned"}


def test_keeping_everything_reproduces_the_dense_model():
    model = make_model("llama")
    x = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        ref = model(x).logits
    factorlm.compress(
        model,
        method="modular",
        ratio=0.2,
        attn_ratio=0.0,
        mlp_ratio=0.0,
        calibration=calib_ids(),
        progress=False,
    )
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_refit_lowers_the_first_block_error():
    _, with_refit = _compressed("llama", 0.4, anchored=False)
    _, without = _compressed("llama", 0.4, anchored=False, refit=False)
    assert with_refit.blocks[0].rel_output_error < without.blocks[0].rel_output_error


@pytest.mark.parametrize("select", ["lorap", "leverage", "energy", "greedy"])
def test_selection_rules_keep_the_planned_width(select):
    model, report = _compressed("llama", 0.4, select=select)
    widths = {r.width for r in report.modules if r.kind == "pruned"}
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.down_proj, nn.Linear) and mlp.down_proj.in_features in widths
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features


@pytest.mark.parametrize(
    "options",
    [
        {"select": "best"},
        {"a": -1},
        {"anchored": "yes"},
        {"mlp_ratio": 1.5},
        {"attn_ratio": "blocks"},
        {"attn_ratio": 1.0},
        {"rank": 3},
        {"anchor_weight": 1.5},
        {"anchor_mlp": "no"},
        {"loss_metric": "yes"},
        {"loss_metric": True, "loss_metric_shrink": 1.5},
        {"loss_metric": True, "allocation": "uniform"},
        {"loss_metric": True, "select": "lorap"},
    ],
)
def test_bad_options_are_refused_before_any_work(options, monkeypatch):
    import factorlm.api as api

    def boom(*a, **k):  # calibration is the first heavy step
        raise AssertionError("calibration was built before the options were checked")

    monkeypatch.setattr(api, "build_calibration", boom)
    with pytest.raises(ConfigError):
        factorlm.compress(make_model("llama"), method="modular", ratio=0.2, **options)


def test_loss_aware_allocation_meets_the_budget_and_follows_sensitivity():
    from factorlm.rank.loss_aware import loss_aware_ratios

    params = [10, 10, 20, 10]
    r = loss_aware_ratios([1.0, 4.0, 1.0, 0.25], params, 0.3, gamma=0.5)
    assert abs(sum(p * x for p, x in zip(params, r, strict=True)) - 0.3 * sum(params)) < 1e-9
    assert r[1] < r[0] == r[2] < r[3]  # the more sensitive block loses less
    assert (
        loss_aware_ratios([1.0, 4.0, 1.0, 0.25], params, 0.3, gamma=0.0) == [pytest.approx(0.3)] * 4
    )


def test_loss_aware_compression_on_a_tiny_model():
    model, report = _compressed("llama", 0.3, allocation="loss")
    info = report.calibration["loss_aware"]
    assert len(info["sensitivity"]) == len(info["block_ratios"]) == 2
    assert all(k > 0 for k in info["sensitivity"])
    assert report.achieved_ratio >= 0.3 - 0.08
    # the block the loss is more sensitive to keeps more of its parameters
    lo, hi = sorted(range(2), key=lambda i: info["sensitivity"][i])
    kept = [0, 0]
    for rec in report.modules:
        kept[int(rec.name.split(".")[2])] += rec.params_after
    assert kept[hi] >= kept[lo]


@pytest.mark.parametrize("samples", [5, None])
def test_loss_aware_sensitivities_use_loss_samples_sequences(samples):
    from factorlm.methods.modular import ModularConfig

    options = {} if samples is None else {"loss_samples": samples}
    _, report = _compressed("llama", 0.3, allocation="loss", **options)
    expected = ModularConfig().loss_samples if samples is None else samples
    assert report.calibration["loss_aware"]["sequences"] == expected < 16  # of 16, batches of 4


def test_loss_batches_are_the_same_sequences_for_any_number_of_processes(monkeypatch):
    from factorlm import distributed
    from factorlm.methods import modular_alloc

    batches = [torch.full((4, 3), i) for i in range(4)]
    chosen, rows = modular_alloc.loss_batches(batches, 5)
    assert [b[:, 0].tolist() for b in chosen] == [[0, 0, 0, 0], [1]] and rows == 5
    monkeypatch.setattr(distributed, "world_size", lambda: 3)  # one batch per process at least
    chosen, rows = modular_alloc.loss_batches(batches, 3)
    assert [b[:, 0].tolist() for b in chosen] == [[0, 0, 0], [1], [2]] and rows == 5


def test_loss_allocation_is_refused_for_other_methods():
    with pytest.raises(ConfigError, match="allocation 'loss'"):
        factorlm.compress(make_model("llama"), method="svd-llm", ratio=0.2, allocation="loss")


# attention as modules: which roles become head modules (q/k need no per-head norm; fused qkv and
# state-space blocks keep the low-rank plan)
HEAD_ROLES = {
    "qwen3": {"v", "o"},
    "gpt2": set(),
    "phi3": set(),
    "mamba": set(),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_as_modules_saves_reloads_densifies(arch, tmp_path):
    from factorlm.arch.modules import get_spec

    model, report = _compressed(arch, 0.5, attention="modules", attn_ratio="block")
    spec = get_spec(model)
    assert report.achieved_ratio >= 0.5 - 0.08
    heads = {
        spec.role_of(r.name.split(".", spec.blocks.count(".") + 2)[-1])
        for r in report.modules
        if r.kind == "heads"
    }
    assert heads == HEAD_ROLES.get(arch, {"q", "k", "v", "o"})
    _check_round_trip(model, report, tmp_path)
    for (
        rec
    ) in report.modules:  # a head module's parameters: its kept rows / columns x the other side
        if rec.kind == "heads":
            m, n = rec.shape
            other = m if rec.name.endswith(("o_proj", "out_proj", "dense")) else n
            bias = rec.width if other == n and rec.params_after % other else 0
            assert rec.params_after in (rec.width * other + bias, rec.width * other + m)


def test_attention_modules_spend_no_more_than_the_low_rank_plan_per_pair():
    """The head modules get each pair's (q+k, v+o) planned low-rank parameters, and spend at most
    that on whole head dimensions: the model is no larger than the low-rank recipe's."""
    _, low = _compressed("llama", 0.5)
    _, mod = _compressed("llama", 0.5, attention="modules")

    def per_pair(report):
        out: dict[tuple[str, str], int] = {}
        for r in report.modules:
            block, leaf = r.name.rsplit(".", 2)[0], r.name.rsplit(".", 1)[-1]
            pair = {"q_proj": "qk", "k_proj": "qk", "v_proj": "vo", "o_proj": "vo"}.get(leaf)
            if pair:
                out[block, pair] = out.get((block, pair), 0) + r.params_after
        return out

    low_p, mod_p = per_pair(low), per_pair(mod)
    assert low_p.keys() == mod_p.keys() and len(mod_p) == 4
    for key, n in mod_p.items():
        assert n <= low_p[key]
    kinds = {r.kind for r in mod.modules}
    assert "heads" in kinds and "lowrank" not in kinds
    assert mod.params_total_after <= low.params_total_after


def test_loss_aware_split_gives_each_sublayer_its_own_ratio():
    model, report = _compressed(
        "llama", 0.3, allocation="loss", rank_multiple=1, channel_multiple=1, loss_split=True
    )
    info = report.calibration["loss_aware"]
    n = len(info["block_ratios"])
    assert (
        len(info["attn_ratios"])
        == len(info["mlp_ratios"])
        == len(info["sublayer_sensitivity"])
        == n
    )
    removed = {(i, g): [0, 0] for i in range(n) for g in ("attn", "mlp")}
    for rec in report.modules:
        i = int(rec.name.split(".")[2])
        acc = removed[(i, rec.group)]
        acc[0] += rec.params_before - rec.params_after
        acc[1] += rec.params_before
    for i in range(n):
        # each sub-layer loses its own ratio (within a rank / channel step), not the block's
        for g, key in (("attn", "attn_ratios"), ("mlp", "mlp_ratios")):
            got, total = removed[(i, g)]
            assert got / total == pytest.approx(info[key][i], abs=0.05)
    # the sub-layer the loss is more sensitive to loses less (sensitivities differ on this model)
    flat = [
        (d[g], info[f"{g}_ratios"][i])
        for i, d in enumerate(info["sublayer_sensitivity"])
        for g in ("attn", "mlp")
    ]
    flat.sort()
    assert [r for _, r in flat] == sorted((r for _, r in flat), reverse=True)
    # loss_split=False (the default): no per-block attention ratios (the default rule's share)
    _, report2 = _compressed("llama", 0.3, allocation="loss")
    assert "attn_ratios" not in report2.calibration["loss_aware"]


def test_default_keeps_factorizations_that_save_less_than_a_launch_dense():
    # on CPU a factorization must save 16,384 weights; none of the tiny model's does, so its
    # attention stays dense and the MLP takes the whole cut
    model, report = _compressed("llama", 0.3, min_saving=None)
    assert report.calibration["min_saving"] == 16_384
    assert not [r for r in report.modules if r.kind == "lowrank"]
    assert report.achieved_ratio >= 0.3 - 0.05
    _, low = _compressed("llama", 0.3, min_saving=0)
    assert [r for r in low.modules if r.kind == "lowrank"]


def _o_outputs(model, ids) -> torch.Tensor:
    """Block 0's attention output (o_proj's output) on ``ids``."""
    from factorlm.arch.modules import get_blocks, get_spec

    out = []
    o = get_blocks(model, get_spec(model))[0].self_attn.o_proj
    handle = o.register_forward_hook(lambda _m, _a, y: out.append(y))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return out[0]


@pytest.mark.parametrize(("options", "kind"), [({}, "lowrank"), ({"attn_ratio": 0.1}, "dense")])
def test_refit_o_fits_the_attention_output_through_the_compressed_qkv(options, kind):
    """refit_o: block 0's o_proj, fitted again on the compressed q/k/v's output (low-rank, or a
    dense least-squares refit where o_proj stays dense), reproduces the dense attention output on
    the calibration tokens better than the fit on the dense q/k/v's (or the untouched o_proj)."""
    ids = calib_ids()
    ref = _o_outputs(make_model("llama"), ids)
    options = {"attn_ratio": "block", **options}  # at 0.4 o_proj low-rank, at 0.1 dense
    plain, _ = _compressed("llama", 0.4, refit_o=False, **options)
    refit, report = _compressed("llama", 0.4, **options)
    rec = next(r for r in report.modules if r.name.endswith("layers.0.self_attn.o_proj"))
    assert rec.kind == kind
    err = {
        k: float((_o_outputs(m, ids) - ref).square().sum()) for k, m in [("p", plain), ("r", refit)]
    }
    assert err["r"] < 0.95 * err["p"]


@pytest.mark.parametrize("arch", ["gpt2", "qwen3", "mixtral"])
def test_without_refit_o_compresses_saves_reloads(arch, tmp_path):
    model, report = _compressed(arch, 0.3, refit_o=False)
    assert report.achieved_ratio >= 0.3 - 0.08
    _check_round_trip(model, report, tmp_path)


def _qk_inputs(model, ids) -> torch.Tensor:
    """Block 0's q_proj input on ``ids`` (tokens x hidden)."""
    from factorlm.arch.modules import get_blocks, get_spec

    out = []
    q = get_blocks(model, get_spec(model))[0].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda _m, a: out.append(a[0]))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return out[0].reshape(-1, out[0].shape[-1])


def _score_error(dense, model, X) -> float:
    """Block 0's pre-rotary attention scores q_h^T k_g over all token pairs of ``X``: squared
    error of ``model``'s q/k against ``dense``'s (GQA: head h reads key head h // group)."""
    cfg = dense.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    total = 0.0
    attn = [m.model.layers[0].self_attn for m in (dense, model)]
    with torch.no_grad():
        (q0, k0), (q1, k1) = [(a.q_proj(X), a.k_proj(X)) for a in attn]
    for h in range(cfg.num_attention_heads):
        qs, ks = slice(h * hd, (h + 1) * hd), slice((h // g) * hd, (h // g + 1) * hd)
        total += float((q0[:, qs] @ k0[:, ks].T - q1[:, qs] @ k1[:, ks].T).square().sum())
    return total


def test_qk_scores_fit_q_and_k_for_the_attention_scores():
    """Block 0's low-rank q/k, each fitted in the other's score metric, change the attention
    scores on the calibration tokens less than the plain whitened fits at the same ranks."""
    dense = make_model("llama")
    X = _qk_inputs(dense, calib_ids())
    plain, plain_rep = _compressed("llama", 0.4, qk_scores=False)
    scored, report = _compressed("llama", 0.4)
    recs = {r.name: r for r in report.modules}
    for rel in ("q_proj", "k_proj"):
        rec = recs[f"model.layers.0.self_attn.{rel}"]
        assert rec.kind == "lowrank"
        assert "fitted for the attention scores (qk_scores)" in rec.notes
    assert [r.rank for r in report.modules] == [r.rank for r in plain_rep.modules]
    assert _score_error(dense, scored, X) < 0.9 * _score_error(dense, plain, X)


def test_qk_scores_leave_per_head_normed_q_and_k_to_the_plain_fits():
    """qwen3 normalises each q/k head before the scores: its q/k keep the plain fits."""
    scored, report = _compressed("qwen3", 0.4)
    plain, _ = _compressed("qwen3", 0.4, qk_scores=False)
    assert not any("qk_scores" in n for r in report.modules for n in r.notes)
    for rel in ("q_proj", "k_proj"):
        a = scored.model.layers[0].self_attn.get_submodule(rel)
        b = plain.model.layers[0].self_attn.get_submodule(rel)
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def _layer_modules(model, rel):
    return [b.get_submodule(rel) for b in model.model.layers]


def test_loss_metric_measures_each_fit_in_its_own_outputs_metric(tmp_path, monkeypatch):
    """down_proj's channel choice in the metric of the loss's gradient Gram at down_proj's output,
    o_proj's fit in o_proj's, v_proj's in o_proj's seen through o_proj's columns; unshrunk, the
    metric changes the kept channels."""
    from factorlm.methods import loss_metric, modular, modular_alloc

    grams, seen = [], {}
    real_sens, real_prune, real_fit = (
        modular_alloc.block_sensitivities,
        modular.prune_unit,
        modular.lowrank_fit,
    )

    def sens(*a, **k):
        out = real_sens(*a, **k)
        grams.extend(out.out_grams)
        return out

    def prune(ctx, unit, *a, out_metric=None, **k):
        seen[(ctx.index, unit.output)] = out_metric
        return real_prune(ctx, unit, *a, out_metric=out_metric, **k)

    def fit(ctx, rel, rank, stats, rec, ridge, out_metric=None, **k):
        if rel.endswith(("v_proj", "o_proj")):
            seen[(ctx.index, rel)] = (out_metric, ctx.targets["self_attn.o_proj"].weight.clone())
        return real_fit(ctx, rel, rank, stats, rec, ridge, out_metric=out_metric, **k)

    monkeypatch.setattr(modular_alloc, "block_sensitivities", sens)
    monkeypatch.setattr(modular, "prune_unit", prune)
    monkeypatch.setattr(modular, "lowrank_fit", fit)
    opts = {"allocation": "loss", "rank_multiple": 1, "channel_multiple": 1, "min_saving": 0}
    opts["attn_ratio"] = "block"  # v_proj / o_proj low-rank on these tiny shapes
    model = make_model("llama")
    rep = compress_tiny(model, ratio=0.4, loss_metric=True, loss_metric_shrink=0.2, **opts)
    kinds = {r.name.rsplit(".", 1)[-1]: r.kind for r in rep.modules}
    assert kinds["v_proj"] == kinds["o_proj"] == "lowrank" and kinds["down_proj"] == "pruned"
    for i, g in enumerate(grams):
        M_down = loss_metric.shrunk_metric(g["mlp.down_proj"], 0.2)
        M_o = loss_metric.shrunk_metric(g["self_attn.o_proj"], 0.2)
        torch.testing.assert_close(seen[(i, "mlp.down_proj")], M_down)
        torch.testing.assert_close(seen[(i, "self_attn.o_proj")][0], M_o)
        v_metric, Wo = seen[(i, "self_attn.v_proj")]
        cfg = model.config
        hd = cfg.hidden_size // cfg.num_attention_heads
        W = Wo.double().reshape(-1, cfg.num_attention_heads, hd)
        per_head = torch.einsum("mhd,mn,nhe->hde", W, M_o, W)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        expected = per_head.reshape(cfg.num_key_value_heads, group, hd, hd).sum(1)
        torch.testing.assert_close(v_metric, expected)
    assert len(grams) == 2
    notes = {n for r in rep.modules for n in r.notes}
    assert "channels chosen in the loss's output metric (loss_metric)" in notes
    assert "fitted in the loss's output metric (loss_metric)" in notes
    monkeypatch.undo()
    plain, _ = _compressed("llama", 0.4, **opts)
    assert any(
        not torch.equal(a.weight, b.weight)
        for a, b in zip(
            _layer_modules(plain, "mlp.gate_proj"),
            _layer_modules(model, "mlp.gate_proj"),
            strict=True,
        )
    )
    _check_round_trip(model, rep, tmp_path)


@pytest.mark.parametrize("select", ["greedy", "energy"])
def test_channel_scores_weigh_the_output_in_the_given_metric(select):
    """channel_scores with out_metric M scores M^1/2 W_down: different from the plain scores on
    this example, equal to them for M = I."""
    from types import SimpleNamespace

    from factorlm.calibration.stats import LayerStats
    from factorlm.methods.anchored import greedy_refit_channels, weighted_energy
    from factorlm.methods.linalg import metric_roots
    from factorlm.methods.lorap import Unit
    from factorlm.methods.modular_mlp import channel_scores

    g = torch.Generator().manual_seed(0)
    down = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        down.weight.copy_(torch.randn(4, 8, generator=g))
    H = torch.randn(8, 8, generator=g, dtype=torch.float64) @ torch.randn(
        8, 60, generator=g, dtype=torch.float64
    )
    stats = {"down": LayerStats(n_tokens=60, gram=H @ H.T)}
    ctx = SimpleNamespace(prefix="b", targets={"down": down}, report=SimpleNamespace(warnings=[]))
    unit = Unit(("up",), "down", False)
    config = SimpleNamespace(select=select, ridge=0.0)
    a = torch.randn(4, 1, generator=g, dtype=torch.float64)
    M = a @ a.T + 0.01 * torch.eye(4, dtype=torch.float64)
    W = down.weight.detach().double()
    Wm = metric_roots(M)[0] @ W
    expected = (
        greedy_refit_channels(Wm, H @ H.T, 5, 0.0)
        if select == "greedy"
        else weighted_energy(Wm, H @ H.T)
    )
    got = channel_scores(ctx, unit, stats, config, 5, out_metric=M)
    torch.testing.assert_close(got, expected)
    plain = channel_scores(ctx, unit, stats, config, 5)
    assert not torch.equal(got.argsort(), plain.argsort())
    eye = channel_scores(ctx, unit, stats, config, 5, out_metric=torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(eye, plain)


def test_loss_metric_with_attention_modules_still_weighs_the_mlp_choice():
    _, rep = _compressed(
        "llama", 0.4, allocation="loss", attention="modules", loss_metric=True, channel_multiple=1
    )
    notes = {n for r in rep.modules for n in r.notes}
    assert "channels chosen in the loss's output metric (loss_metric)" in notes
    assert "fitted in the loss's output metric (loss_metric)" not in notes  # head modules


@pytest.mark.parametrize(
    ("options", "weighed"),
    [
        ({}, True),  # the recipe: loss-aware allocation, greedy channels
        ({"loss_metric": False}, False),
        ({"select": "lorap"}, False),  # LoRAP's score measures no output error
        ({"allocation": "uniform"}, False),  # no backward pass to measure the metric
    ],
)
def test_the_recipe_measures_its_fits_in_the_loss_metric_where_it_applies(options, weighed):
    # modular's default allocation; the attention losing 40 % (v_proj / o_proj low-rank here)
    options = {"allocation": "loss", "attn_ratio": "block", **options}
    _, rep = _compressed("llama", 0.4, channel_multiple=1, **options)
    notes = {n for r in rep.modules for n in r.notes}
    assert ("channels chosen in the loss's output metric (loss_metric)" in notes) is weighed
    assert ("fitted in the loss's output metric (loss_metric)" in notes) is weighed
