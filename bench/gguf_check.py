"""GGUF export checked in llama.cpp: SmolLM2-135M dense and compressed, perplexity and file size.

    python bench/gguf_check.py [--llamacpp-python /work/venv-llamacpp/bin/python]

Compresses the embedded SmolLM2-135M with lorap at 0.2 (structural MLP pruning + low-rank
attention; calibration as in bench/quality.py: 64 x 512 tokens of brown_calib.txt, seed 0),
exports the dense and the compressed model with ``factorlm.export(..., format="gguf")`` (tokenizer
carried over from the source GGUF), and evaluates each GGUF in llama.cpp (llama-cpp-python, run
from its own venv by bench/llamacpp_ppl.py) on exactly the token ids factorlm's own perplexity
uses: the first 16,384 tokens of wiki_test.txt, 512-token windows. Also checks that llama.cpp
tokenizes a text sample as the HF tokenizer does. Writes bench/results/gguf-llamacpp-<machine>.json
and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED_DATA, git_commit, machine, versions, write_json  # noqa: E402

import factorlm  # noqa: E402
from factorlm.eval.perplexity import perplexity, tokenize_joined  # noqa: E402
from factorlm.eval.sources import load_texts  # noqa: E402
from factorlm.io.export import block_mlp_widths, densified_layers, export  # noqa: E402

HERE = Path(__file__).resolve().parent


def mlp_params(model) -> int:
    spec = factorlm.arch.get_spec(model)
    blocks = factorlm.arch.get_blocks(model, spec)
    return sum(p.numel() for b in blocks for n, p in b.named_parameters() if n.startswith("mlp."))


def unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def llamacpp(python: str, gguf: Path, ids_file: Path, seqlen: int, threads: int) -> dict:
    cmd = [python, str(HERE / "llamacpp_ppl.py"), str(gguf), str(ids_file), "--seqlen", str(seqlen)]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"llama.cpp run failed on {gguf}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"GGUF export in llama.cpp ({meta['llama_cpp']}), machine {meta['machine']['name']}; commit "
        f"{meta['commit']}. Model {meta['model']}, perplexity on the first {meta['eval_tokens']:,} "
        f"tokens of wiki_test.txt in {meta['seqlen']}-token windows, the same token ids in "
        "factorlm (fp32 model) and llama.cpp (the exported GGUF); calibration "
        f"{meta['n_samples']} x 512 tokens of brown_calib.txt. llama.cpp tokenizes the check "
        f"text as the HF tokenizer does: {meta['tokenizer_match']}.",
        "",
        "| model | GGUF | file MiB | vs dense file | factorlm ppl | llama.cpp ppl | difference |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    dense_size = {r["dtype"]: r["file_bytes"] for r in rows if r["model"] == "dense"}
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['file_bytes'] / 2**20:.1f} | "
            f"{r['file_bytes'] / dense_size[r['dtype']]:.3f} | {r['ppl_factorlm']:.2f} | "
            f"{r['ppl_llamacpp']:.2f} | {100 * r['ppl_rel_diff']:+.2f} % |"
        )
    c = meta["compressed"]
    lines += [
        "",
        f"{c['label']}: {100 * c['achieved_ratio']:.1f} % of the targeted parameters removed, "
        f"{100 * c['structural_share']:.1f} % of all parameters removed structurally (MLP "
        f"channels: width {c['mlp_width_before']} -> {c['mlp_width']}); {c['densified']} low-rank "
        "attention layers are written dense in the GGUF (llama.cpp has no factorized linear), so "
        f"the file shrinks by the structural share only: expected {1 - c['structural_share']:.3f} "
        "of the dense file.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="lorap")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--dtypes", nargs="+", default=["f16"])
    p.add_argument("--llamacpp-python", default="/work/venv-llamacpp/bin/python")
    p.add_argument("--data", default=str(SHARED_DATA))
    p.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch and llama.cpp"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    lc_version = subprocess.run(
        [args.llamacpp_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dense, tok = factorlm.load_model(args.model)
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    report = factorlm.compress(
        model,
        method=args.method,
        ratio=args.ratio,
        calibration=str(data / "brown_calib.txt"),
        tokenizer=tok,
        n_samples=args.n_samples,
        seqlen=args.calib_seqlen,
        seed=0,
        progress=False,
    )
    compress_s = time.perf_counter() - t0
    wiki = str(data / "wiki_test.txt")
    texts = load_texts(wiki)
    ids = tokenize_joined(tok, texts, args.eval_tokens)
    check_text = "\n\n".join(texts)[:4000]
    check_ids = tok(check_text, add_special_tokens=False)["input_ids"]
    models = {"dense": dense, f"{args.method} {args.ratio}": model}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-check-") as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        check_file = Path(tmp) / "check.json"
        check_file.write_text(json.dumps({"text": check_text, "ids": check_ids}))
        match = None
        for name, m in models.items():
            ppl = perplexity(
                m, tok, wiki, seqlen=args.seqlen, max_tokens=args.eval_tokens, progress=False
            )
            for dtype in args.dtypes:
                summary = export(
                    m,
                    Path(tmp) / f"{name.replace(' ', '-')}-{dtype}.gguf",
                    format="gguf",
                    dtype=dtype,
                )
                lc = llamacpp(
                    args.llamacpp_python, summary.path, ids_file, args.seqlen, args.threads
                )
                if match is None:
                    match = subprocess.run(
                        [
                            args.llamacpp_python,
                            str(HERE / "llamacpp_ppl.py"),
                            str(summary.path),
                            str(check_file),
                            "--tokenize",
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout.strip()
                rows.append(
                    {
                        "model": name,
                        "dtype": dtype,
                        "file_bytes": summary.file_bytes,
                        "ppl_factorlm": ppl["ppl"],
                        "ppl_llamacpp": lc["ppl"],
                        "ppl_rel_diff": lc["ppl"] / ppl["ppl"] - 1,
                        "n_tokens": ppl["n_tokens"],
                        "n_tokens_llamacpp": lc["n_tokens"],
                        "llamacpp_seconds": lc["seconds"],
                    }
                )
                print(rows[-1], flush=True)
    widths = block_mlp_widths(model)
    mach = machine()
    meta = {
        "model": args.model,
        "seqlen": args.seqlen,
        "n_samples": args.n_samples,
        "threads": args.threads,
        "eval_tokens": args.eval_tokens,
        "llama_cpp": f"llama-cpp-python {lc_version}",
        "tokenizer_match": match,
        "compressed": {
            "label": f"{args.method} {args.ratio}",
            "achieved_ratio": report.achieved_ratio,
            "mlp_width_before": block_mlp_widths(dense)[0],
            "mlp_width": widths[0] if len(set(widths)) == 1 else widths,
            "structural_share": (mlp_params(dense) - mlp_params(model)) / unique_params(dense),
            "densified": len(densified_layers(model)),
            "compress_seconds": compress_s,
        },
        "machine": mach,
        "versions": versions(),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"gguf-llamacpp-{mach['name']}.json", {"meta": meta, "rows": rows})
    (RESULTS / f"gguf-llamacpp-{mach['name']}.md").write_text(markdown(rows, meta))


if __name__ == "__main__":
    main()
