"""How ``modular`` splits each block's budget between its attention and its MLP
(:mod:`factorlm.methods.modular_alloc`), and the config versions that changed its default."""

from __future__ import annotations

import pytest

from conftest import compress_tiny, make_model
from factorlm.methods.base import config_from_dict
from factorlm.methods.modular import ModularConfig
from factorlm.methods.modular_alloc import (
    ATTN_CUT,
    GAMMA_MAX,
    default_attn_ratio,
    default_loss_gamma,
)

# tiny shapes: one rank / channel per step, every factorization kept, ratios that differ per block
EXACT = {"rank_multiple": 1, "channel_multiple": 1, "min_saving": 0}


def _sublayer_ratios(report) -> dict[tuple[int, str], float]:
    """(block, "attn" / "mlp") -> fraction of that sub-layer's targeted parameters removed."""
    acc: dict[tuple[int, str], list[int]] = {}
    for rec in report.modules:
        key = (int(rec.name.split(".")[2]), rec.group)
        a = acc.setdefault(key, [0, 0])
        a[0] += rec.params_before - rec.params_after
        a[1] += rec.params_before
    return {k: removed / total for k, (removed, total) in acc.items()}


def _loss_aware(**options):
    model = make_model("llama")
    # loss_gamma=8 spreads the two blocks' ratios (0.145 / 0.175 on this model)
    return compress_tiny(model, ratio=0.16, allocation="loss", loss_gamma=8, **EXACT, **options)


def test_by_default_every_blocks_attention_loses_the_same_share():
    report = _loss_aware()
    got = _sublayer_ratios(report)
    blocks = report.calibration["loss_aware"]["block_ratios"]
    assert abs(blocks[0] - blocks[1]) > 0.02  # the budget differs per block ...
    for i in range(2):  # ... the attention's cut does not: the MLP takes the difference
        assert got[(i, "attn")] == pytest.approx(default_attn_ratio(0.16), abs=0.02)
    assert got[(0, "mlp")] < got[(1, "mlp")]
    assert report.achieved_ratio == pytest.approx(0.16, abs=0.01)


def test_attn_ratio_block_gives_each_attention_its_blocks_ratio():
    report = _loss_aware(attn_ratio="block")
    got = _sublayer_ratios(report)
    for i, r in enumerate(report.calibration["loss_aware"]["block_ratios"]):
        assert got[(i, "attn")] == pytest.approx(r, abs=0.02)
    assert got[(0, "attn")] < got[(1, "attn")]


def test_the_default_rule_grows_with_the_ratio_up_to_its_cap():
    ratios = [0.02, 0.1, 0.2, 0.3, 0.5, 0.9]
    cuts = [default_attn_ratio(r) for r in ratios]
    assert cuts == sorted(cuts) and max(cuts) == ATTN_CUT
    assert all(0 < c < 1 for c in cuts)


@pytest.mark.parametrize("method", ["modular", "lorap"])
def test_the_attention_never_cuts_more_than_the_blocks_budget(method):
    """attn_ratio=0.9 at ratio 0.05: the attention takes the block's whole budget, not 90 %."""
    options = {"allocation": "uniform", "channel_multiple": 1, "rank_multiple": 1}
    if method == "modular":
        options["min_saving"] = 0
    report = compress_tiny(
        make_model("llama"), method=method, ratio=0.05, attn_ratio=0.9, **options
    )
    assert report.achieved_ratio == pytest.approx(0.05, abs=0.02)
    assert all(r.kind == "dense" for r in report.modules if r.group == "mlp")


def test_the_default_exponent_falls_with_the_ratio_up_to_its_cap():
    assert default_loss_gamma(0.2) == pytest.approx(1.0)
    assert default_loss_gamma(0.4) == pytest.approx(0.5)
    assert default_loss_gamma(0.05) == GAMMA_MAX


def test_by_default_the_block_ratios_follow_the_exponent_of_the_requested_ratio():
    model = make_model("llama")
    report = compress_tiny(model, ratio=0.16, allocation="loss", **EXACT)
    info = report.calibration["loss_aware"]
    assert info["gamma"] == pytest.approx(default_loss_gamma(0.16))
    flat = compress_tiny(
        make_model("llama"), ratio=0.16, allocation="loss", loss_gamma=0.5, **EXACT
    )
    spread = [
        abs(x["block_ratios"][0] - x["block_ratios"][1])
        for x in (info, flat.calibration["loss_aware"])
    ]
    assert spread[0] > 1.5 * spread[1]  # γ 1.25 against 0.5: the same sensitivities spread more


def test_version_1_configs_keep_the_blocks_ratio():
    old = {"method": "modular", "version": 1, "ratio": 0.2, "allocation": "loss", "rank": None}
    assert config_from_dict({**old, "options": {}}).attn_ratio == "block"
    assert config_from_dict({**old, "options": {"attn_ratio": 0.3}}).attn_ratio == 0.3
    new = config_from_dict({**old, "version": 2, "options": {}})
    assert new.attn_ratio is None
    assert config_from_dict(new.to_dict()).attn_ratio is None  # the new default round trips


def test_version_2_configs_keep_their_loss_gamma():
    old = {"method": "modular", "version": 2, "ratio": 0.2, "allocation": "loss", "rank": None}
    assert config_from_dict({**old, "options": {}}).loss_gamma == 0.5
    assert config_from_dict({**old, "version": 1, "options": {}}).loss_gamma == 0.5
    assert config_from_dict({**old, "options": {"loss_gamma": 2.0}}).loss_gamma == 2.0
    new = config_from_dict({**old, "version": 3, "options": {}})
    assert new.loss_gamma == ModularConfig.loss_gamma != 0.5
    assert config_from_dict(new.to_dict()).loss_gamma == new.loss_gamma


def test_version_1_distill_configs_keep_their_modular_inits_blocks_ratio():
    old = {"method": "distill", "version": 1, "ratio": 0.2, "allocation": "loss", "rank": None}
    cfg = config_from_dict({**old, "options": {"init": "modular", "e2e_epochs": 2}})
    assert cfg.init_config().attn_ratio == "block" and cfg.e2e_epochs == 2
    lorap = config_from_dict({**old, "allocation": "uniform", "options": {"init": "lorap"}})
    assert lorap.init_config().attn_ratio is None  # lorap's own option did not change
    v2 = config_from_dict({**old, "version": 2, "options": {"init": "modular"}})
    assert v2.init_config().attn_ratio is None and v2.init_config().loss_gamma == 0.5
    new = config_from_dict({**old, "version": 3, "options": {"init": "modular"}})
    assert new.init_config().loss_gamma == ModularConfig.loss_gamma
    assert config_from_dict(new.to_dict()).init_config().loss_gamma == ModularConfig.loss_gamma


@pytest.mark.parametrize("method", ["modular", "lorap"])
def test_the_attention_takes_what_the_mlp_cannot(method):
    """At 0.9 the MLP's smallest width (one channel step of 8) cannot take the rest of a 30 %
    attention cut: the attention takes it, and the ratio is met."""
    options = {"allocation": "uniform", "rank_multiple": 1}
    if method == "modular":
        options["min_saving"] = 0
    else:
        options["attn_ratio"] = 0.3
    report = compress_tiny(make_model("llama"), method=method, ratio=0.9, **options)
    assert report.achieved_ratio >= 0.9 - 0.01
    assert _sublayer_ratios(report)[(0, "attn")] > ATTN_CUT + 0.1
