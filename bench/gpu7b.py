"""A Llama-2-7B-shaped model with random weights on a GPU: compression time and device memory, and
dense vs compressed prefill / decode speed in bf16, side by side in one process.

    python bench/gpu7b.py                                   # a lent H100 / H200: ~10 min
    python bench/gpu7b.py --shape tiny --device cpu --dtype float32 --batch-sizes 1 --rounds 1

Random weights (seeded): speed depends on the shapes (ranks, widths), not on the values, and the
compression runs on random token ids (no tokenizer needed, nothing downloaded) with the
benchmark's 64 x 512 tokens. Each ratio is compressed from the dense model kept on the host, one
block at a time on the device (the normal pipeline): wall time and the device's peak allocated
memory. Then the dense and the compressed models (their q/k/v and gate/up first factors stacked)
run prompt 256 + 64 new tokens at every batch size, eager (and with ``--compile``, torch.compile
with a static cache), every model's runs interleaved, median of ``--rounds`` rounds of ratios.
Writes bench/results/gpu7b-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, git_commit, machine, versions, write_json  # noqa: E402
from speed import median_rows, table_lines  # noqa: E402

import factorlm  # noqa: E402
from factorlm.eval.speed import speed_table  # noqa: E402
from factorlm.nn.fused import fuse  # noqa: E402

SHAPES = {
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--method", default="modular")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also torch.compile + static cache")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build(shape: str, dtype: torch.dtype, device: str, seed: int) -> torch.nn.Module:
    """The dense model, initialised on ``device`` (fast on a GPU), returned on the host."""
    cfg = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to("cpu").eval()


def compress_one(dense, method: str, ratio: float, ids: torch.Tensor, device: str) -> dict:
    model = copy.deepcopy(dense)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = factorlm.compress(
        model, method=method, ratio=ratio, calibration=ids, device=device, progress=True
    )
    if cuda:
        torch.cuda.synchronize()
    return {
        "model": model,
        "method": method,
        "ratio": ratio,
        "achieved_ratio": report.achieved_ratio,
        "seconds": time.perf_counter() - t0,
        "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "params": sum(p.numel() for p in model.parameters()),
        "warnings": len(report.warnings),
    }


def main() -> None:
    args = parse()
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dense = build(args.shape, dtype, device, args.seed)
    vocab = SHAPES[args.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.n_samples, args.seqlen), generator=gen)
    runs = [compress_one(dense, args.method, r, ids, device) for r in args.ratios]
    models = {"dense": dense}
    for run in runs:
        m = run.pop("model")
        fuse(m)
        models[f"{args.method} {run['ratio']} fused"] = m
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    for m in models.values():
        m.to(device=device, dtype=dtype)
    rounds = [
        speed_table(
            models,
            batch_sizes=tuple(args.batch_sizes),
            compile_modes=(False, True) if args.compile else (False,),
            prompt_len=args.prompt_len,
            gen_len=args.gen_len,
            device=device,
            repeats=args.repeats,
        )
        for _ in range(args.rounds)
    ]
    rows = median_rows(rounds, params)
    mach = machine()
    meta = {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "dtype": args.dtype,
        "device": device,
        "calibration": f"{args.n_samples} x {args.seqlen} random token ids",
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "machine": mach,
        "versions": versions(),
        "commit": git_commit(),
        "command": " ".join(sys.argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"gpu7b-{args.shape}-{mach['name']}" if args.shape != "7b" else f"gpu7b-{mach['name']}"
    write_json(RESULTS / f"{stem}.json", {"meta": meta, "compression": runs, "speed": rows})
    lines = [
        f"Llama-2-{args.shape}-shaped model, random weights, {args.dtype} on {device} "
        f"({mach['gpu'] or mach['cpu']}); compression on {meta['calibration']}, the model on the "
        f"host and one block at a time on the device; commit {meta['commit']}.",
        "",
        "| method | ratio | achieved | time s | peak device GiB | params |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        peak = "–" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / 2**30:.2f}"
        lines.append(
            f"| {r['method']} | {r['ratio']:.2f} | {r['achieved_ratio']:.3f} | "
            f"{r['seconds']:.1f} | {peak} | {r['params'] / 1e6:.1f} M |"
        )
    lines += [
        "",
        f"Prompt {args.prompt_len} tokens, {args.gen_len} generated; runs interleaved, "
        f"{args.repeats} per round, median of {args.rounds} rounds.",
        "",
        *table_lines(rows),
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
