"""Inference speed: dense vs compressed SmolLM2-135M, side by side in one process.

    python bench/speed.py --models-dir /work/bench-models          # CPU here: fp32, batch 1
    python bench/speed.py --dtype bfloat16 --batch-sizes 1 8 32 --device cuda --compile

Compressed models come from ``<models-dir>/<method>-<ratio>`` when saved there (speed depends on
the ranks and widths, not on the factor values), else they are compressed here on the bundled
calibration sample. Each compressed model is measured as loaded (``unfused``: one matmul per
factor) and with its q/k/v and gate/up first factors stacked (``fused``,
:mod:`factorlm.nn.fused`). All models' runs are interleaved (repeats alternate between models) and
reported as ratios to the dense model, since the machine is shared and noisy; ``--rounds`` repeats
the whole interleaved measurement and the table reports the median ratio over rounds.
Writes bench/results/speed-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, git_commit, machine, versions, write_json  # noqa: E402

import factorlm  # noqa: E402
from factorlm.eval.speed import speed_table  # noqa: E402
from factorlm.nn.fused import fuse  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--runs", nargs="+", default=["svd-llm@0.2", "svd-llm@0.4", "lorap@0.2", "lorap@0.4"]
    )
    p.add_argument("--models-dir", default=None)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also torch.compile + static cache")
    p.add_argument(
        "--unfused",
        nargs="*",
        default=["svd-llm@0.2", "svd-llm@0.4"],
        help="runs also measured unfused (one matmul per factor)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    return p.parse_args()


def compressed(dense, tok, method: str, ratio: float, models_dir: str | None):
    saved = Path(models_dir or "/nonexistent") / f"{method}-{ratio}"
    if (saved / "config.json").is_file():
        return factorlm.load(saved)
    m = copy.deepcopy(dense)
    factorlm.compress(
        m, method=method, ratio=ratio, tokenizer=tok, n_samples=8, seqlen=256, progress=False
    )
    return m


def median_rows(rounds: list[list[dict]], params: dict[str, int]) -> list[dict]:
    """One row per model, batch size and mode: the median over the rounds of each measurement
    (ratios per round first), with every round's value kept under ``<key>_rounds``."""
    rows = []
    for i, first in enumerate(rounds[0]):
        same = [rnd[i] for rnd in rounds]
        row = {k: v for k, v in first.items() if not isinstance(v, float)}
        for key in (
            "prefill_tok_s",
            "decode_tok_s",
            "prefill_ratio",
            "decode_ratio",
            "peak_mem_bytes",
            "model_bytes",
        ):
            values = [r.get(key) for r in same]
            measured = [v for v in values if v is not None]  # memory: None with --no-memory
            row[key] = statistics.median(measured) if measured else None
            row[f"{key}_rounds"] = values
        row["params"] = params[first["model"]]
        rows.append(row)
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    """The markdown table of :func:`median_rows`."""
    lines = [
        "| model | batch | mode | params | prefill tok/s | decode tok/s | prefill vs dense | decode vs dense | decode ratio per round | peak memory MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = " / ".join(f"{v:.2f}" for v in r["decode_ratio_rounds"])
        mem = "–" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['mode']} | {r['params'] / 1e6:.1f} M | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
            f"{r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} | {per} | {mem} |"
        )
    return lines


def main() -> None:
    args = parse()
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dense, tok = factorlm.load_model(args.model)
    models = {"dense": dense}
    for run in args.runs:
        method, _, ratio = run.rpartition("@")
        m = compressed(dense, tok, method, float(ratio), args.models_dir)
        if run in args.unfused:
            models[f"{method} {ratio} unfused"] = m
            m = copy.deepcopy(m)
        fuse(m)
        models[f"{method} {ratio} fused"] = m
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    for m in models.values():
        m.to(device=device, dtype=dtype)
    rounds = []
    for _ in range(args.rounds):
        rounds.append(
            speed_table(
                models,
                batch_sizes=tuple(args.batch_sizes),
                compile_modes=(False, True) if args.compile else (False,),
                prompt_len=args.prompt_len,
                gen_len=args.gen_len,
                device=device,
                repeats=args.repeats,
                memory=not args.no_memory,
            )
        )
    rows = median_rows(rounds, params)
    mach = machine()
    meta = {
        "model": args.model,
        "dtype": args.dtype,
        "device": device,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "machine": mach,
        "versions": versions(),
        "commit": git_commit(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"speed-{mach['name']}.json", {"meta": meta, "rows": rows})
    lines = [
        f"Machine {mach['name']} ({mach['cpu']}, gpu {mach['gpu']}, {torch.get_num_threads()} threads, shared with other jobs); "
        f"{args.dtype}; prompt {args.prompt_len} tokens, {args.gen_len} generated; prefill = generate's first step (fills the KV cache, "
        f"logits of the last position only); every model's runs interleaved, "
        f"{args.repeats} timed runs per round, median of {args.rounds} rounds (ratios per round, then the median); commit {meta['commit']}.",
        "",
        *table_lines(rows),
    ]
    (RESULTS / f"speed-{mach['name']}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
