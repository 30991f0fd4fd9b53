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


def _rss_file() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


def test_replaced_weights_of_a_mapped_checkpoint_leave_memory(tmp_path):
    """A replaced weight memory-mapped from a file: its clean pages are handed back (its content
    stays readable), a page written since loading keeps its value, an aliased weight is kept."""
    from factorlm.arch.modules import replace_module

    n = 16 * 2**20  # 64 MiB of float32
    path = tmp_path / "weights.bin"
    torch.arange(n, dtype=torch.float32).numpy().tofile(path)

    def mapped_linear() -> torch.nn.Linear:
        lin = torch.nn.Linear(1, 1)
        t = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
        lin.weight = torch.nn.Parameter(t.view(-1, 1024), requires_grad=False)
        return lin

    root = torch.nn.Sequential(mapped_linear())
    w = root[0].weight  # the weight itself (not an alias): factorlm reads it before replacing
    assert float(w.sum()) != 0  # fault every page in
    alias = w.detach()  # someone still reads the dense weight (distillation does)
    before = _rss_file()
    replace_module(root, "0", torch.nn.Identity())
    assert before - _rss_file() < 2**20  # kept: an alias shares its storage
    assert float(alias.sum()) != 0
    del alias, w

    root[0] = mapped_linear()
    w = root[0].weight
    w[100, 0] = -7.0  # copy-on-write: this page now differs from the file
    assert float(w.sum()) != 0
    before = _rss_file()
    replace_module(root, "0", torch.nn.Identity())
    assert before - _rss_file() >= 0.9 * n * 4
    assert float(w[100, 0]) == -7.0  # the written page was not dropped
    assert torch.equal(w[0, :5], torch.arange(5, dtype=torch.float32))  # re-read from the file

    anon = torch.nn.Linear(1024, 1024)
    root[0] = anon
    w = anon.weight.detach().clone()
    replace_module(root, "0", torch.nn.Identity())  # not a file mapping: untouched
    assert torch.equal(anon.weight, w)


def test_clean_pages_of_a_weight_in_use_leave_memory_but_written_pages_stay(tmp_path):
    """The NaN check reads every weight: the pages still equal to the file are handed back (they
    fault in again on the next read), a page written since (copy-on-write) keeps its new value."""
    from factorlm.pages import release_clean_pages
    from factorlm.preflight import check_finite_weights

    n = 16 * 2**20  # 64 MiB of float32
    path = tmp_path / "weights.bin"
    torch.arange(n, dtype=torch.float32).numpy().tofile(path)
    t = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
    t[1024 * 100] = -7.0  # one page now differs from the file
    model = torch.nn.Linear(1, 1)
    model.weight = torch.nn.Parameter(t.view(-1, 1024), requires_grad=False)
    before = _rss_file()
    check_finite_weights(model)  # reads (faults in) everything, then releases the clean pages
    assert before - _rss_file() >= -4 * 2**20  # not the whole 64 MiB left resident
    assert float(t[1024 * 100]) == -7.0  # the written page was not dropped
    assert torch.equal(t[:5], torch.arange(5, dtype=torch.float32))
    assert float(t.sum()) > 0  # everything in again
    assert release_clean_pages([t]) >= n * 4 - 3 * 4096  # all but the written (and edge) pages
    assert float(t[1024 * 100]) == -7.0
    anon = torch.ones(2**20)
    assert release_clean_pages([anon]) == 0
