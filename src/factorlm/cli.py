"""Command line: ``factorlm compress | eval | inspect | densify | report``.

Thin: parses arguments, calls the API, prints. Any :class:`FactorLMError` becomes one
``error: ...`` line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from factorlm.cli_args import build_parser
from factorlm.errors import ConfigError, FactorLMError

log = logging.getLogger("factorlm")


def _parse_opt(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--opt expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def _resolve_ppl_sources(items: list[str]) -> list[str]:
    from factorlm.data import eval_sample_path

    return [str(eval_sample_path()) if s == "bundled" else s for s in items]


def _check_path_source(src: str | None, what: str) -> None:
    if (
        src
        and (os.sep in src or src.endswith((".txt", ".jsonl", ".json")))
        and not os.path.exists(src)
    ):
        raise ConfigError(f"{what}: no such file or directory: {src}")


def _check_model_source(source: str) -> None:
    from factorlm.errors import ModelLoadError

    path = Path(source).expanduser()
    # "org/name" may be a hub id: only absolute/explicitly relative paths and .gguf files here
    looks_like_path = source.startswith((os.sep, ".", "~")) or source.endswith(".gguf")
    if looks_like_path and not path.exists():
        raise ModelLoadError(f"model: no such file or directory: {source}")


def _compute_device(device: str | None) -> str:
    """``--device`` or its default, with torchrun's ``cuda`` made this process's GPU; read before
    anything is put on a device."""
    from factorlm import distributed

    dev = distributed.resolve_device(device) if device else distributed.default_device()
    return str(dev)


#: compress flags that a recipe replaces (refused beside --recipe)
_RECIPE_FLAGS = (
    "dtype", "method", "ratio", "rank", "allocation", "calib", "n_samples", "seqlen", "seed",
    "batch_size", "no_sequential", "calib_dtype", "two_pass", "alpha", "variant", "k1_share", "opt",
    "quantize",
)  # fmt: skip


def _recipe(args, parser_defaults: dict[str, Any]):
    """The run's :class:`~factorlm.recipe.Recipe`: from ``--recipe`` or from the flags (every
    method option and run setting checked here, before the model is loaded)."""
    import dataclasses

    from factorlm.methods import make_config
    from factorlm.recipe import Recipe, read_recipe
    from factorlm.run_options import RunOptions

    if args.recipe is not None:
        given = [f for f in _RECIPE_FLAGS if getattr(args, f) != parser_defaults.get(f)]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ConfigError(f"--recipe replays a run exactly: it cannot be combined with {flags}")
        recipe = read_recipe(args.recipe)
        model = args.model or recipe.model
        if not model:
            raise ConfigError(f"{args.recipe}: the recipe names no model: pass MODEL")
        return dataclasses.replace(recipe, model=model)
    if args.model is None:
        raise ConfigError("compress needs MODEL (or --recipe)")
    options = _parse_opt(args.opt)
    for key in ("alpha", "variant", "k1_share"):
        if getattr(args, key) is not None:
            if key in options:
                raise ConfigError(f"option {key} given twice (--{key.replace('_', '-')} and --opt)")
            options[key] = getattr(args, key)
    config = make_config(
        args.method, ratio=args.ratio, allocation=args.allocation, rank=args.rank, **options
    )
    run = RunOptions(
        n_samples=args.n_samples,
        seqlen=args.seqlen,
        seed=args.seed,
        batch_size=args.batch_size,
        sequential=not args.no_sequential,
        calib_dtype=args.calib_dtype,
        one_pass=not args.two_pass,
    )
    return Recipe(args.model, config, run, args.calib, args.dtype, args.quantize)


def _preflight_compress(args, recipe) -> Path:
    """Every cheap check of the compress arguments, before the model is loaded."""
    from factorlm.calibration.data import precheck_calibration
    from factorlm.io.hub import resolve_dtype
    from factorlm.io.outdir import check_out_apart
    from factorlm.io.save import check_output_dir
    from factorlm.preflight import check_device, check_rank_fits

    _check_model_source(recipe.model)
    check_device(args.device)
    args.device = _compute_device(args.device)
    if recipe.config.rank is not None:
        check_rank_fits(recipe.model, recipe.config.rank)
    check_out_apart(args.out, recipe.model)
    out = check_output_dir(args.out, args.overwrite)
    resolve_dtype(recipe.dtype)
    run = recipe.run
    precheck_calibration(recipe.calibration, run.n_samples, run.seqlen, run.batch_size)
    for s in _resolve_ppl_sources(args.eval_ppl):
        _check_path_source(s, "--eval-ppl")
    if not args.no_memory_check:
        from factorlm.memory import (
            EndToEndPlan,
            check_memory,
            estimate_for_checkpoint,
            keeps_loss_metric,
        )

        est = estimate_for_checkpoint(
            recipe.model,
            recipe.dtype,
            run.n_samples,
            run.seqlen,
            run.batch_size,
            e2e=EndToEndPlan.of(recipe.config),
            loss_metric=keeps_loss_metric(recipe.config),
        )
        check_memory(est, args.device)
    return out


def cmd_compress(args) -> int:
    import dataclasses

    import factorlm

    recipe = _recipe(args, vars(build_parser().parse_args(["compress", "--out", "-"])))
    out = _preflight_compress(args, recipe)
    ppl_sources = _resolve_ppl_sources(args.eval_ppl)
    # the model stays in host memory (memory-mapped from safetensors); compress() moves one block
    # at a time to the compute device
    model, tok = factorlm.load_model(recipe.model, dtype=recipe.dtype)
    progress = not args.quiet
    before = {}
    if ppl_sources:
        before = factorlm.evaluate(
            model,
            tok,
            ppl=ppl_sources,
            seqlen=args.eval_seqlen,
            max_tokens=args.eval_max_tokens,
            progress=progress,
        )
    workdir = out.parent / f".{out.name}.work"
    run = dataclasses.replace(
        recipe.run, progress=progress, workdir=str(workdir), resume=args.resume, device=args.device
    )
    report = factorlm.compress(model, recipe.config, recipe.calibration, tok, run=run)
    if recipe.quantize:
        factorlm.quantize(model, recipe.quantize)
    if ppl_sources:
        after = factorlm.evaluate(
            model,
            tok,
            ppl=ppl_sources,
            seqlen=args.eval_seqlen,
            max_tokens=args.eval_max_tokens,
            progress=progress,
        )
        report.evaluation = {"dense": before, "compressed": after}
    written = recipe.to_dict(
        command="factorlm " + " ".join(sys.argv[1:]), calibration=report.calibration
    )
    from factorlm import distributed

    if distributed.is_main():  # under torchrun every process holds the same model; one writes it
        # atomic: the directory appears complete (report.md included) or not at all
        factorlm.save(model, out, tokenizer=tok, report=report, recipe=written, overwrite=True)
        shutil.rmtree(workdir, ignore_errors=True)
        print(_summary(report))
        print(f"saved to {out}")
    distributed.barrier()
    return 0


def _summary(report) -> str:
    lines = list(report.summary_lines())
    ev = report.evaluation or {}
    if "dense" in ev and "compressed" in ev:
        for src, res in ev["compressed"].get("perplexity", {}).items():
            d = ev["dense"]["perplexity"].get(src, {})
            lines.append(
                f"perplexity {Path(src).name}: dense {d.get('ppl', float('nan')):.2f} -> compressed {res['ppl']:.2f} ({res['n_tokens']:,} tokens, {res['seqlen']}-token windows)"
            )
    return "\n".join(lines)


def cmd_eval(args) -> int:
    import factorlm
    from factorlm.preflight import check_device

    sources = _resolve_ppl_sources(args.ppl)
    for s in sources:
        _check_path_source(s, "--ppl")
    if not (sources or args.tasks or args.speed):
        raise ConfigError("nothing to evaluate: pass --ppl, --tasks and/or --speed")
    check_device(args.device)
    device = _compute_device(args.device)
    if args.baseline and not args.speed:
        raise ConfigError("--baseline is a --speed option")
    model, tok = factorlm.load_model(args.model, dtype=args.dtype, device=device)
    res = factorlm.evaluate(
        model,
        tok,
        ppl=sources or None,
        tasks=args.tasks or None,
        speed=False,
        seqlen=args.seqlen,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        progress=not args.quiet,
    )
    for src, r in (res.get("perplexity") or {}).items():
        print(
            f"perplexity {src}: {r['ppl']:.3f}  ({r['n_tokens']:,} tokens, {r['n_windows']} windows of {r['seqlen']})"
        )
    for task, r in (res.get("zeroshot") or {}).items():
        print(
            f"zero-shot {task}: acc {r.get('acc', float('nan')):.4f}  acc_norm {r.get('acc_norm', float('nan')):.4f}  (n={r.get('n')})"
        )
    if args.speed:
        res["speed"] = _speed(args, model, device)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


def _speed(args, model, device: str) -> list[dict[str, Any]]:
    """``eval --speed``: the model (fused unless --no-fuse) and the --baseline, side by side."""
    import factorlm
    from factorlm.eval.speed import speed_table
    from factorlm.nn.fused import fuse

    models = {}
    if args.baseline:
        models["baseline"] = factorlm.load_model(args.baseline, dtype=args.dtype, device=device)[0]
    if not args.no_fuse and model.config.__dict__.get("factorlm"):
        fuse(model)
    models["model"] = model
    rows = speed_table(
        models,
        batch_sizes=tuple(args.speed_batch_sizes),
        compile_modes=(False, True) if args.compile else (False,),
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        repeats=args.repeats,
        device=device,
        progress=not args.quiet,
    )
    print(f"speed ({args.prompt_len}-token prompt, {args.gen_len} generated):")
    for r in rows:
        vs = ""
        if args.baseline and r["model"] != "baseline":
            vs = (
                f"  vs baseline: prefill {r['prefill_ratio']:.2f}x, decode {r['decode_ratio']:.2f}x"
            )
        print(
            f"  {r['model']:8s} batch {r['batch_size']:2d} {r['mode']:20s} prefill {r['prefill_tok_s']:8.1f} tok/s"
            f"  decode {r['decode_tok_s']:7.1f} tok/s  peak {r['peak_mem_bytes'] / 2**20:.0f} MiB{vs}"
        )
    return rows


def cmd_inspect(args) -> int:
    import factorlm
    from factorlm.arch.modules import count_params, linear_shape, model_targets
    from factorlm.io.format import block_of

    model = factorlm.load(args.path)
    block = block_of(model.config)
    size = sum(f.stat().st_size for f in Path(args.path).glob("*.safetensors"))
    rows = []
    for name, mod in model_targets(model).items():
        m, n = linear_shape(mod)
        kind = "lowrank" if isinstance(mod, factorlm.LowRankLinear) else "dense"
        spec = block.get("modules", {}).get(name)
        if spec and spec["type"] == "linear":
            kind = "pruned"
        elif spec and spec["type"] == "slots":
            kind = "heads"
        rank = getattr(mod, "rank", "")
        params = (
            mod.num_parameters() if kind == "lowrank" else sum(p.numel() for p in mod.parameters())
        )
        rows.append(
            f"{name:55s} {kind:8s} {m:6d} x {n:<6d} rank {str(rank):>5s} params {params:>10,}"
        )
    print("\n".join(rows))
    print(
        f"method {block.get('method', '?')}, requested ratio {block.get('ratio', '?')}, achieved {block.get('achieved_ratio', '?')}"
    )
    print(f"parameters: {count_params(model):,}; size on disk {size / 2**20:.1f} MiB")
    return 0


def cmd_densify(args) -> int:
    import factorlm
    from factorlm.io.outdir import check_out_apart
    from factorlm.io.save import check_output_dir

    check_out_apart(args.out, args.path)
    check_output_dir(args.out, args.overwrite)
    model = factorlm.load(args.path)
    dense = factorlm.densify(model)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.path)
    except Exception:  # noqa: BLE001 - a model without tokenizer files
        tok = None
    tmp = Path(args.out)
    if tmp.exists() and args.overwrite:
        shutil.rmtree(tmp)
    dense.save_pretrained(str(tmp))
    if tok is not None:
        tok.save_pretrained(str(tmp))
    print(
        f"dense model ({sum(p.numel() for p in dense.parameters()):,} parameters) written to {tmp}"
    )
    return 0


def cmd_export(args) -> int:
    from factorlm.io.export import export

    _check_path_source(args.path, "model directory")
    summary = export(
        args.path,
        args.out,
        format=args.format,
        dtype=args.dtype,
        overwrite=args.overwrite,
        tokenizer_gguf=args.tokenizer_gguf,
    )
    print("\n".join(summary.lines()))
    return 0


def cmd_report(args) -> int:
    from factorlm.report.render import compare_reports

    print(compare_reports(args.runs, out_dir=args.out))
    return 0


COMMANDS = {
    "compress": cmd_compress,
    "eval": cmd_eval,
    "inspect": cmd_inspect,
    "densify": cmd_densify,
    "export": cmd_export,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("transformers", "urllib3", "filelock", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except FactorLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
