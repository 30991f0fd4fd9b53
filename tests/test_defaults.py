"""What ``compress`` runs when no method is named: the recommended recipe, in the API and the CLI."""

from __future__ import annotations

import pytest
import torch

import factorlm
from conftest import calib_ids, make_model
from factorlm.cli_args import build_parser
from factorlm.defaults import DEFAULT_METHOD
from factorlm.methods import make_config


def _mlp_widths(model) -> list[int]:
    return [blk.mlp.up_proj.out_features for blk in model.model.layers]


def test_default_method_is_the_recommended_recipe():
    assert DEFAULT_METHOD == "modular"
    assert build_parser().parse_args(["compress", "m", "--out", "o"]).method == "modular"


def test_compress_without_a_method_runs_modular():
    unnamed, named = make_model("llama"), make_model("llama")
    kw = dict(ratio=0.3, calibration=calib_ids(), n_samples=16, seqlen=32, batch_size=4)
    report = factorlm.compress(unnamed, progress=False, **kw)
    factorlm.compress(named, method="modular", progress=False, **kw)
    assert report.method == "modular"
    dense = make_model("llama")
    assert _mlp_widths(unnamed) == _mlp_widths(named)
    assert sum(_mlp_widths(unnamed)) < sum(_mlp_widths(dense))  # a structured MLP: modular
    x = calib_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(unnamed(x).logits, named(x).logits)


def test_a_fixed_rank_without_a_method_says_which_methods_take_one():
    with pytest.raises(factorlm.ConfigError, match="svd-llm"):
        factorlm.compress(make_model("llama"), rank=4, calibration=calib_ids(), progress=False)
    assert make_config("svd-llm", rank=4).rank == 4
