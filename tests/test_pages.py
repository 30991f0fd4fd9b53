"""Pages of memory-mapped weights (factorlm.pages): handed back only when that loses nothing."""

from __future__ import annotations

import copy

import torch

import factorlm
from factorlm.pages import _mapped_spans
from helpers_cli import make_model_dir

DISTILL = dict(
    method="distill", ratio=0.3, n_samples=8, seqlen=16, batch_size=2, steps=2, holdout=1,
    init="svd", progress=False,
)  # fmt: skip


def test_distill_of_a_mapped_model_edited_in_place_uses_the_edits(tmp_path):
    """A user merged something into the weights in place (copy-on-write pages of the mapped
    checkpoint): compression, and distillation's dense weights read after the replacement, see
    the edited values, exactly as with the same model held in ordinary memory."""
    model, _ = factorlm.load_model(str(make_model_dir(tmp_path / "m", n_layers=2)))
    weights = [p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]
    assert all(_mapped_spans([w]) for w in weights)  # the weights are the file's mapping
    with torch.no_grad():
        for w in weights:
            w.mul_(-1.5)  # every page written: none of them equals the file any more
    in_memory = copy.deepcopy(model)  # the same values, in anonymous memory
    assert not any(_mapped_spans([p]) for p in in_memory.parameters())
    ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    mapped_report = factorlm.compress(model, calibration=ids, **DISTILL)
    report = factorlm.compress(in_memory, calibration=ids, **DISTILL)
    for a, b in zip(mapped_report.modules, report.modules, strict=True):
        assert a.name == b.name and a.rel_error == b.rel_error, a.name
    for a, b in zip(mapped_report.blocks, report.blocks, strict=True):
        assert (a.loss_before, a.loss_after) == (b.loss_before, b.loss_after)
    sd = in_memory.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
