"""The peak-memory estimate and check before the model is loaded (factorlm.memory)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import factorlm
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
    # modular's loss_metric keeps two hidden x hidden float32 Grams per block on the host
    metric = memory.estimate_for_checkpoint(files / "model", None, 8, 32, loss_metric=True)
    hidden = 64
    assert metric.total - est.total == 2 * 2 * hidden * hidden * 4  # the tiny model's 2 blocks
    assert metric.host_bytes(True) - est.host_bytes(True) == 2 * 2 * hidden * hidden * 4
    assert "loss_metric's gradient Grams" in metric.describe()
    assert memory.available_bytes() is None or memory.available_bytes() > 0


@pytest.mark.parametrize(
    ("method", "options", "keeps"),
    [
        ("modular", {}, True),  # the default recipe measures its fits in the loss's metric
        ("modular", {"loss_metric": False}, False),
        ("modular", {"allocation": "uniform"}, False),
        ("modular", {"select": "lorap"}, False),
        ("distill", {"allocation": "loss"}, True),  # modular's init, its default
        ("distill", {"allocation": "loss", "init_options": {"loss_metric": False}}, False),
        ("distill", {}, False),  # lorap's init
        ("svd-llm", {}, False),
    ],
)
def test_the_estimate_knows_which_configs_keep_the_loss_metric(method, options, keeps):
    from factorlm.methods.base import get_method

    config = get_method(method).config.from_options(ratio=0.2, **options)
    assert memory.keeps_loss_metric(config) is keeps


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
    # torchrun with 8 processes on this machine: each holds its model and activations (11 GiB)
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    gpu["free"] = 4 * 2**30
    with pytest.raises(memory.InsufficientMemoryError, match="8 processes on this host") as e:
        memory.check_memory(est, "cuda")
    assert "88.00 GiB" in str(e.value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    memory.check_memory(est, "cuda")  # 44 GiB of 64


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


def test_memory_estimate_of_the_end_to_end_stage(files, monkeypatch):
    """distill's end-to-end stage holds the whole compressed model, its training state and one
    micro-batch through every block on the device; the host keeps the block pass's weights."""
    base = memory.estimate_for_checkpoint(files / "model", None, 8, 32)
    tensors = load_file(str(files / "model" / "model.safetensors"))
    outside = sum(t.numel() for k, t in tensors.items() if ".layers." not in k)
    blocks = sum(t.numel() for t in tensors.values()) - outside
    plan = memory.EndToEndPlan(ratio=0.25, micro_batch=1)
    est = memory.estimate_for_checkpoint(files / "model", None, 8, 32, e2e=plan)
    kept = int(blocks * 0.75)
    assert est.e2e_weights_bytes == 4 * (kept + outside) and est.e2e_copy_bytes == 4 * kept
    assert est.e2e_train_bytes > 4 * kept  # fp32 gradients + activations
    assert est.e2e_state_bytes == 8 * kept  # fp32: two AdamW moments, no master copy
    assert est.e2e_host_state_bytes == 12 * kept  # offloaded: every weight gets an fp32 master
    assert est.model_bytes == base.model_bytes and est.stream_bytes == base.stream_bytes
    on_device = dataclasses.replace(est, e2e_offload="off")
    assert on_device.device_bytes() >= (
        est.e2e_weights_bytes + est.e2e_train_bytes + est.e2e_state_bytes
    )
    assert on_device.host_bytes(on_gpu=True) == base.host_bytes(on_gpu=True) + est.e2e_copy_bytes
    # offloaded: the state moves from the device to the host
    off = dataclasses.replace(est, e2e_offload="on")
    stage_only = dict(block_bytes=0, stats_bytes=0, batch_bytes=0, outside_bytes=0)
    assert dataclasses.replace(off, **stage_only).device_bytes() == (
        dataclasses.replace(on_device, **stage_only).device_bytes() - est.e2e_state_bytes
    )
    assert off.host_bytes(on_gpu=True) == on_device.host_bytes(on_gpu=True) + 12 * kept
    assert est.total >= base.model_bytes + base.stream_bytes + est.e2e_train_bytes + 8 * kept
    bf16 = memory.estimate_for_checkpoint(files / "model", "bf16", 8, 32, e2e=plan)
    assert bf16.e2e_train_bytes - est.e2e_train_bytes == -2 * kept  # half the gradient
    assert bf16.e2e_state_bytes == 12 * kept == bf16.e2e_host_state_bytes  # + fp32 masters
    wider = memory.estimate_for_checkpoint(files / "model", None, 8, 32, e2e=dataclasses.replace(
        plan, micro_batch=4
    ))  # fmt: skip
    assert wider.e2e_train_bytes > est.e2e_train_bytes
    assert memory.EndToEndPlan.of(factorlm.make_config("svd-llm", ratio=0.2)) is None
    assert memory.EndToEndPlan.of(factorlm.make_config("distill", ratio=0.2)) is None
    of = memory.EndToEndPlan.of(
        factorlm.make_config("distill", ratio=0.3, e2e_epochs=1, e2e_micro_batch=2)
    )
    assert (of.ratio, of.micro_batch, of.offload, of.shards) == (0.3, 2, "auto", 1)
    # torchrun: each process holds its share of the optimizer state
    sharded = memory.estimate_for_checkpoint(files / "model", None, 8, 32, e2e=dataclasses.replace(
        plan, shards=4
    ))  # fmt: skip
    assert sharded.e2e_state_bytes == 2 * kept and sharded.e2e_host_state_bytes == 3 * kept
    assert sharded.e2e_train_bytes == est.e2e_train_bytes
    monkeypatch.setenv("WORLD_SIZE", "4")
    config = factorlm.make_config("distill", ratio=0.3, e2e_epochs=1)
    assert memory.EndToEndPlan.of(config).shards == 4
    of = memory.EndToEndPlan.of(
        factorlm.make_config("distill", ratio=0.3, e2e_epochs=1, e2e_offload="off")
    )
    assert of.offload == "off"
    with pytest.raises(factorlm.ConfigError, match="e2e_offload"):
        factorlm.make_config("distill", ratio=0.3, e2e_epochs=1, e2e_offload="yes")


