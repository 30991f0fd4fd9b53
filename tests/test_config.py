"""Method configs and the one registry: defaults and validation in the dataclasses, versioned JSON,
a method registered from outside ``src/`` usable at once by ``compress`` and the CLI, bad option
values refused before the model is loaded, ``compress --recipe`` re-running a saved run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

import factorlm
from conftest import calib_ids, make_model
from factorlm.cli import main
from factorlm.errors import ConfigError
from factorlm.methods import REGISTRY, FactorizeConfig, config_from_dict, get_method, make_config
from factorlm.methods.base import Decomposition
from factorlm.run_options import RunOptions
from helpers_cli import make_model_dir, write_calib

# two passes per block: these tests are about configs, and the threads of the one-pass pipeline
# cost far more than the math on tiny models
KW = dict(calibration=calib_ids(8, 32), n_samples=8, seqlen=32, progress=False, one_pass=False)
RUN = ["--n-samples", "8", "--seqlen", "32", "--two-pass"]


# ------------------------------------------------------------------ a method defined here
@dataclass(frozen=True, kw_only=True)
class PowerSVDConfig(FactorizeConfig):
    """Columns scaled by (mean x^2)^(power/2) before a truncated SVD (test-only method)."""

    method: ClassVar[str] = "test-power-svd"
    power: float = 1.0

    def validate(self) -> None:
        self.check_number("power", 0, 4)


def decompose_power_svd(W, stats, *, power: float) -> Decomposition:
    s = stats.sq_mean.clamp_min(1e-12).pow(power / 2).to(torch.float64)
    U, S, Vh = torch.linalg.svd(W.to(torch.float64) * s[None, :], full_matrices=False)
    return Decomposition(S, lambda r: (U[:, :r] * S[:r], Vh[:r] / s[None, :]))


@pytest.fixture
def power_svd():
    entry = factorlm.register(PowerSVDConfig, decompose=decompose_power_svd, needs={"sq"})
    yield entry
    REGISTRY.pop(PowerSVDConfig.method, None)


def test_a_method_registered_outside_src_is_usable_by_compress(power_svd):
    model = make_model("llama")
    report = factorlm.compress(model, method="test-power-svd", ratio=0.3, power=2.0, **KW)
    assert report.method == "test-power-svd" and report.options == {"power": 2.0}
    assert report.achieved_ratio >= 0.3
    assert any(isinstance(m, factorlm.LowRankLinear) for m in model.modules())
    # its math ran: power 0 is plain SVD, and power 2 gives different factors
    plain = make_model("llama")
    factorlm.compress(plain, method="test-power-svd", ratio=0.3, power=0.0, **KW)
    svd = make_model("llama")
    factorlm.compress(svd, method="svd", ratio=0.3, **KW)
    q = "model.layers.0.self_attn.q_proj"
    p, s, m = (x.get_submodule(q) for x in (plain, svd, model))
    product = [x.A.weight @ x.B.weight for x in (p, s, m)]
    torch.testing.assert_close(product[0], product[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(product[2], product[1], rtol=1e-3, atol=1e-4)
    with pytest.raises(ConfigError, match="power"):
        factorlm.compress(make_model("llama"), method="test-power-svd", power=9.0, **KW)


def test_a_method_registered_outside_src_is_usable_by_the_cli(power_svd, tmp_path, capsys):
    make_model_dir(tmp_path / "model", n_layers=1)
    write_calib(tmp_path / "calib.txt")
    out = tmp_path / "out"
    argv = ["-q", "compress", str(tmp_path / "model"), "--method", "test-power-svd"]
    argv += ["--opt", "power=1.5", "--calib", str(tmp_path / "calib.txt"), *RUN]
    assert main([*argv, "--out", str(out)]) == 0
    block = json.loads((out / "config.json").read_text())["factorlm"]
    assert block["method"] == "test-power-svd"
    assert block["config"]["options"] == {"power": 1.5, "min_rank": None}
    assert any(spec["type"] == "lowrank" for spec in block["modules"].values())
    bad = [a if a != "power=1.5" else "power=-1" for a in argv]
    assert main([*bad, "--out", str(tmp_path / "o2")]) == 2
    assert "power" in capsys.readouterr().err


def test_an_unregistered_method_is_unknown():
    with pytest.raises(ConfigError, match="unknown method 'test-power-svd'"):
        get_method("test-power-svd")


# ------------------------------------------------------------------ defaults, validation, JSON
@pytest.mark.parametrize("method", factorlm.methods.available_methods())
def test_config_json_round_trip(method):
    config = make_config(method, ratio=0.35)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == method and data["version"] == type(config).version
    assert config_from_dict(data) == config


@pytest.mark.parametrize(
    "method, options",
    [
        ("asvd", {"alpha": 1.5, "scale": "absmax"}),
        ("nsvd", {"variant": "ii", "k1_share": 0.5}),
        ("svd-llm", {"whiten": "eig", "allocation": "global"}),
        ("fwsvd", {"fisher_batches": 2, "rank": 8}),
        ("lorap", {"a": 2, "keep_least": 0.0, "mlp_ratio": 0.1, "uniform_attention": True}),
        ("distill", {"init": "asvd", "alpha": 1.0, "betas": [0.8, 0.9], "holdout": 2}),
        ("distill", {"allocation": "bottom-first", "min_rank": 4, "lr": 1e-3}),
    ],
)
def test_config_json_round_trip_with_options(method, options):
    config = make_config(method, ratio=0.3, **options)
    again = config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.to_dict() == config.to_dict()


def test_configs_are_frozen_and_normalised():
    c = make_config("nsvd", variant="ii")
    assert c.variant == "II"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.variant = "I"  # type: ignore[misc]
    d = make_config("distill")
    assert d.init == "lorap" and d.init_config() == make_config("lorap")
    assert make_config("distill", allocation="global").init == "svd-llm"


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("lorap", {"a": -1}, "option a"),
        ("lorap", {"keep_least": 0.5}, "keep_least"),
        ("lorap", {"channel_multiple": 0}, "channel_multiple"),
        ("lorap", {"uniform_attention": "yes"}, "uniform_attention"),
        ("lorap", {"rank": 8}, "fixed rank"),
        ("lorap", {"allocation": "global"}, "allocation"),
        ("distill", {"lr": -1}, "option lr"),
        ("distill", {"epochs": -1}, "epochs"),
        ("distill", {"betas": [0.9]}, "betas"),
        ("distill", {"holdout": 1.5}, "holdout"),
        ("distill", {"loss_terms": "both"}, "loss_terms"),
        ("distill", {"init": "distill"}, "init"),
        ("distill", {"init": "svd", "alpha": 0.5}, "alpha"),
        ("distill", {"init": "lorap", "a": 0}, "option a"),
        ("asvd", {"alpha": 3}, "alpha"),
        ("nsvd", {"k1_share": 0}, "k1_share"),
        ("svd-llm", {"whiten": "qr"}, "whiten"),
        ("fwsvd", {"fisher_batches": 0}, "fisher_batches"),
        ("svd", {"min_rank": -2}, "min_rank"),
        ("svd", {"alpha": 0.5}, "no option 'alpha'"),
        ("svd", {"ratio": 1.0}, "ratio"),
        ("svd", {"allocation": "random"}, "allocation"),
    ],
)
def test_bad_option_values_are_one_config_error(method, options, match):
    with pytest.raises(ConfigError, match=match) as info:
        make_config(method, **options)
    assert method in str(info.value) or "ratio" in match or "allocation" in match


@pytest.mark.parametrize("options", [{"a": -1}, {"keep_least": 2}])
def test_api_refuses_bad_lorap_values_before_any_heavy_work(options, monkeypatch):
    import factorlm.api as api

    def heavy(*a, **k):
        raise AssertionError("heavy work started before the options were checked")

    monkeypatch.setattr(api, "check_finite_weights", heavy)
    monkeypatch.setattr(api, "build_calibration", heavy)
    with pytest.raises(ConfigError, match="lorap"):
        factorlm.compress(make_model("llama"), method="lorap", **options, **KW)


@pytest.mark.parametrize(
    "method, opt",
    [
        ("lorap", "a=-1"),
        ("lorap", "keep_least=0.7"),
        ("lorap", "uniform_attention=2"),
        ("distill", "lr=-1"),
        ("distill", "micro_batch=0"),
        ("distill", "init=nonsense"),
        ("distill", "alpha=0.5"),  # the default init (lorap) has no alpha
    ],
)
def test_cli_refuses_bad_option_values_before_loading(method, opt, tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(factorlm, "load_model", no_load)
    write_calib(tmp_path / "calib.txt")
    argv = ["compress", "smollm2-135m", "--method", method, "--opt", opt]
    argv += ["--calib", str(tmp_path / "calib.txt"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and opt.split("=")[0] in err[0], err


def test_a_config_and_keywords_do_not_mix():
    config = make_config("svd", ratio=0.3)
    with pytest.raises(ConfigError, match="alpha"):
        factorlm.compress(make_model("llama"), config, alpha=0.5)
    with pytest.raises(ConfigError, match="run"):
        factorlm.compress(make_model("llama"), config, run=RunOptions(), seed=3)


def test_config_call_equals_keyword_call():
    a, b = make_model("llama"), make_model("llama")
    r1 = factorlm.compress(a, method="asvd", ratio=0.3, alpha=1.0, seed=1, **KW)
    run = RunOptions(n_samples=8, seqlen=32, seed=1, progress=False, one_pass=False)
    r2 = factorlm.compress(b, make_config("asvd", ratio=0.3, alpha=1.0), KW["calibration"], run=run)
    assert r1.config == r2.config and r1.run == r2.run
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_rank_travels_in_the_config_not_in_the_options():
    report = factorlm.compress(make_model("llama"), method="svd", rank=8, **KW)
    assert report.config["rank"] == 8 and "fixed_rank" not in report.options
    assert set(report.ranks.values()) == {8}


def test_distill_seed_comes_from_the_run_options(monkeypatch):
    from factorlm.methods import distill

    seen = []
    orig = distill.DistillCompressor.__init__

    def spy(self, init, options, seed=0, progress=True):
        seen.append(seed)
        orig(self, init, options, seed=seed, progress=progress)

    monkeypatch.setattr(distill.DistillCompressor, "__init__", spy)
    factorlm.compress(make_model("llama"), method="distill", init="svd", steps=0, seed=5, **KW)
    assert seen == [5]


# ------------------------------------------------------------------ --recipe
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    make_model_dir(root / "model", n_layers=1)
    write_calib(root / "calib.txt")
    out = root / "first"
    argv = ["-q", "compress", str(root / "model"), "--method", "asvd", "--ratio", "0.3"]
    argv += ["--opt", "alpha=1.0", "--seed", "3", "--calib", str(root / "calib.txt"), *RUN]
    assert main([*argv, "--out", str(out)]) == 0
    return root, out


@pytest.mark.parametrize("source", ["recipe.json", "dir"])
def test_recipe_re_runs_a_saved_model_exactly(saved, source):
    root, first = saved
    recipe = first / "recipe.json" if source == "recipe.json" else first
    again = root / f"again-{source}"
    assert main(["-q", "compress", "--recipe", str(recipe), "--out", str(again)]) == 0
    w1, w2 = (
        load_file(str(first / "model.safetensors")),
        load_file(str(again / "model.safetensors")),
    )
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    b1, b2 = (json.loads((d / "config.json").read_text())["factorlm"] for d in (first, again))
    assert b1["config"] == b2["config"] and b1["run"] == b2["run"] and b1["run"]["seed"] == 3
    assert b1["config"]["options"]["alpha"] == 1.0


def test_recipe_replays_the_run_settings(saved, tmp_path, capsys):
    """A different seed would give other calibration samples: the replay must use the recipe's."""
    root, first = saved
    other = tmp_path / "seed0"
    argv = ["-q", "compress", str(root / "model"), "--method", "asvd", "--ratio", "0.3"]
    argv += ["--opt", "alpha=1.0", "--calib", str(root / "calib.txt"), *RUN, "--out", str(other)]
    assert main(argv) == 0
    w1, w0 = (
        load_file(str(first / "model.safetensors")),
        load_file(str(other / "model.safetensors")),
    )
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)


def test_recipe_cannot_be_mixed_with_method_flags(saved, capsys):
    root, first = saved
    argv = ["compress", "--recipe", str(first), "--ratio", "0.5", "--out", str(root / "x")]
    assert main(argv) == 2
    assert "--ratio" in capsys.readouterr().err


def test_recipe_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "r.json").write_text('{"config": {"method": "svd", "version": 99}}')
    for recipe in (tmp_path / "missing.json", tmp_path / "r.json", tmp_path):
        assert main(["compress", "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_each_method_has_its_own_default_allocation():
    """modular defaults to the loss-aware block ratios (it measured better than uniform at 20 % and
    40 %); every other method to uniform; an explicit allocation always wins."""
    from factorlm.methods.base import make_config

    assert make_config("modular", ratio=0.2).allocation == "loss"
    assert make_config("modular", ratio=0.2, allocation="uniform").allocation == "uniform"
    for method in ("svd-llm", "lorap", "asvd"):
        assert make_config(method, ratio=0.2).allocation == "uniform"
    cfg = make_config("modular", ratio=0.2)
    assert type(cfg).from_dict(cfg.to_dict()).allocation == "loss"
