"""torch.distributed: a 2-process torchrun (gloo, CPU) run gives the single-process model.

The worker (tests/dist_worker.py) compresses the same tiny Llama with each case below; rank 0
saves the result. Every process calibrates on half of the batches; the statistics are all-reduced,
so the factors equal the single-process ones up to float summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import factorlm
from factorlm import distributed

ROOT = Path(__file__).resolve().parents[1]

DISTILL = dict(
    method="distill",
    ratio=0.3,
    n_samples=8,
    seqlen=32,
    batch_size=2,
    holdout=1,
    steps=3,
    micro_batch=None,
    init="svd",
    # fp32 training: bf16 matmuls (autocast on CPUs with native bf16) round a batch of 4 rows
    # differently from two batches of 2, which is not what the comparison is about
    autocast=False,
)
CASES = {
    "svdllm": dict(method="svd-llm", ratio=0.3, n_samples=8, seqlen=32, batch_size=2),
    "svdllm_two_pass": dict(
        method="svd-llm", ratio=0.3, n_samples=8, seqlen=32, batch_size=2, one_pass=False
    ),
    "svdllm_global": dict(
        method="svd-llm", ratio=0.3, allocation="global", n_samples=8, seqlen=32, batch_size=2
    ),
    # 5 batches: 3 on rank 0, 2 on rank 1
    "asvd_uneven": dict(method="asvd", ratio=0.3, n_samples=10, seqlen=32, batch_size=2),
    # data parallel: rank 0 trains on rows 0-1, rank 1 on rows 2-3 and the gradients are averaged,
    # the single process trains on rows 0-3 in one batch (one step per batch: micro_batch=None);
    # rows 4-7 are held out in both
    "distill": DISTILL,
    # the end-to-end stage after the block pass: each process steps on its own rows (its whole
    # local batch per step), the gradients are averaged, so two steps equal the single process's
    # two steps on rows 0-3; the held-out KL is summed over both processes' held-out rows
    "distill_e2e": {**DISTILL, "e2e_epochs": 2, "e2e_lr": 1e-3, "e2e_micro_batch": 2},
    # the recipe (loss-aware ratios, refit_o, compensate), 3 / 2 batches
    "modular": dict(
        method="modular",
        ratio=0.3,
        n_samples=10,
        seqlen=32,
        batch_size=2,
        min_saving=0,
        compensate=True,
    ),  # fmt: skip
}
SINGLE = {  # the single-process run's differences
    "distill": {"batch_size": 4},
    "distill_e2e": {"batch_size": 4, "e2e_micro_batch": 4},
}


def _tiny_llama(path: Path) -> None:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    _tiny_llama(tmp / "model")
    g = torch.Generator().manual_seed(1)
    torch.save(torch.randint(0, 96, (10, 32), generator=g), tmp / "calib.pt")
    (tmp / "cases.json").write_text(json.dumps(CASES))
    out = tmp / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(ROOT / "tests" / "dist_worker.py"),
        str(tmp / "model"), str(tmp / "calib.pt"), str(out), str(tmp / "cases.json"),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return tmp, out, ranks


def _single(tmp: Path, kw: dict):
    model = tf.AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32).eval()
    ids = torch.load(tmp / "calib.pt")
    report = factorlm.compress(model, calibration=ids, progress=False, device="cpu", **kw)
    return model, report


@pytest.mark.dist
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_match_single_process(two_process_run, case):
    tmp, out, ranks = two_process_run
    model, report = _single(tmp, {**CASES[case], **SINGLE.get(case, {})})
    dist_sd = torch.load(out / f"{case}.pt")
    dist_report = factorlm.Report.from_dict(json.loads((out / f"{case}.json").read_text()))
    assert dist_report.environment["world_size"] == 2
    assert dist_report.ranks == report.ranks
    sd = model.state_dict()
    assert set(sd) == set(dist_sd)
    assert any(k.endswith("A.weight") for k in sd)
    for k, v in sd.items():
        scale = max(float(v.abs().max()), 1e-12)
        diff = float((v - dist_sd[k]).abs().max())
        assert diff <= 1e-5 * scale, f"{case} {k}: max diff {diff:.3g} (scale {scale:.3g})"
    for a, b in zip(report.blocks, dist_report.blocks, strict=True):
        assert a.rel_output_error == pytest.approx(b.rel_output_error, rel=1e-6, abs=1e-12)
        for x, y in ((a.loss_before, b.loss_before), (a.loss_after, b.loss_after)):
            assert x == (None if y is None else pytest.approx(y, rel=1e-5, abs=1e-9))
    for a, b in zip(report.modules, dist_report.modules, strict=True):
        assert (a.name, a.rank) == (b.name, b.rank)
        want = None if b.rel_error is None else pytest.approx(b.rel_error, rel=1e-6, abs=1e-12)
        assert a.rel_error == want
    e2e, dist_e2e = report.end_to_end, dist_report.end_to_end
    assert bool(e2e) == bool(dist_e2e) == (case == "distill_e2e")
    if e2e:
        assert dist_e2e["steps"] == e2e["steps"] == 2
        assert not e2e["kept_init"] and not dist_e2e["kept_init"]
        assert e2e["loss_after"] < e2e["loss_before"]
        for key in ("loss_before", "loss_after"):
            assert dist_e2e[key] == pytest.approx(e2e[key], rel=1e-5)
        # each process kept the optimizer state of its share of the weights only
        shares = [r["state_share"][case] for r in ranks]
        assert e2e["state_share"] == 1.0 and sum(shares) == pytest.approx(1.0)
        assert all(0.3 < s < 0.7 for s in shares), shares
    # every process ended with the very same model
    assert ranks[0]["checksums"][case] == ranks[1]["checksums"][case]


@pytest.mark.dist
@pytest.mark.parametrize("case", ["svdllm", "svdllm_two_pass", "asvd_uneven"])
def test_factorizations_are_spread_over_the_processes(two_process_run, case):
    """One pass (linears compressed as the tokens reach them) or two: each process factorizes a
    disjoint, non-empty share of the matrices, and the report says which process did which."""
    _, out, ranks = two_process_run
    report = factorlm.Report.from_dict(json.loads((out / f"{case}.json").read_text()))
    assert report.calibration["passes_per_block"] == (2 if case == "svdllm_two_pass" else 1)
    lowrank = {m.name for m in report.modules if m.kind == "lowrank"}
    shares = [ranks[r]["computed"][case] for r in range(2)]
    for r, share in enumerate(shares):
        assert share and len(share) == len(set(share)), (r, share)
    assert not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) == lowrank
    for share in shares:  # every block's work is shared, not only the model's
        assert {name.split(".")[2] for name in share} == {"0", "1", "2"}
    for r, share in enumerate(shares):
        assert set(share) == {m.name for m in report.modules if m.computed_by == r}


@pytest.mark.dist
def test_collectives(two_process_run):
    _, _, ranks = two_process_run
    for r, res in enumerate(ranks):
        u = res["unit"]
        assert (u["rank"], u["world"]) == (r, 2)
        assert u["shared_still_shared"]
        assert u["q_tokens"] == 6 and u["q_gram"] == [[3.0, 3.0], [3.0, 3.0]]
        assert u["b_tokens"] == 5 and u["b_gram"] == [[1.0] * 3] * 3
        assert u["b_abs_max"] == [4.0, 7.0, 2.5]
        assert u["owners"] == [1, 0, 1, 1]
        assert u["spread"] == [[0.0, 1.0], [1.0, 0.0], [2.0, 1.0], [3.0, 1.0]]
        assert u["error"] == "job 2 failed"
        assert u["mismatch"] == "FactorLMError" and u["min"] == 3
        assert u["grad"] == [1.5] * 3 and u["grad_none"] == [0.0, 0.0]
        # summed: arange * (1 + 2) + 2 i
        assert u["bucketed"] == [
            [0.0, 3.0, 6.0],
            [2.0, 5.0],
            [4.0 + 3 * k for k in range(6)],
            [6.0],
        ]
        assert u["broadcast"] == [[1.0, 1.0], [10.0, 10.0], [21.0, 21.0]]


def test_single_process_helpers_are_no_ops():
    assert not distributed.is_dist()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.all_sum([1.0, 2.0]) == [1.0, 2.0]
    calls = []
    res = distributed.spread([3, 1], [1, 1], lambda j: calls.append(j) or j * 2, None, None)
    assert res == [6, 2] and calls == [3, 1]


def test_assign_is_longest_processing_time():
    costs = [
        distributed.matrix_cost(m, n) for m, n in [(64, 64)] * 4 + [(128, 64)] * 2 + [(64, 128)]
    ]
    owners = distributed.assign(costs, world=2)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(2)]
    assert owners[4] != owners[5]  # the two costliest go to different processes
    assert max(loads) - min(loads) <= max(costs)
    assert distributed.assign([1.0] * 5, world=3) == [0, 1, 2, 0, 1]


def test_capture_keeps_tied_weights_tied_and_leaves_the_lm_head():
    from factorlm.arch.modules import get_blocks, get_spec
    from factorlm.calibration.pipeline import _move_slots, _outside_slots

    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    tied = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(tie_word_embeddings=True, **cfg))
    moved = _move_slots(_outside_slots(tied, get_blocks(tied, get_spec(tied))), "meta")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.lm_head.weight.is_meta and moved
    untied = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(tie_word_embeddings=False, **cfg))
    _move_slots(_outside_slots(untied, get_blocks(untied, get_spec(untied))), "meta")
    assert untied.model.embed_tokens.weight.is_meta and not untied.lm_head.weight.is_meta


def test_cuda_means_this_process_gpu_before_the_group_starts(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert not distributed.is_dist() and distributed.launched()
    assert distributed.resolve_device("cuda") == torch.device("cuda", 3)
    assert distributed.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.default_device() == torch.device("cuda", 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.resolve_device("cuda") == "cuda"
    assert distributed.default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.default_device() == torch.device("cpu")
