"""The peak-memory estimate and check before the model is loaded (factorlm.memory)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from factorlm import memory
from helpers_cli import make_model_dir
from helpers_input import _base, _cli, _error_line


def test_memory_estimate_from_checkpoint(files):
    est = memory.estimate_for_checkpoint(files / "model", None, 8, 32)
    n_params = sum(
        t.numel() for t in load_file(str(files / "model" / "model.safetensors")).values()
    )
    assert est.model_bytes == 4 * n_params
    assert (
        memory.estimate_for_checkpoint(files / "model", "bf16", 8, 32).model_bytes == 2 * n_params
    )
    bigger = memory.estimate_for_checkpoint(files / "model", None, 800, 320)
    assert bigger.stream_bytes >= 800 * 320 * 64 * 4 * 3  # three float32 streams
    assert est.total < 64 * 2**20
    assert memory.estimate_for_checkpoint("org/hub-id", None, 8, 32) is None
    assert memory.available_bytes() is None or memory.available_bytes() > 0


def test_cli_refuses_a_run_that_does_not_fit(files, capsys, no_load, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 2**20)
    rc, err = _cli(capsys, "compress", files / "model", *_base(files))
    assert rc == 2
    line = _error_line(err)
    assert "not enough memory" in line and "1.00 MiB" not in line and "--no-memory-check" in line
    assert "calibration activations" in line
    rc, err = _cli(capsys, "compress", files / "model", *_base(files), "--no-memory-check")
    assert "MODEL-LOADED" in _error_line(err)


def test_memory_check_on_a_gpu_device(monkeypatch):
    # a 10 GiB model whose block (0.5 GiB + 1 GiB of statistics + 0.5 GiB of one batch) fits a
    # 4 GiB GPU: the model stays on the host, one block at a time visits the device
    est = memory.MemoryEstimate(
        model_bytes=10 * 2**30,
        block_bytes=2**29,
        stats_bytes=2**30,
        stream_bytes=2**30,
        batch_bytes=2**29,
        outside_bytes=2**29,
    )
    assert est.device_bytes() == 2 * 2**30 and est.host_bytes(on_gpu=True) == 11 * 2**30
    gpu = {"free": 4 * 2**30}
    monkeypatch.setattr(
        memory, "available_bytes", lambda device=None: gpu["free"] if device else 64 * 2**30
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    memory.check_memory(est, "cuda")
    gpu["free"] = 2**30  # the block and its statistics do not fit
    with pytest.raises(memory.InsufficientMemoryError, match="free memory on cuda") as e:
        memory.check_memory(est, "cuda")
    assert "one block 0.50 GiB" in str(e.value)
    memory.check_memory(est, None)  # 12.5 GiB on the host: fits
    with pytest.raises(memory.InsufficientMemoryError, match="host memory"):
        memory.check_memory(dataclasses.replace(est, model_bytes=64 * 2**30), "cuda")


def test_memory_estimate_puts_one_block_on_the_device(tmp_path):
    shallow = make_model_dir(tmp_path / "shallow", n_layers=1)
    deep = make_model_dir(tmp_path / "deep", n_layers=4)
    est, deep_est = (memory.estimate_for_checkpoint(d, None, 8, 32) for d in (shallow, deep))
    tensors = load_file(str(shallow / "model.safetensors"))
    block = sum(t.numel() for k, t in tensors.items() if k.startswith("model.layers.0."))
    outside = sum(t.numel() for k, t in tensors.items() if ".layers." not in k)
    assert est.block_bytes == 4 * block and est.outside_bytes == 4 * outside
    assert est.device_bytes() >= est.block_bytes + est.stats_bytes + est.batch_bytes
    # more blocks: more host memory, the same device memory (one block at a time)
    assert deep_est.model_bytes == est.model_bytes + 3 * 4 * block
    assert deep_est.device_bytes() == est.device_bytes()
    assert deep_est.host_bytes(on_gpu=True) == deep_est.model_bytes + deep_est.stream_bytes
