"""Resumable runs: per-block checkpoints, kill -9 + ``--resume``, atomic output directories."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import factorlm
from factorlm.cli import main
from factorlm.errors import ConfigError, OutputExistsError
from factorlm.io import checkpoint as ckpt_mod
from helpers_cli import make_model_dir, write_calib

HELPER = Path(__file__).with_name("helpers_cli.py")
N_LAYERS = 6
RUN = ["--method", "svd-llm", "--ratio", "0.3", "--n-samples", "8", "--seqlen", "32"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they cost a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_model_dir(root / "model", n_layers=N_LAYERS)
    calib = write_calib(root / "calib.txt")
    ref = root / "ref"
    assert main(["-q", "compress", str(model), *RUN, "--calib", str(calib), "--out", str(ref)]) == 0
    return model, calib, ref


def _assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"
    ca, cb = (json.loads((d / "config.json").read_text())["factorlm"] for d in (a, b))
    ca.pop("recipe"), cb.pop("recipe")
    assert ca == cb


def _workdir(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def _next_block(workdir: Path) -> int:
    try:
        return int(json.loads((workdir / "state.json").read_text())["next_block"])
    except (OSError, ValueError, KeyError):
        return 0


def test_kill9_then_resume_is_bit_identical(setup, tmp_path, caplog):
    model, calib, ref = setup
    out = tmp_path / "out"
    cmd = [sys.executable, str(HELPER), "-q", "compress", str(model), *RUN]
    cmd += ["--calib", str(calib), "--out", str(out)]
    env = {**os.environ, "FACTORLM_TEST_BLOCK_DELAY": "0.25", "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"  # as in this process (see _one_thread): same arithmetic
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while _next_block(_workdir(out)) < 2:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it was killed: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint of block 1 after 120 s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _next_block(_workdir(out))
    assert 2 <= killed_at < N_LAYERS, "killed too late to test resuming"
    assert not out.exists(), "a killed run must not leave an output directory"
    assert not list(tmp_path.glob(".out.tmp-*"))

    caplog.set_level(logging.INFO, logger="factorlm")
    args = ["-q", "compress", str(model), *RUN, "--calib", str(calib), "--out", str(out)]
    assert main([*args, "--resume"]) == 0
    assert f"resuming from block {killed_at}" in caplog.text
    _assert_same_weights(ref, out)
    report = json.loads((out / "report.json").read_text())
    assert [b["index"] for b in report["blocks"]] == list(range(N_LAYERS))
    assert not _workdir(out).exists(), "the work directory is removed after success"


class _Crash(Exception):
    pass


def _crash_on_write(monkeypatch, n: int) -> None:
    """Make the n-th state.json write raise (after that block's weights and streams are written)."""
    real = ckpt_mod._atomic_write_bytes
    calls = {"n": 0}

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Crash(f"simulated crash before writing {path.name}")
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "_atomic_write_bytes", flaky)


def test_crash_between_streams_and_state_resumes_consistently(setup, tmp_path, monkeypatch):
    """The streams of block 3 are on disk but state.json still says block 2: resume must not mix them."""
    model, calib, ref = setup
    out = tmp_path / "out"
    args = ["-q", "compress", str(model), *RUN, "--calib", str(calib), "--out", str(out)]
    with monkeypatch.context() as m:
        _crash_on_write(m, 3)
        with pytest.raises(_Crash):
            main(args)
    assert _next_block(_workdir(out)) == 2
    assert (_workdir(out) / "streams-3.safetensors").exists()
    assert not out.exists()
    assert main([*args, "--resume"]) == 0
    _assert_same_weights(ref, out)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("asvd", ["--allocation", "global"]),
        ("nsvd", ["--variant", "II"]),
        ("svd", ["--rank", "16"]),
    ],
)
def test_resume_other_methods(setup, tmp_path, monkeypatch, method, extra):
    model, calib, _ = setup
    base = ["-q", "compress", str(model), "--method", method, "--ratio", "0.3", *extra]
    base += ["--n-samples", "8", "--seqlen", "32", "--calib", str(calib)]
    ref = tmp_path / "ref"
    assert main([*base, "--out", str(ref)]) == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _crash_on_write(m, 4)
        with pytest.raises(_Crash):
            main([*base, "--out", str(out)])
    assert main([*base, "--out", str(out), "--resume"]) == 0
    _assert_same_weights(ref, out)


