"""Compression wall time and peak RSS of one compression, alone in a fresh process.

    .venv/bin/python bench/compress_alone.py                 # svd-llm 20 % on SmolLM2, 3 modes
    .venv/bin/python bench/compress_alone.py --modes one-pass --method nsvd --ratio 0.4

The training-free issue's goal: SmolLM2-135M, svd-llm at 20 %, 64 x 512 calibration tokens of
brown_calib.txt: wall time <= 120 s on the 2-core CPU, peak RSS <= 2x the fp32 model. Each mode
runs in its own process (nothing else resident: bench/quality.py keeps a dense copy for its
evaluation, so its RSS column is not this one), sampling the resident set every 20 ms:

* ``runtime``: RSS after importing torch + transformers + factorlm (before any model);
* ``loaded``: after ``load_model`` (safetensors weights are memory-mapped: pages count once read);
* ``peak``: the highest RSS while ``factorlm.compress`` runs; ``model_fp32``: parameter bytes.

Modes: ``one-pass`` (default pipeline), ``two-pass`` (``one_pass=False``), ``bf16`` (one pass,
``calib_dtype="bfloat16"``), ``two-pass-bf16`` (both). Results: bench/results/compress-alone-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED_DATA, git_commit, machine, versions, write_json  # noqa: E402

MODES = {
    "one-pass": {},
    "two-pass": {"one_pass": False},
    "bf16": {"calib_dtype": "bfloat16"},
    "two-pass-bf16": {"one_pass": False, "calib_dtype": "bfloat16"},
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def child(args) -> dict:
    runtime = _rss()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import factorlm

    runtime = _rss()
    model, tok = factorlm.load_model(args.model)
    loaded = _rss()
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    rep = factorlm.compress(
        model,
        args.method,
        args.ratio,
        str(Path(args.data) / "brown_calib.txt"),
        tok,
        n_samples=args.n_samples,
        batch_size=args.batch_size,
        seqlen=args.seqlen,
        progress=False,
        **MODES[args.child],
    )
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    return {
        "mode": args.child,
        "seconds": seconds,
        "runtime_bytes": runtime,
        "loaded_bytes": loaded,
        "peak_bytes": max(peak[0], _rss()),
        "final_bytes": _rss(),
        "model_fp32_bytes": model_bytes,
        "achieved_ratio": rep.achieved_ratio,
        "passes_per_block": rep.calibration.get("passes_per_block"),
        "mean_block_rel_error": sum(b.rel_output_error or 0 for b in rep.blocks) / len(rep.blocks),
    }


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [
        f"{m['method']} {m['ratio']:.0%} on {m['model']}, calibration {m['n_samples']} x "
        f"{m['seqlen']} tokens (batches of {m.get('batch_size', 8)}), one process per mode; machine {m['machine']['name']} "
        f"({m['machine']['cpu']}, {m['machine']['cores']} cores), commit {m['commit']}.",
        "",
        "| mode | passes/block | time s | peak RSS MiB | peak / fp32 model | runtime MiB | after load MiB | peak - runtime MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        mib = 2**20
        lines.append(
            f"| {r['mode']} | {r['passes_per_block']} | {r['seconds']:.1f} | {r['peak_bytes'] / mib:.0f} | "
            f"{r['peak_bytes'] / r['model_fp32_bytes']:.2f} | {r['runtime_bytes'] / mib:.0f} | "
            f"{r['loaded_bytes'] / mib:.0f} | {(r['peak_bytes'] - r['runtime_bytes']) / mib:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="svd-llm")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    ap.add_argument("--tag", default=None, help="suffix of the result files")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    meta = {
        "model": args.model,
        "method": args.method,
        "ratio": args.ratio,
        "n_samples": args.n_samples,
        "batch_size": args.batch_size,
        "seqlen": args.seqlen,
        "machine": machine(),
        "versions": versions(),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    res = {"meta": meta, "rows": rows}
    tag = f"-{args.tag}" if args.tag else ""
    name = f"compress-alone-{meta['machine']['name']}{tag}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", res)
    (RESULTS / f"{name}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
