"""Inference speed and memory: dense vs compressed SmolLM2-135M at each ratio, side by side.

    python bench/speed.py                     # CPU here: fp32, batch 1
    python bench/speed.py --dtype bfloat16 --batch-sizes 1 16 --device cuda   # on a GPU

The compressed models are built with svd-llm (uniform ranks) on the bundled calibration sample
(speed does not depend on the factor values, only on the ranks). Models are measured interleaved
(repeats alternate between models) and reported as ratios to the dense model, since machines are
noisy. Writes bench/results/speed-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, versions, write_json  # noqa: E402

import factorlm  # noqa: E402
from factorlm.eval.speed import compare_speed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--method", default="svd-llm")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    dense, tok = factorlm.load_model(args.model)
    models = {"dense": dense}
    for r in args.ratios:
        m = copy.deepcopy(dense)
        factorlm.compress(
            m, method=args.method, ratio=r, tokenizer=tok, n_samples=8, seqlen=256, progress=False
        )
        models[f"{args.method} {r:.1f}"] = m
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for m in models.values():
        m.to(device=device, dtype=dtype)
    rows = []
    for bs in args.batch_sizes:
        res = compare_speed(
            models,
            batch_size=bs,
            prompt_len=args.prompt_len,
            gen_len=args.gen_len,
            device=device,
            repeats=args.repeats,
        )
        for name, r in res.items():
            rows.append({"model": name, "batch_size": bs, **r})
    mach = machine()
    meta = {
        "model": args.model,
        "dtype": args.dtype,
        "device": device,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "machine": mach,
        "versions": versions(),
        "command": " ".join(sys.argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"speed-{mach['name']}.json", {"meta": meta, "rows": rows})
    lines = [
        f"Machine {mach['name']} ({mach['cpu']}, gpu {mach['gpu']}); {args.dtype}; prompt {args.prompt_len} tokens, {args.gen_len} generated.",
        "",
        "| model | batch | params | prefill tok/s | decode tok/s | prefill vs dense | decode vs dense | peak memory MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = sum(p.numel() for p in models[r["model"]].parameters())
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {params / 1e6:.1f} M | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
            f"{r.get('prefill_ratio', 1.0):.2f} | {r.get('decode_ratio', 1.0):.2f} | {r['peak_mem_bytes'] / 2**20:.0f} |"
        )
    (RESULTS / f"speed-{mach['name']}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
