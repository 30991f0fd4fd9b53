"""Corrupt, truncated or foreign saved models are refused with one clear error (factorlm.load)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import factorlm
from factorlm.cli import main
from factorlm.errors import ConfigError, FormatError
from helpers_input import _cli, _error_line


@pytest.fixture(scope="module")
def saved(files, tmp_path_factory):
    model, tok = factorlm.load_model(str(files / "model"))
    factorlm.compress(
        model, "svd-llm", 0.3, str(files / "calib.txt"), tok, n_samples=8, seqlen=32, progress=False
    )
    out = tmp_path_factory.mktemp("saved") / "compressed"
    factorlm.save(model, out, tokenizer=tok)
    return out


def _edit_config(fn):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def _edit_tensors(fn):
    def edit(d: Path):
        t = load_file(str(d / "model.safetensors"))
        fn(t)
        save_file(t, str(d / "model.safetensors"))

    return edit


def _first_module(cfg) -> dict:
    return next(iter(cfg["factorlm"]["modules"].values()))


Q = "model.layers.0.self_attn.q_proj"


CORRUPTIONS = {
    "truncated": (lambda d: _truncate(d / "model.safetensors", 0.5), "truncated"),
    "truncated_header": (lambda d: _truncate(d / "model.safetensors", 20), "truncated"),
    "empty_file": (lambda d: (d / "model.safetensors").write_bytes(b""), "corrupt"),
    "garbage": (lambda d: (d / "model.safetensors").write_bytes(bytes(range(256)) * 64), "corrupt"),
    "foreign_tensors": (
        lambda d: save_file({"encoder.weight": torch.zeros(3, 3)}, str(d / "model.safetensors")),
        "do not match",
    ),
    "extra_tensor": (_edit_tensors(lambda t: t.update(extra=torch.zeros(2))), "unexpected"),
    "missing_tensor": (_edit_tensors(lambda t: t.pop(f"{Q}.A.weight")), "missing"),
    "wrong_shape": (
        _edit_tensors(lambda t: t.update({f"{Q}.A.weight": torch.zeros(64, 3)})),
        f"{Q}.A.weight",
    ),
    "int_tensor": (
        _edit_tensors(lambda t: t.update({f"{Q}.B.weight": t[f"{Q}.B.weight"].to(torch.int32)})),
        "dtype",
    ),
    "nan_tensor": (
        _edit_tensors(lambda t: t["model.norm.weight"].fill_(float("nan"))),
        "NaN",
    ),
    "format_version_999": (
        _edit_config(lambda c: c["factorlm"].update(format_version=999)),
        "format version 999",
    ),
    "format_version_missing": (
        _edit_config(lambda c: c["factorlm"].pop("format_version")),
        "format_version",
    ),
    "rank_inconsistent": (
        _edit_config(lambda c: _first_module(c).update(rank=_first_module(c)["rank"] + 8)),
        "disagree",
    ),
    "rank_too_large": (_edit_config(lambda c: _first_module(c).update(rank=10_000)), "rank"),
    "module_entry_dropped": (
        _edit_config(lambda c: c["factorlm"]["modules"].pop(next(iter(c["factorlm"]["modules"])))),
        "do not match",
    ),
    "module_of_other_model": (
        _edit_config(
            lambda c: c["factorlm"]["modules"].update(
                {"model.layers.9.mlp.up_proj": {"type": "linear", "in": 1, "out": 1, "bias": False}}
            )
        ),
        "model.layers.9.mlp.up_proj",
    ),
    "modules_not_a_table": (_edit_config(lambda c: c["factorlm"].update(modules=[])), "modules"),
    "bad_dtype": (_edit_config(lambda c: c["factorlm"].update(dtype="int8")), "dtype"),
    "bad_unfused": (
        _edit_config(lambda c: c["factorlm"].update(unfused_experts=["model.layers.0.mlp"])),
        "model.layers.0.mlp",
    ),
    "hidden_size_changed": (_edit_config(lambda c: c.update(hidden_size=32)), "shape"),
    "unknown_model_class": (
        _edit_config(lambda c: c.update(architectures=["NoSuchForCausalLM"])),
        "NoSuchForCausalLM",
    ),
    "unknown_model_type": (_edit_config(lambda c: c.update(model_type="teapot")), "teapot"),
    "no_factorlm_block": (_edit_config(lambda c: c.pop("factorlm")), "not a factorlm model"),
    "config_invalid_json": (lambda d: (d / "config.json").write_text("{oops"), "invalid JSON"),
    "config_not_object": (lambda d: (d / "config.json").write_text("[1, 2]"), "not a JSON object"),
    "config_missing": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "weights_deleted": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "index_lists_missing_shard": (
        lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}})
        ),
        "model-00002-of-00002.safetensors",
    ),
    "index_malformed": (
        lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
        "index",
    ),
}


def _truncate(path: Path, keep) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_model_refused(saved, tmp_path, capsys, kind):
    corrupt, needle = CORRUPTIONS[kind]
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    corrupt(d)
    with pytest.raises(FormatError) as info:
        factorlm.load(d)
    msg = str(info.value)
    assert needle in msg, msg
    assert "\n" not in msg
    rc, err = _cli(capsys, "inspect", d)
    assert rc == 2
    assert err.strip() == _error_line(err)


def test_load_model_delegates_corrupt_factorlm_dirs(saved, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    _truncate(d / "model.safetensors", 0.9)
    with pytest.raises(FormatError, match="truncated"):
        factorlm.load_model(str(d))


def test_intact_model_loads(saved, capsys):
    model = factorlm.load(saved)
    assert isinstance(model.model.layers[0].self_attn.q_proj, factorlm.LowRankLinear)
    capsys.readouterr()
    assert main(["inspect", str(saved)]) == 0
    out = capsys.readouterr().out
    assert f"{Q} " in out and "lowrank" in out


def test_load_missing_paths(tmp_path):
    with pytest.raises(FormatError, match="no such directory"):
        factorlm.load(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(FormatError, match="not a directory"):
        factorlm.load(tmp_path / "f")
    with pytest.raises(ConfigError, match="dtype"):
        factorlm.load(tmp_path, dtype="float7")