def test_a_7b_end_to_end_stage_fits_an_80_gib_gpu_with_its_optimizer_state_offloaded(monkeypatch):
    """A Llama-2-7B-shaped run in bf16: the block pass fits an 80 GiB GPU; the end-to-end stage
    with its optimizer state on the device (fp32 masters and AdamW moments of ~5.2 B trainable
    parameters) does not, and the message says why and what to change; "auto" puts the state on
    the host, where the run fits (a 40 GiB GPU still refuses it)."""
    outside = 2 * 32000 * 4096 + 4096
    shape = dict(
        n_params=6_738_415_616,
        block_params=202_383_360,
        hidden=4096,
        max_in=11008,
        n_samples=64,
        seqlen=512,
        dtype_bytes=2,
        intermediate=11008,
        n_heads=32,
        outside_params=outside,
    )
    blockwise = memory.estimate(**shape)
    plan = memory.EndToEndPlan(0.2, 1, n_blocks=32, vocab=32000, offload="off")
    e2e = memory.estimate(**shape, e2e=plan)
    assert blockwise.device_bytes() < 16 * 2**30 < 80 * 2**30 < e2e.device_bytes()
    gpu = {"free": 80 * 2**30}
    monkeypatch.setattr(
        memory, "available_bytes", lambda device=None: gpu["free"] if device else 512 * 2**30
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    memory.check_memory(blockwise, "cuda")
    with pytest.raises(memory.InsufficientMemoryError, match="free memory on cuda") as e:
        memory.check_memory(e2e, "cuda")
    msg = str(e.value)
    assert "end-to-end stage" in msg and "e2e_epochs=0" in msg and "e2e_offload=auto" in msg
    auto = memory.estimate(**shape, e2e=dataclasses.replace(plan, offload="auto"))
    offloaded = dataclasses.replace(auto, e2e_offload="on")
    assert offloaded.device_bytes() < 40 * 2**30  # weights, gradients, one micro-batch
    assert offloaded.host_bytes(on_gpu=True) > 6.7e9 * 2 + 5.2e9 * 12  # + masters and moments
    memory.check_memory(auto, "cuda")
    gpu["free"] = 20 * 2**30
    with pytest.raises(memory.InsufficientMemoryError, match="offloaded"):
        memory.check_memory(auto, "cuda")


def test_cli_counts_the_end_to_end_stage(files, capsys, no_load, monkeypatch):
    seen = []
    monkeypatch.setattr(memory, "check_memory", lambda est, device=None: seen.append(est))
    dist = _base(files, **{"--method": "distill", "--ratio": "0.4"})
    for opts in ([], ["--opt", "e2e_epochs=1", "--opt", "e2e_micro_batch=2"]):
        _, err = _cli(capsys, "compress", files / "model", *dist, *opts)
        assert "MODEL-LOADED" in _error_line(err)  # checked, then loaded
    plain, e2e = seen
    assert plain.e2e_train_bytes == 0 and e2e.e2e_train_bytes > 0
    want = memory.estimate_for_checkpoint(
        files / "model", None, 8, 32, e2e=memory.EndToEndPlan(0.4, 2, offload="auto")
    )
    assert e2e == want
