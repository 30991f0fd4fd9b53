"""The model stays in host memory; only one block at a time visits the compute device.

A CPU-only machine cannot run CUDA, so the compute device here is ``cpu:0``: a distinct
``torch.device`` (``!= cpu``, the offload device) on which tensors still live in host memory. Every
``Tensor.to`` of a parameter is recorded, and the bytes of parameters whose last move went to
``cpu:0`` must never exceed the largest block plus what runs before the first block (the
embeddings): moving the whole model there (as ``load_model(device=...)`` does) fails the test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import factorlm
from factorlm.arch.modules import get_blocks, get_spec
from factorlm.cli import main
from helpers_cli import make_model_dir, write_calib

COMPUTE = torch.device("cpu", 0)


class PlacementRecorder:
    """Copies of parameters made on :data:`COMPUTE` that are alive and not moved back yet."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # data_ptr -> (storage, bytes)
        self.peak = 0
        self.moved: set[int] = set()  # data_ptr of every parameter moved to COMPUTE

    def resident(self) -> int:
        return sum(n for ref, n in self.live.values() if not ref.expired())

    def to(self, to, t: torch.Tensor, args, kwargs) -> torch.Tensor:
        out = to(t, *args, **kwargs)
        target = torch._C._nn._parse_to(*args, **kwargs)[0]
        if not isinstance(t, nn.Parameter) or target is None:
            return out
        if target == COMPUTE:  # a copy (cpu:0 is another device), like a GPU's
            self.moved.add(t.data_ptr())
            ref = StorageWeakRef(out.untyped_storage())
            self.live[out.data_ptr()] = (ref, out.numel() * out.element_size())
            self.peak = max(self.peak, self.resident())
        else:  # back to the host: the device copy is released
            self.live.pop(t.data_ptr(), None)
        return out


@pytest.fixture
def recorder(monkeypatch):
    rec = PlacementRecorder()
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: rec.to(to, self, a, k))
    return rec


def _budget(model: nn.Module) -> tuple[int, list[set[int]]]:
    """Bytes of the largest block + everything outside the blocks but the LM head; and the
    storage addresses of each block's parameters."""
    blocks = get_blocks(model, get_spec(model))
    per_block = [{p.data_ptr() for p in b.parameters()} for b in blocks]
    block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    inside = set().union(*per_block) | {p.data_ptr() for p in model.lm_head.parameters()}
    outside = sum(
        p.numel() * p.element_size() for p in model.parameters() if p.data_ptr() not in inside
    )
    return block_bytes + outside, per_block


@pytest.mark.parametrize("extra", [[], ["--two-pass"]], ids=["one-pass", "two-pass"])
def test_cli_compress_moves_one_block_at_a_time(tmp_path, recorder, monkeypatch, extra):
    model_dir = make_model_dir(tmp_path / "model", n_layers=3)
    write_calib(tmp_path / "calib.txt")
    loaded = {}
    load_model = factorlm.load_model

    def keep(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)
        loaded["model"] = model
        loaded["budget"], loaded["blocks"] = _budget(model)
        return model, tok

    monkeypatch.setattr(factorlm, "load_model", keep)
    argv = ["-q", "compress", str(model_dir), "--method", "svd-llm", "--ratio", "0.3",
            "--n-samples", "8", "--seqlen", "32", "--calib", str(tmp_path / "calib.txt"),
            "--device", "cpu:0", "--out", str(tmp_path / "out"), *extra]  # fmt: skip
    assert main(argv) == 0
    whole = sum(p.numel() * p.element_size() for p in torch.nn.Module.parameters(loaded["model"]))
    assert loaded["budget"] < whole  # the bound below can tell one block from the model
    assert 0 < recorder.peak <= loaded["budget"], (recorder.peak, loaded["budget"], whole)
    for block in loaded["blocks"]:  # compress() got the device: every block went there
        assert block <= recorder.moved
