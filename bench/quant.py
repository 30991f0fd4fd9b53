"""Low-rank vs quantization vs both: perplexity against bytes of weights on SmolLM2-135M.

    python bench/quant.py                                  # CPU, lorap, reusing saved models if any
    python bench/quant.py --method modular --models-dir /path/with/modular-0.2

Rows: dense fp32 / bf16 / int8 / int4, the compressed model at each ratio (``--method``), and the
compressed model + int8 / int4 (``factorlm.quantize``: weight-only round to nearest of the blocks'
linears and factors; embeddings, norms and the LM head stay in float). Perplexity with the quality
protocol (bench/quality.py): 512-token windows over the first 16,384 tokens of wiki_test.txt; a
compressed model comes from ``<models-dir>/<method>-<ratio>`` when it exists there (a directory
written by ``factorlm compress`` with the quality protocol's calibration), else it is compressed
here with that protocol (64 x 512 tokens of brown_calib.txt, seed 0). Bytes of weights = bytes of
every parameter and buffer (tied embedding counted once). Writes
bench/results/quant-<machine>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED_DATA, git_commit, machine, versions, write_json  # noqa: E402

import factorlm  # noqa: E402
from factorlm.eval import perplexity  # noqa: E402
from factorlm.eval.speed import model_bytes  # noqa: E402

log = logging.getLogger("bench.quant")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="lorap")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    p.add_argument("--schemes", nargs="+", default=["int8", "int4"])
    p.add_argument("--models-dir", default=None, help="saved <method>-<ratio> directories to reuse")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--data", default=str(SHARED_DATA))
    p.add_argument(
        "--append", action="store_true", help="keep the rows already in the result file, skip them"
    )
    return p.parse_args()


def compressed(dense, tok, args, ratio: float):
    saved = Path(args.models_dir or "/nonexistent") / f"{args.method}-{ratio}"
    if (saved / "config.json").is_file():
        log.warning("reusing %s", saved)
        model = factorlm.load(saved)
        cal = model.config.__dict__.get("factorlm", {}).get("calibration", {})
        return model, f"{saved} (calibration {cal.get('n_samples')} x {cal.get('seqlen')} tokens)"
    model = copy.deepcopy(dense)
    factorlm.compress(
        model,
        method=args.method,
        ratio=ratio,
        calibration=str(Path(args.data) / "brown_calib.txt"),
        tokenizer=tok,
        n_samples=64,
        seqlen=512,
        seed=0,
        progress=False,
    )
    return model, "compressed in this run (calibration 64 x 512 tokens)"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Model {meta['model']}; perplexity on the first {meta['eval_tokens']:,} tokens of wiki_test.txt, "
        f"{meta['eval_seqlen']}-token windows; low-rank method {meta['method']}; quantization weight-only "
        "round-to-nearest of the decoder blocks' linears and factors (int8: per row; int4: groups of 32, "
        "scale and zero in float16), embeddings / norms / LM head kept in the model dtype; "
        f"machine {meta['machine']['name']}; commit {meta['commit']}.",
        "",
        "| model | weights MiB | vs dense fp32 | ppl wiki | source | commit |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0]["bytes"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['bytes'] / 2**20:.1f} | {r['bytes'] / base:.3f} | {r['ppl']:.2f} | {r['source']} | {r.get('commit')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    families = {
        "dense": [r for r in rows if r["family"] == "dense"],
        "low-rank": [r for r in rows if r["family"] == "lowrank"],
        "low-rank + int8": [r for r in rows if r["family"] == "lowrank+int8"],
        "low-rank + int4": [r for r in rows if r["family"] == "lowrank+int4"],
    }
    for (name, rs), marker in zip(families.items(), "osD^", strict=True):
        if not rs:
            continue
        ax.scatter(
            [r["bytes"] / 2**20 for r in rs], [r["ppl"] for r in rs], marker=marker, label=name
        )
        for r in rs:
            ax.annotate(
                r["label"],
                (r["bytes"] / 2**20, r["ppl"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("bytes of weights (MiB)")
    ax.set_ylabel("perplexity wiki_test (log)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    mach = machine()
    meta = {
        "model": args.model,
        "method": args.method,
        "eval_tokens": args.eval_tokens,
        "eval_seqlen": args.eval_seqlen,
        "machine": mach,
        "versions": versions(),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    dense, tok = factorlm.load_model(args.model)
    wiki = str(Path(args.data) / "wiki_test.txt")
    rows: list[dict] = []
    stem = RESULTS / f"quant-{mach['name']}"
    if args.append and stem.with_suffix(".json").exists():
        rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    done = {r["label"] for r in rows}

    def add(label: str, family: str, model, source: str = "") -> None:
        if label in done:
            return
        t0 = time.perf_counter()
        r = perplexity(
            model,
            tok,
            wiki,
            seqlen=args.eval_seqlen,
            batch_size=8,
            max_tokens=args.eval_tokens,
            progress=False,
        )
        rows.append(
            {
                "label": label,
                "family": family,
                "bytes": model_bytes(model),
                "ppl": r["ppl"],
                "n_tokens": r["n_tokens"],
                "source": source,
                "eval_seconds": time.perf_counter() - t0,
            }
        )
        print(f"{label}: {rows[-1]}", flush=True)
        write_json(stem.with_suffix(".json"), {"meta": meta, "rows": rows})
        stem.with_suffix(".md").write_text(markdown(rows, meta))

    add("dense fp32", "dense", dense)
    add("dense bf16", "dense", copy.deepcopy(dense).to(torch.bfloat16))
    for scheme in args.schemes:
        q = copy.deepcopy(dense)
        factorlm.quantize(q, scheme)
        add(f"dense {scheme}", "dense", q)
    for ratio in args.ratios:
        labels = [f"{args.method} {ratio:.0%}"] + [
            f"{args.method} {ratio:.0%} + {s}" for s in args.schemes
        ]
        if all(lb in done for lb in labels):
            continue
        model, source = compressed(dense, tok, args, ratio)
        add(f"{args.method} {ratio:.0%}", "lowrank", model, source)
        for scheme in args.schemes:
            q = copy.deepcopy(model)
            factorlm.quantize(q, scheme)
            add(f"{args.method} {ratio:.0%} + {scheme}", f"lowrank+{scheme}", q, source)
    plot(rows, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
