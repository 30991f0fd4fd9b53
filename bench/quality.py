"""Quality benchmark on the embedded SmolLM2-135M: methods x ratios, one command.

    python bench/quality.py                       # default grid (all methods, ratios 0.2 0.4)
    python bench/quality.py --methods svd-llm nsvd --ratios 0.2 --eval-tokens 4096

Protocol (benchmark issue): calibration 64 windows x 512 tokens of brown_calib.txt (seed 0);
perplexity with 512-token windows on the first 16,384 tokens of wiki_test.txt and brown_test.txt
(the same tokens for every row: a paired comparison); zero-shot accuracy on mc/*.jsonl; wall time
and peak RSS of the compression; achieved ratio. Rows are written as they finish to
bench/results/quality-<machine>.json and .md, so an interrupted grid keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    SHARED_DATA,
    RSSSampler,
    git_commit,
    machine,
    versions,
    write_json,
)

import factorlm  # noqa: E402
from factorlm.eval import perplexity, zeroshot  # noqa: E402

DEFAULT_METHODS = [
    "svd-llm",
    "lorap",
    "modular",
    "modular:allocation=loss",
    "distill",
    "distill:init=modular",
]
TRAINED = {"distill"}  # methods that take gradient steps on the weights


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="a method name, or name:key=value,key=value for options (e.g. distill:init=svd-llm)",
    )
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    p.add_argument("--allocation", default=None, help="default: each method's own")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-tokens", type=int, default=16384, help="tokens per evaluation file (0 = whole file)"
    )
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument(
        "--mc-limit", type=int, default=200, help="examples per multiple-choice task (0 = all)"
    )
    p.add_argument("--data", default=str(SHARED_DATA))
    p.add_argument("--tag", default=None, help="suffix of the result files")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--save-dir",
        default=None,
        help="also save each compressed model to SAVE_DIR/<label>-<ratio> (for bench/speed.py, "
        "bench/quant.py --models-dir)",
    )
    p.add_argument(
        "--skip-dense", action="store_true", help="no dense row (it is in another result file)"
    )
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="METHOD@RATIO",
        help="explicit ordered runs instead of methods x ratios",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in the result file (skip runs already done)",
    )
    p.add_argument(
        "--redo",
        action="store_true",
        help="with --append: run the listed runs again, replacing their earlier rows",
    )
    return p.parse_args()


def parse_method(item: str) -> tuple[str, dict, str]:
    name, _, opts = item.partition(":")
    options = {}
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        if v.lower() in ("true", "false"):
            options[k] = v.lower() == "true"
            continue
        try:
            options[k] = float(v) if "." in v or "e" in v else int(v)
        except ValueError:
            options[k] = v
    return name, options, item


def evaluate(model, tok, args) -> dict:
    data = Path(args.data)
    out = {}
    for name in ("wiki_test", "brown_test"):
        r = perplexity(
            model,
            tok,
            str(data / f"{name}.txt"),
            seqlen=args.eval_seqlen,
            batch_size=8,
            max_tokens=args.eval_tokens or None,
        )
        out[f"ppl_{name}"] = r["ppl"]
        out[f"tokens_{name}"] = r["n_tokens"]
    mc = sorted((data / "mc").glob("*.jsonl"))
    if mc:
        res = zeroshot(model, tok, [str(p) for p in mc], limit=args.mc_limit or None, batch_size=16)
        for task, r in res.items():
            out[f"acc_{Path(task).stem}"] = r["acc"]
            out[f"acc_norm_{Path(task).stem}"] = r["acc_norm"]
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    cols = [
        "method",
        "ratio",
        "achieved",
        "total removed",
        "ppl wiki",
        "ppl brown",
        "acc goal",
        "acc step",
        "time s",
        "passes/block",
        "peak RSS GiB",
    ]
    zero_shot = (
        f"zero-shot: first {meta['mc_limit']} examples of each mc task (acc)"
        if meta.get("mc_tasks")
        else "no zero-shot tasks in this run"
    )
    lines = [
        f"Model {meta['model']}; calibration {meta['n_samples']} x {meta['seqlen']} tokens of "
        f"brown_calib.txt (seed {meta['seed']}); perplexity on the first "
        f"{meta['eval_tokens']:,} tokens of each file, {meta['eval_seqlen']}-token windows; "
        f"{zero_shot}; machine {meta['machine']['name']} ({meta['machine']['cpu']}).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:

        def f(key, fmt, r=r):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "–"

        lines.append(
            f"| {r['label']} | {f('ratio', '.2f')} | {f('achieved_ratio', '.3f')} | {f('total_ratio', '.3f')} | {f('ppl_wiki_test', '.2f')} | "
            f"{f('ppl_brown_test', '.2f')} | {f('acc_wikihow_goal', '.3f')} | {f('acc_wikihow_step', '.3f')} | {f('seconds', '.1f')} | {f('passes_per_block', 'd')} | {f('peak_rss_gib', '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    mach = machine()
    tag = f"-{args.tag}" if args.tag else ""
    json_path = RESULTS / f"quality-{mach['name']}{tag}.json"
    md_path = RESULTS / f"quality-{mach['name']}{tag}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "n_samples": args.n_samples,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "eval_tokens": args.eval_tokens,
        "eval_seqlen": args.eval_seqlen,
        "mc_limit": args.mc_limit,
        "mc_tasks": [p.name for p in sorted((Path(args.data) / "mc").glob("*.jsonl"))],
        "allocation": args.allocation,
        "machine": mach,
        "versions": versions(),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    dense, tok = factorlm.load_model(args.model, device=args.device)
    calib = str(Path(args.data) / "brown_calib.txt")
    rows: list[dict] = []
    if args.append and json_path.exists():
        rows = json.loads(json_path.read_text())["rows"]
        other = sorted({str(r.get("commit")) for r in rows} - {str(meta["commit"])})
        if other:  # a published table is one clean commit's: resume it at that commit
            sys.exit(
                f"{json_path.name} holds rows of commit {', '.join(other)}, this checkout is "
                f"{meta['commit']}: check that commit out to resume the grid, or move the file "
                "to bench/results/history/ and re-run it"
            )
    done = {(r["label"], r["ratio"]) for r in rows if "error" not in r}

    def flush():
        write_json(json_path, {"meta": meta, "rows": rows})
        md_path.write_text(markdown(rows, meta))

    if not args.skip_dense and ("dense", 0.0) not in done:
        t0 = time.perf_counter()
        row = {
            "label": "dense",
            "method": "dense",
            "options": {},
            "trained": False,
            "commit": meta.get("commit"),
            "ratio": 0.0,
            "achieved_ratio": 0.0,
            "total_ratio": 0.0,
            **evaluate(dense, tok, args),
        }
        row["eval_seconds"] = time.perf_counter() - t0
        rows.append(row)
        flush()
        print(f"dense: {row}", flush=True)
    runs = (
        [(item.rpartition("@")[0], float(item.rpartition("@")[2])) for item in args.runs]
        if args.runs
        else [(item, ratio) for ratio in args.ratios for item in args.methods]
    )
    for item, ratio in runs:
        if (item, ratio) in done and not args.redo:
            continue
        if item == "dense":  # the dense row is measured above (unless --skip-dense)
            continue
        name, options, label = parse_method(item)
        model = copy.deepcopy(dense)
        try:
            with RSSSampler() as rss:
                t0 = time.perf_counter()
                opts = dict(options)
                allocation = opts.pop("allocation", args.allocation)
                rep = factorlm.compress(
                    model,
                    method=name,
                    ratio=ratio,
                    calibration=calib,
                    tokenizer=tok,
                    n_samples=args.n_samples,
                    seqlen=args.seqlen,
                    seed=args.seed,
                    allocation=allocation,
                    progress=False,
                    **opts,
                )
                seconds = time.perf_counter() - t0
        except Exception as e:  # keep the grid going; the row says what failed
            rows.append(
                {
                    "label": label,
                    "method": name,
                    "options": options,
                    "ratio": ratio,
                    "commit": meta.get("commit"),
                    "error": f"{type(e).__name__}: {e}",
                }
            )
            flush()
            print(f"{label} {ratio}: FAILED {e}", flush=True)
            continue
        row = {
            "label": label,
            "method": name,
            "options": options,
            "trained": name in TRAINED,
            "ratio": ratio,
            "achieved_ratio": rep.achieved_ratio,
            "total_ratio": rep.total_ratio,
            "params_after": rep.params_total_after,
            "seconds": seconds,
            "peak_rss_gib": rss.peak / 2**30,
            "warnings": len(rep.warnings),
            "warning_texts": list(rep.warnings[:50]),  # what they say (the first 50)
            "passes_per_block": rep.calibration.get("passes_per_block"),
            "block_ratios": rep.calibration.get("loss_aware", {}).get("block_ratios"),
            "commit": meta.get("commit"),
        }
        t1 = time.perf_counter()
        row.update(evaluate(model, tok, args))
        row["eval_seconds"] = time.perf_counter() - t1
        rows[:] = [r for r in rows if (r["label"], r["ratio"]) != (label, ratio)] + [row]
        flush()
        if args.save_dir:
            safe = label.replace(":", "+").replace(",", "+").replace("=", "-")
            factorlm.save(
                model, Path(args.save_dir) / f"{safe}-{ratio}", tokenizer=tok, report=rep,
                overwrite=True,
            )  # fmt: skip
        print(f"{label} {ratio}: {row}", flush=True)
        del model
        gc.collect()
    print(md_path.read_text())


if __name__ == "__main__":
    main()
