"""Peak host memory of ``factorlm.load`` on a saved compressed model (SmolLM2-135M by default).

    .venv/bin/python bench/load_rss.py                          # compresses smollm2 (svd, 20 %) once
    .venv/bin/python bench/load_rss.py --model-dir DIR --baseline-src OLD/src

Each load runs in a fresh process that first imports the architecture's modules (so their code is
not counted), then loads; the figure is the resident-set high-water mark minus the resident set
before the load, against the unique bytes of the loaded weights. ``--baseline-src`` measures the
same load with another factorlm source tree (e.g. an older commit's ``src``) for comparison.
Result: bench/results/load-rss-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, machine, versions

CHILD = r"""
import json, resource, sys
import factorlm, transformers
def cur():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
cfg = json.load(open(sys.argv[1] + "/config.json"))
arch = getattr(transformers, cfg["architectures"][0])
arch.config_class  # imports the modeling module
before = cur()
model = factorlm.load(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
print(json.dumps({"before": before, "peak": peak, "weights": sum(unique.values())}))
"""


def measure(src: Path, model_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_dir)], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["before"]
    return {**r, "load_bytes": growth, "load_over_weights": growth / r["weights"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--baseline-src", type=Path, default=None)
    args = p.parse_args()
    src = Path(__file__).resolve().parents[1] / "src"
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = Path(tempfile.mkdtemp()) / "smollm2-svd-0.2"
        subprocess.run(
            [sys.executable, "-m", "factorlm.cli", "-q", "compress", "smollm2-135m", "--method",
             "svd", "--ratio", "0.2", "--n-samples", "4", "--seqlen", "64", "--out",
             str(model_dir), "--no-memory-check"],
            env={**os.environ, "PYTHONPATH": str(src)},
            check=True,
        )  # fmt: skip
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=src
    ).stdout.strip()
    row = {"model_dir": str(model_dir), "commit": commit, "this": measure(src, model_dir)}
    if args.baseline_src is not None:
        row["baseline"] = {"src": str(args.baseline_src), **measure(args.baseline_src, model_dir)}
    m = machine()
    result = {"machine": m, "versions": versions(), "rows": [row]}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"load-rss-{m['name']}.json"
    path.write_text(json.dumps(result, indent=2))
    for k in ("this", "baseline"):
        if k in row:
            r = row[k]
            print(
                f"{k}: load peak {r['load_bytes'] / 2**20:.0f} MiB for "
                f"{r['weights'] / 2**20:.0f} MiB of weights ({r['load_over_weights']:.2f}x)"
            )
    print(f"written {path}")


if __name__ == "__main__":
    main()
