"""The command line's arguments: ``factorlm compress | eval | inspect | densify | export | report``
(:mod:`factorlm.cli` runs them)."""

from __future__ import annotations

import argparse

from factorlm.defaults import DEFAULT_METHOD


def _model_arg(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument(
        "model",
        nargs="?" if optional else None,
        help='local HF directory, hub id, .gguf file, or "smollm2-135m" (the embedded default)'
        + (" (default with --recipe: the recipe's)" if optional else ""),
    )
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    p.add_argument(
        "--device",
        default=None,
        help="compute device: cpu, cuda, cuda:1 ... (default: cuda if available, else cpu; under "
        "torchrun cuda means cuda:LOCAL_RANK). compress keeps the model in host memory and moves "
        "one block at a time to this device",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="factorlm", description="Low-rank compression of causal language models."
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "compress",
        help="compress a model and save it",
        description="Compress MODEL and write it to --out.",
    )
    _model_arg(c, optional=True)
    c.add_argument(
        "--recipe",
        default=None,
        metavar="RECIPE",
        help="re-run a saved model's recipe exactly (its recipe.json or the model's directory): "
        "method, ratio, options, calibration and run settings",
    )
    c.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"modular, svd, fwsvd, asvd, svd-llm, nsvd, lorap, distill or a method added with "
        f"factorlm.register (default {DEFAULT_METHOD}, the recommended training-free recipe)",
    )
    c.add_argument(
        "--ratio",
        type=float,
        default=0.2,
        help="fraction of the targeted linear parameters to remove, in (0, 1)",
    )
    c.add_argument(
        "--rank",
        type=int,
        default=None,
        help="one fixed rank for every matrix (instead of --ratio)",
    )
    c.add_argument(
        "--allocation",
        default=None,
        help="uniform, global, bottom-first, loss (modular: block ratios from the loss's gradients); "
        "default: the method's own (loss for modular, uniform for the others)",
    )
    c.add_argument(
        "--calib",
        default=None,
        help="calibration text file / folder / JSONL / HF dataset name (default: bundled sample)",
    )
    c.add_argument("--n-samples", type=int, default=64)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument(
        "--no-sequential", action="store_true", help="feed each block the dense model's activations"
    )
    c.add_argument(
        "--calib-dtype",
        default=None,
        help="dtype of the calibration forward passes' matmuls (bfloat16: ~2x faster on CPUs with bf16 units)",
    )
    c.add_argument(
        "--two-pass",
        action="store_true",
        help="two calibration passes per block (dense statistics, then recompute) instead of "
        "compressing each linear during one pass",
    )
    c.add_argument(
        "--alpha", type=float, default=None, help="asvd: exponent of the activation scaling"
    )
    c.add_argument("--variant", default=None, help="nsvd: I (Cholesky) or II (eigen)")
    c.add_argument(
        "--k1-share", type=float, default=None, help="nsvd: share of the rank in the whitened stage"
    )
    c.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other method option (JSON value)",
    )
    c.add_argument(
        "--quantize",
        default=None,
        choices=["int8", "int4"],
        help="then quantize the blocks' linears and factors (weight-only, stored as int + scales)",
    )
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its per-block checkpoints",
    )
    c.add_argument(
        "--no-memory-check",
        action="store_true",
        help="skip the estimate of the run's peak memory against the memory available",
    )
    c.add_argument(
        "--eval-ppl",
        action="append",
        default=[],
        metavar="SOURCE",
        help="perplexity before/after on SOURCE ('bundled' = packaged sample)",
    )
    c.add_argument("--eval-max-tokens", type=int, default=None)
    c.add_argument("--eval-seqlen", type=int, default=None)

    e = sub.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy, speed",
        description="Evaluate MODEL (dense or compressed).",
    )
    _model_arg(e)
    e.add_argument(
        "--ppl",
        action="append",
        default=[],
        metavar="SOURCE",
        help="text file/folder/JSONL, 'bundled', or wikitext2/c4/ptb (online)",
    )
    e.add_argument(
        "--tasks",
        action="append",
        default=[],
        help="local multiple-choice JSONL files or lm-eval task names",
    )
    e.add_argument("--speed", action="store_true", help="prefill/decode tokens/s and peak memory")
    e.add_argument(
        "--baseline",
        default=None,
        metavar="MODEL",
        help="--speed: also measure MODEL (e.g. the dense original), interleaved, with ratios",
    )
    e.add_argument(
        "--speed-batch-sizes", type=int, nargs="+", default=[1, 8], metavar="N", help="(1 8)"
    )
    e.add_argument("--prompt-len", type=int, default=256, help="--speed: prompt tokens (256)")
    e.add_argument("--gen-len", type=int, default=64, help="--speed: generated tokens (64)")
    e.add_argument("--repeats", type=int, default=3, help="--speed: timed runs per model (3)")
    e.add_argument(
        "--compile",
        action="store_true",
        help="--speed: also torch.compile with a static KV cache (minutes of compilation)",
    )
    e.add_argument(
        "--no-fuse",
        action="store_true",
        help="--speed: keep q/k/v and gate/up first factors as separate matmuls",
    )
    e.add_argument("--seqlen", type=int, default=None)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--limit", type=int, default=None, help="zero-shot: first N examples per task")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")

    i = sub.add_parser("inspect", help="per-layer ranks, parameter counts, size on disk")
    i.add_argument("path", help="a directory written by factorlm")

    d = sub.add_parser("densify", help="write back a plain dense model")
    d.add_argument("path", help="a directory written by factorlm")
    d.add_argument("--out", required=True)
    d.add_argument("--overwrite", action="store_true")

    _export_parser(sub)

    r = sub.add_parser("report", help="compare runs side by side")
    r.add_argument("runs", nargs="+", help="report.json files or directories containing one")
    r.add_argument("--out", default=None, help="write compare.md and ppl_vs_ratio.png here")
    return p


def _export_parser(sub) -> None:
    x = sub.add_parser(
        "export",
        help="write the plain architecture (--format hf) or a GGUF for llama.cpp (--format gguf)",
    )
    x.add_argument("path", help="a directory written by factorlm (or any model directory)")
    x.add_argument("--format", choices=("hf", "gguf"), default="hf")
    x.add_argument("--out", required=True, help="hf: a directory; gguf: a .gguf file or directory")
    x.add_argument(
        "--dtype",
        choices=("f32", "f16", "bf16", "q8_0"),
        default=None,
        help="hf: f32/f16/bf16 (default: the model's); gguf: f16 (default), q8_0, f32",
    )
    x.add_argument(
        "--tokenizer-gguf",
        default=None,
        help="gguf: copy the tokenizer of this GGUF file (default: the source GGUF when known)",
    )
    x.add_argument("--overwrite", action="store_true")
