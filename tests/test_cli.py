"""The command line: end to end on a tiny model, one-line errors without tracebacks (also in real
subprocesses), --overwrite, Ctrl-C then --resume, inspect/densify on good and corrupt input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import factorlm
from factorlm.cli import main
from helpers_cli import make_model_dir, write_calib

RUN = ["--method", "svd-llm", "--ratio", "0.3", "--n-samples", "8", "--seqlen", "32"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they cost a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_model_dir(root / "model", n_layers=2)
    write_calib(root / "calib.txt")
    return root


@pytest.fixture(scope="module")
def compressed(files):
    out = files / "compressed"
    args = ["-q", "compress", str(files / "model"), *RUN, "--calib", str(files / "calib.txt")]
    assert main([*args, "--out", str(out)]) == 0
    return out


def _run(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "factorlm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# --- real subprocesses ------------------------------------------------------------------------


def test_subprocess_bad_method(files):
    p = _run("compress", files / "model", "--method", "svd-xl", "--out", files / "never")
    assert p.returncode == 2
    line = _one_error_line(p.stderr)
    assert "unknown method 'svd-xl'" in line and "svd-llm" in line
    assert p.stdout == ""
    assert not (files / "never").exists()


def test_subprocess_inspect_corrupt_model(compressed, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(compressed, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    p = _run("inspect", d)
    assert p.returncode == 2
    line = _one_error_line(p.stderr)
    assert "model.safetensors" in line and "truncated" in line


def test_subprocess_argparse_errors_have_no_traceback(files):
    p = _run("compress", files / "model", "--ratio", "lots", "--out", files / "never")
    assert p.returncode == 2
    assert "invalid float value: 'lots'" in p.stderr and "Traceback" not in p.stderr


# --- in-process end to end --------------------------------------------------------------------


def test_compress_inspect_densify(files, compressed, capsys):
    names = sorted(p.name for p in compressed.iterdir())
    for expected in ("config.json", "model.safetensors", "report.json", "recipe.json"):
        assert expected in names
    assert "modeling_factorlm.py" in names and "tokenizer.json" in names
    assert not any(n.startswith(".") for n in names)
    assert not (files / ".compressed.work").exists(), "the work directory is removed"
    recipe = json.loads((compressed / "recipe.json").read_text())
    assert recipe["method"] == "svd-llm" and recipe["ratio"] == 0.3

    capsys.readouterr()
    assert main(["inspect", str(compressed)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "lowrank" in out and "svd-llm" in out

    dense_dir = files / "dense"
    assert main(["-q", "densify", str(compressed), "--out", str(dense_dir)]) == 0
    dense = load_file(str(dense_dir / "model.safetensors"))
    model = factorlm.load(compressed)
    q = model.model.layers[0].self_attn.q_proj
    assert torch.allclose(dense["model.layers.0.self_attn.q_proj.weight"], q.dense_weight())

    capsys.readouterr()
    assert main(["-q", "densify", str(compressed), "--out", str(dense_dir)]) == 2
    assert "not empty" in _one_error_line(capsys.readouterr().err)


def test_overwrite_replaces_a_nonempty_output(files, capsys):
    out = files / "occupied"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["-q", "compress", str(files / "model"), *RUN, "--calib", str(files / "calib.txt")]
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    assert "--overwrite" in _one_error_line(capsys.readouterr().err)
    assert (out / "old.txt").exists()
    assert main([*args, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


def test_empty_output_dir_is_fine(files):
    out = files / "empty_out"
    out.mkdir()
    args = ["-q", "compress", str(files / "model"), *RUN, "--calib", str(files / "calib.txt")]
    assert main([*args, "--out", str(out), "--rank", "16", "--method", "svd"]) == 0
    model = factorlm.load(out)
    assert model.model.layers[0].mlp.up_proj.rank == 16


def test_ctrl_c_keeps_the_checkpoint_then_resume(files, tmp_path, monkeypatch, capsys):
    from factorlm.calibration import pipeline

    out = tmp_path / "out"
    args = ["-q", "compress", str(files / "model"), *RUN, "--calib", str(files / "calib.txt")]
    real = pipeline.run_block
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # first forward of the second block
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "run_block", interrupted)
        capsys.readouterr()
        assert main([*args, "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    work = tmp_path / ".out.work"
    assert json.loads((work / "state.json").read_text())["next_block"] == 1
    assert not out.exists()
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert factorlm.load(out) is not None
    assert not work.exists()


def test_model_without_tokenizer(files, tmp_path, capsys):
    import shutil

    d = tmp_path / "no_tok"
    shutil.copytree(files / "model", d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    capsys.readouterr()
    rc = main(
        [
            "-q",
            "compress",
            str(d),
            *RUN,
            "--calib",
            str(files / "calib.txt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "tokenizer" in _one_error_line(capsys.readouterr().err)


def test_eval_needs_something_to_do(files, capsys):
    capsys.readouterr()
    assert main(["eval", str(files / "model")]) == 2
    assert "nothing to evaluate" in _one_error_line(capsys.readouterr().err)


def test_inspect_errors(files, tmp_path, capsys):
    for target, needle in [
        (tmp_path / "missing", "no such directory"),
        (files / "model", "not a factorlm model"),
        (files / "calib.txt", "not a directory"),
    ]:
        capsys.readouterr()
        assert main(["inspect", str(target)]) == 2
        assert needle in _one_error_line(capsys.readouterr().err)
    assert Path(files / "model").exists()


def test_compress_quantize(files):
    out = files / "quantized"
    args = ["-q", "compress", str(files / "model"), *RUN, "--calib", str(files / "calib.txt")]
    assert main([*args, "--quantize", "int4", "--out", str(out)]) == 0
    model = factorlm.load(out)
    from factorlm.nn.quantized import QuantLinear

    assert isinstance(model.model.layers[0].self_attn.q_proj.A, QuantLinear)
    assert json.loads((out / "recipe.json").read_text())["quantize"] == "int4"


def test_eval_speed_against_baseline(files, compressed, capsys, tmp_path):
    out = tmp_path / "speed.json"
    args = ["-q", "eval", str(compressed), "--speed", "--baseline", str(files / "model")]
    small = [
        "--prompt-len",
        "8",
        "--gen-len",
        "2",
        "--repeats",
        "1",
        "--speed-batch-sizes",
        "1",
        "2",
    ]
    capsys.readouterr()
    assert main([*args, *small, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "vs baseline: prefill" in text
    rows = json.loads(out.read_text())["speed"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [
        ("baseline", 1),
        ("model", 1),
        ("baseline", 2),
        ("model", 2),
    ]
    assert all(r["mode"] == "eager" and r["decode_tok_s"] > 0 for r in rows)
    assert rows[0]["decode_ratio"] == 1.0 and rows[1]["decode_ratio"] > 0
    assert main(["-q", "eval", str(compressed), "--baseline", str(files / "model")]) == 2