def test_crash_during_save_then_resume(setup, tmp_path, monkeypatch):
    """Every block is checkpointed but the final save fails: no output dir; resume only saves."""
    model, calib, ref = setup
    out = tmp_path / "out"
    args = ["-q", "compress", str(model), *RUN, "--calib", str(calib), "--out", str(out)]

    def broken_save_file(*a, **k):
        raise _Crash("disk full")

    with monkeypatch.context() as m:
        m.setattr("factorlm.io.save.save_file", broken_save_file)
        with pytest.raises(_Crash):
            main(args)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*")), "the temporary directory is cleaned up"
    assert _next_block(_workdir(out)) == N_LAYERS
    assert main([*args, "--resume"]) == 0
    _assert_same_weights(ref, out)


def test_resume_refuses_a_different_run(setup, tmp_path, monkeypatch, capsys):
    model, calib, _ = setup
    out = tmp_path / "out"
    args = [
        "-q",
        "compress",
        str(model),
        "--n-samples",
        "8",
        "--seqlen",
        "32",
        "--calib",
        str(calib),
    ]
    with monkeypatch.context() as m:
        _crash_on_write(m, 3)
        with pytest.raises(_Crash):
            main([*args, "--ratio", "0.3", "--out", str(out)])
    capsys.readouterr()
    assert main([*args, "--ratio", "0.5", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "Traceback" not in err
    assert not out.exists()
    # without --resume the stale checkpoint is simply replaced
    assert main([*args, "--ratio", "0.5", "--out", str(out)]) == 0


def test_resume_with_a_corrupt_checkpoint(setup, tmp_path, monkeypatch, capsys):
    model, calib, _ = setup
    out = tmp_path / "out"
    args = ["-q", "compress", str(model), *RUN, "--calib", str(calib), "--out", str(out)]
    with monkeypatch.context() as m:
        _crash_on_write(m, 3)
        with pytest.raises(_Crash):
            main(args)
    block = _workdir(out) / "block-1.safetensors"
    block.write_bytes(block.read_bytes()[:100])
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and str(_workdir(out)) in err and "Traceback" not in err


def test_resume_with_another_dtype(setup, tmp_path):
    model_dir, calib, _ = setup
    work = tmp_path / "work"
    model, tok = factorlm.load_model(str(model_dir))
    kw = dict(n_samples=8, seqlen=32, progress=False, workdir=str(work))
    factorlm.compress(model, "svd", 0.3, str(calib), tok, **kw)
    model, tok = factorlm.load_model(str(model_dir), dtype="bfloat16")
    with pytest.raises(ConfigError, match="bfloat16"):
        factorlm.compress(model, "svd", 0.3, str(calib), tok, resume=True, **kw)


def test_resume_without_checkpoint_starts_fresh(setup, tmp_path):
    model, calib, ref = setup
    out = tmp_path / "out"
    args = ["-q", "compress", str(model), *RUN, "--calib", str(calib), "--out", str(out)]
    assert main([*args, "--resume"]) == 0
    _assert_same_weights(ref, out)


def test_resume_does_not_overwrite_a_finished_output(setup, capsys):
    model, calib, ref = setup
    before = (ref / "model.safetensors").stat().st_mtime_ns
    args = ["-q", "compress", str(model), *RUN, "--calib", str(calib), "--out", str(ref)]
    assert main([*args, "--resume"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (ref / "model.safetensors").stat().st_mtime_ns == before


def test_save_is_atomic(tmp_path, monkeypatch):
    model_dir = make_model_dir(tmp_path / "m", n_layers=1)
    model, tok = factorlm.load_model(str(model_dir))
    out = tmp_path / "out"
    factorlm.save(model, out, tokenizer=tok)
    mode = out.stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o777 & ~mask, (
        "the output directory gets the usual permissions, not mkdtemp's 0700"
    )
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(OutputExistsError):
        factorlm.save(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("factorlm.io.save.save_file", broken)
    with pytest.raises(OSError):
        factorlm.save(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "old output left intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"], "no temporary left behind"
