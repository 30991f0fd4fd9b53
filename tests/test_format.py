"""Tests of the save format: models saved by older factorlm versions keep loading.

``tests/fixtures/v1_lorap_llama`` was written by factorlm at commit f99ffa6 (format version 1): a
tiny Llama compressed with lorap (low-rank attention + pruned MLP linears), saved with
``factorlm.save``, plus ``expected_logits.safetensors`` (inputs and the compressed model's logits).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import factorlm
from factorlm.errors import ConfigError, FormatError
from factorlm.io import format as fmt
from factorlm.io.save import BUNDLED
from factorlm.nn import modeling_factorlm
from helpers_cli import make_model_dir, write_calib

FIXTURE = Path(__file__).parent / "fixtures" / "v1_lorap_llama"


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
    for src, name in BUNDLED.items():
        shutil.copyfile(src, d / name)
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


# ------------------------------------------------------------------ dtype names, versions
@pytest.mark.parametrize(
    "value, want",
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        ("FP16", torch.float16),
        ("float32", torch.float32),
        (None, None),
    ],
)
def test_parse_dtype_accepts_every_spelling(value, want):
    assert fmt.parse_dtype(value) is want


@pytest.mark.parametrize("value", ["bf17", "int8", torch.int8, 3, "auto"])
def test_parse_dtype_one_clear_error(value):
    with pytest.raises(ConfigError, match="dtype"):
        fmt.parse_dtype(value)


def test_parse_dtype_auto_only_where_allowed():
    assert fmt.parse_dtype("auto", allow_auto=True) == "auto"


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16", "torch.bfloat16", torch.bfloat16])
def test_every_loader_takes_every_dtype_spelling(dtype):
    """factorlm.load, load_model and the bundled entry point of from_pretrained (HF's own
    AutoConfig parses the name before it, so it is called directly here)."""
    m1 = factorlm.load(FIXTURE, dtype=dtype)
    m2 = modeling_factorlm.FactorLMForCausalLM.from_pretrained(str(FIXTURE), dtype=dtype)
    m3, _ = factorlm.load_model(str(FIXTURE), dtype=dtype)
    for m in (m1, m2, m3):
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_from_pretrained_dtype_through_hf():
    m = AutoModelForCausalLM.from_pretrained(
        str(FIXTURE), trust_remote_code=True, dtype=torch.bfloat16
    )
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_newer_format_version_is_refused(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIXTURE, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[fmt.CONFIG_KEY]["format_version"] = fmt.FORMAT_VERSION + 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="upgrade factorlm"):
        factorlm.load(d)


def test_migrations_bring_old_blocks_to_the_current_version(monkeypatch):
    """An older block goes through every migration step, in order."""
    seen = []

    def step(v):
        def f(block):
            seen.append(v)
            return {**block, "format_version": v + 1, f"m{v}": True}

        return f

    monkeypatch.setattr(fmt, "FORMAT_VERSION", 3)
    monkeypatch.setattr(fmt, "MIGRATIONS", {1: step(1), 2: step(2)})
    out = fmt.migrate({"format_version": 1, "modules": {}})
    assert seen == [1, 2] and out["format_version"] == 3 and out["m1"] and out["m2"]


def test_a_v1_block_reads_as_the_current_version():
    """The reader migrates: a version-1 block comes back at FORMAT_VERSION, content unchanged."""
    block = json.loads((FIXTURE / "config.json").read_text())[fmt.CONFIG_KEY]
    assert block["format_version"] == 1
    read = fmt.read_block({fmt.CONFIG_KEY: block})
    assert read == {**block, "format_version": fmt.FORMAT_VERSION}


def test_save_writes_the_lowest_version_that_describes_the_model(tmp_path):
    model = factorlm.load(FIXTURE)
    factorlm.save(model, tmp_path / "m")
    block = json.loads((tmp_path / "m" / "config.json").read_text())[fmt.CONFIG_KEY]
    assert block["format_version"] == 1 and "quantization" not in block
    factorlm.quantize(model, "int8")
    factorlm.save(model, tmp_path / "q")
    block = json.loads((tmp_path / "q" / "config.json").read_text())[fmt.CONFIG_KEY]
    assert block["format_version"] == 2 and block["quantization"]["modules"]
    _ = factorlm.load(tmp_path / "q")


def test_slot_modules_are_version_3_and_checked(tmp_path):
    """Attention as modules writes version 3 (a version-2 reader refuses it with "upgrade"); a
    kept width outside the layer, or none at all, is refused."""
    from conftest import calib_ids, make_model

    model = make_model("llama")
    factorlm.compress(
        model,
        method="modular",
        ratio=0.5,
        attention="modules",
        calibration=calib_ids(),
        n_samples=8,
        seqlen=32,
        progress=False,
    )
    factorlm.save(model, tmp_path / "m")
    block = json.loads((tmp_path / "m" / "config.json").read_text())[fmt.CONFIG_KEY]
    slots = {n: m for n, m in block["modules"].items() if m["type"] == "slots"}
    assert block["format_version"] == 3 and slots
    assert fmt.read_block({fmt.CONFIG_KEY: block})["format_version"] == 3
    name, spec = next(iter(slots.items()))
    for bad in (
        {"out_kept": spec["out"] + 1, "in_kept": None},
        {"out_kept": None, "in_kept": None},
    ):
        broken = {**block, "modules": {**block["modules"], name: {**spec, **bad}}}
        with pytest.raises(FormatError, match="kept widths"):
            fmt.read_block({fmt.CONFIG_KEY: broken})


# ------------------------------------------------------------------ loading: one copy
def test_skeleton_is_on_meta_until_the_weights_are_assigned(monkeypatch):
    devices = []
    original = modeling_factorlm.load_weights_strict

    def spy(model, state):
        devices.append({p.device.type for p in model.parameters()})
        original(model, state)
        devices.append({p.device.type for p in model.parameters()})

    monkeypatch.setattr(modeling_factorlm, "load_weights_strict", spy)
    _check(factorlm.load(FIXTURE))
    assert devices == [{"meta"}, {"cpu"}]


def test_loaded_parameters_are_the_read_tensors(monkeypatch):
    """assign=True: the parameters are the tensors read from the file, not copies of them."""
    ptrs = set()
    original = modeling_factorlm.read_state_dict

    def spy(path, dtypes=None):
        state = original(path, dtypes)
        ptrs.update(v.data_ptr() for v in state.values())
        return state

    monkeypatch.setattr(modeling_factorlm, "read_state_dict", spy)
    model = factorlm.load(FIXTURE)
    assert {p.data_ptr() for p in model.parameters()} <= ptrs


def test_io_hub_and_default_model_do_not_import_each_other():
    import ast

    import factorlm.io.default_model as dm

    tree = ast.parse(Path(dm.__file__).read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert "factorlm.io.local" in names and "factorlm.io.hub" not in names


# ------------------------------------------------------------------ unreadable inputs
def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:24] = b"x" * 16
    path.write_bytes(data)


def _bad_json(path: Path) -> None:
    path.write_text('{"model_type": "llama", ')


CORRUPTIONS = {
    "truncated safetensors": ("model.safetensors", _truncate),
    "garbled safetensors header": ("model.safetensors", _garble_header),
    "invalid config.json": ("config.json", _bad_json),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("unreadable")
    plain = make_model_dir(root / "plain", n_layers=1)
    write_calib(root / "calib.txt")
    (root / "bad.gguf").write_bytes(b"GGUF" + bytes(range(40)))
    return root, plain


def _corrupt_copy(src: Path, dst: Path, corruption: str) -> Path:
    shutil.copytree(src, dst)
    name, how = CORRUPTIONS[corruption]
    how(dst / name)
    return dst


COMMANDS = {
    "compress": lambda m, root: [
        "compress",
        m,
        "--method",
        "svd",
        "--ratio",
        "0.2",
        "--calib",
        root / "calib.txt",
        "--n-samples",
        "2",
        "--seqlen",
        "16",
        "--out",
        root / "never",
    ],
    "eval": lambda m, root: ["eval", m, "--ppl", root / "calib.txt"],
    "inspect": lambda m, root: ["inspect", m],
    "densify": lambda m, root: ["densify", m, "--out", root / "never"],
}


def _one_error_line(capsys, argv) -> str:
    from factorlm.cli import main

    assert main(["-q", *map(str, argv)]) != 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", ["plain", "factorlm"])
def test_unreadable_model_is_one_error_line(inputs, tmp_path, capsys, corruption, command, kind):
    root, plain = inputs
    src = plain if kind == "plain" else FIXTURE
    bad = _corrupt_copy(src, tmp_path / "bad", corruption)
    line = _one_error_line(capsys, COMMANDS[command](bad, root))
    assert str(bad) in line or "bad" in line


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_unreadable_gguf_is_one_error_line(inputs, capsys, command):
    root, _ = inputs
    line = _one_error_line(capsys, COMMANDS[command](root / "bad.gguf", root))
    assert "GGUF" in line


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_load_of_unreadable_dir_raises_format_error(tmp_path, corruption):
    bad = _corrupt_copy(FIXTURE, tmp_path / "bad", corruption)
    with pytest.raises(FormatError):
        factorlm.load(bad)
