"""Worker launched by ``torchrun`` in tests/test_distributed.py (gloo on CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py MODEL_DIR CALIB OUT CASES

Runs the collective unit checks, then every compression case of the JSON file CASES
({name: {compress kwargs}}) on a fresh copy of the model in MODEL_DIR with the token batches in
CALIB. Rank 0 saves each compressed state dict and report to OUT/<name>.pt / .json; every rank
writes OUT/rank<r>.json with a checksum of each compressed model (they must agree), the names of
the matrices it factorized itself, and the results of the unit checks.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import transformers as tf

import factorlm
from factorlm import distributed
from factorlm.calibration.stats import LayerStats


def unit_checks() -> dict:
    """Collectives on hand-made inputs; every value must be the same on every rank."""
    r, w = distributed.rank(), distributed.world_size()
    out: dict = {"rank": r, "world": w}
    # statistics: rank 1 saw no token for "b" (an unrouted expert); "q"/"k" share one accumulator
    shared = LayerStats(n_tokens=3, gram=torch.full((2, 2), r + 1.0, dtype=torch.float64))
    b = LayerStats()
    if r == 0:
        b = LayerStats(
            n_tokens=5,
            gram=torch.ones(3, 3, dtype=torch.float64),
            abs_max=torch.tensor([1.0, 7.0, 2.0], dtype=torch.float64),
        )
    else:
        b.abs_max = torch.tensor([4.0, 0.5, 2.5], dtype=torch.float64)
    stats = {"q": shared, "k": shared, "b": b}
    distributed.allreduce_stats(stats, {"q": (4, 2), "k": (4, 2), "b": (5, 3)})
    out["shared_still_shared"] = stats["q"] is stats["k"]
    out["q_tokens"] = stats["q"].n_tokens
    out["q_gram"] = stats["q"].gram.tolist()
    out["b_tokens"] = stats["b"].n_tokens
    out["b_gram"] = stats["b"].gram.tolist()
    out["b_abs_max"] = stats["b"].abs_max.tolist()
    # spread: results computed once, known everywhere; an error is raised on every rank
    owners = distributed.assign([1, 5, 2, 2])
    out["owners"] = owners
    who = distributed.spread(
        [0, 1, 2, 3],
        [1, 5, 2, 2],
        lambda j: torch.tensor([float(j), float(distributed.rank())]),
        lambda t: ([t], {"by": distributed.rank()}),
        lambda j, ts, meta: ts[0],
    )
    out["spread"] = [t.tolist() for t in who]

    def boom(j):
        if j == 2:
            raise factorlm.NumericalError("job 2 failed")
        return torch.zeros(1)

    try:
        distributed.spread(
            [0, 1, 2, 3], [1, 5, 2, 2], boom, lambda t: ([t], None), lambda *a: a[1][0]
        )
        out["error"] = None
    except factorlm.NumericalError as e:
        out["error"] = str(e)
    # a block whose accumulator sharing differs between processes is refused everywhere
    a = LayerStats(n_tokens=1, gram=torch.ones(2, 2, dtype=torch.float64))
    odd = {"q": a, "k": a} if r == 0 else {"q": a, "k": LayerStats()}
    try:
        distributed.allreduce_stats(odd, {"q": (2, 2), "k": (2, 2)})
        out["mismatch"] = None
    except factorlm.FactorLMError as e:
        out["mismatch"] = type(e).__name__
    out["min"] = distributed.all_min(3 + r)
    # gradients: averaged
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(r + 1))
    q = torch.nn.Parameter(torch.zeros(2))  # no gradient on any rank: zeros
    distributed.allreduce_grads([p, q])
    out["grad"] = p.grad.tolist()
    out["grad_none"] = q.grad.tolist()
    # in buckets of at most 4 elements (a gradient larger than a bucket goes alone)
    bucket = distributed.BUCKET_ELEMENTS
    distributed.BUCKET_ELEMENTS = 4
    ps = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 2, 6, 1)]
    for i, x in enumerate(ps):
        x.grad = torch.arange(x.numel(), dtype=torch.float32) * (r + 1) + i
    distributed.allreduce_grads(ps, average=False)
    distributed.BUCKET_ELEMENTS = bucket
    out["bucketed"] = [x.grad.tolist() for x in ps]
    # each tensor from its owner
    ts = [torch.full((2,), 10.0 * i + r) for i in range(3)]
    distributed.broadcast_from_owners(ts, [1, 0, 1])
    out["broadcast"] = [t.tolist() for t in ts]
    return out


def checksum(model: torch.nn.Module) -> list[float]:
    return [float(v.double().sum()) for v in model.state_dict().values()]


def record_factorizations(computed: list[str]) -> None:
    """Append the name of every matrix this process factorizes to ``computed``."""
    from factorlm.methods import trainingfree

    factorize = trainingfree.factorize_module

    def recording(*args, **kwargs):
        computed.append(args[5] if len(args) > 5 else kwargs["name"])
        return factorize(*args, **kwargs)

    trainingfree.factorize_module = recording


def main() -> int:
    model_dir, calib, out, cases_file = sys.argv[1:5]
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    assert distributed.is_dist()
    mine = {"unit": unit_checks(), "checksums": {}, "computed": {}, "state_share": {}}
    computed: list[str] = []
    record_factorizations(computed)
    ids = torch.load(calib)
    with open(cases_file) as f:
        cases = json.load(f)
    for name, kw in cases.items():
        model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        computed.clear()
        report = factorlm.compress(model, calibration=ids, progress=False, device="cpu", **kw)
        mine["checksums"][name] = checksum(model)
        mine["computed"][name] = list(computed)
        mine["state_share"][name] = report.end_to_end.get("state_share")
        if distributed.is_main():
            torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}/{name}.pt")
            with open(f"{out}/{name}.json", "w") as f:
                f.write(report.to_json())
    with open(f"{out}/rank{distributed.rank()}.json", "w") as f:
        json.dump(mine, f)
    distributed.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
