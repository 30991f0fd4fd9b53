"""Render compression reports: ``report.json``, ``report.md``, PNG plots, side-by-side comparison."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from factorlm.errors import ConfigError, FormatError
from factorlm.report.plots import perplexity_results, plot_errors, plot_ppl_vs_ratio, plot_ranks
from factorlm.report.schema import Report

logger = logging.getLogger(__name__)

__all__ = ["compare_reports", "format_markdown", "load_report", "summary_table", "write_report"]

_DASH = "–"
_EVAL_KEYS = ("perplexity", "zeroshot", "speed")


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return _DASH
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _gib(n: int | None) -> str:
    return _DASH if not n else f"{n / 2**30:.2f} GiB"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return lines


def _summary_rows(report: Report) -> list[tuple[str, str]]:
    model = report.model_name or report.model_type or _DASH
    if report.model_name and report.model_type:
        model += f" ({report.model_type})"
    return [
        ("method", report.method),
        ("allocation", report.allocation),
        ("model", model),
        ("requested ratio", f"{report.ratio:.4f}"),
        ("achieved ratio (targeted linear parameters removed)", f"{report.achieved_ratio:.4f}"),
        (
            "targeted parameters",
            f"{report.params_targeted_before:,} → {report.params_targeted_after:,}",
        ),
        (
            "whole-model parameters",
            f"{report.params_total_before:,} → {report.params_total_after:,}",
        ),
        ("whole model removed", f"{report.total_ratio:.2%}"),
        ("wall time", f"{report.wall_seconds:.1f} s"),
        ("peak RSS", _gib(report.peak_rss_bytes)),
        ("peak device memory", _gib(report.peak_device_bytes)),
    ]


def _variants(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{variant: evaluate() result}``: a single evaluation is the "compressed" variant."""
    if any(k in evaluation for k in _EVAL_KEYS):
        return {"compressed": evaluation}
    return {
        k: v
        for k, v in evaluation.items()
        if isinstance(v, dict) and any(x in v for x in _EVAL_KEYS)
    }


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    variants = _variants(evaluation)
    lines: list[str] = []
    names = list(variants)
    ppl_names = [v for v in names if variants[v].get("perplexity")]
    ppl_sources: dict[str, dict[str, Any]] = {}
    for v in ppl_names:
        for src, res in (variants[v].get("perplexity") or {}).items():
            ppl_sources.setdefault(src, res)
    if ppl_sources:
        header = ["source", "window", "tokens"] + [f"{v} ppl" for v in ppl_names]
        if {"dense", "compressed"} <= set(ppl_names):
            header.append("compressed / dense")
        rows = []
        for src, first in ppl_sources.items():
            vals = [
                (variants[v].get("perplexity") or {}).get(src, {}).get("ppl") for v in ppl_names
            ]
            row = [src, _fmt(first.get("seqlen")), _fmt(first.get("n_tokens"), ",")]
            row += [_fmt(x, ".3f") for x in vals]
            if len(header) > len(row):
                d = vals[ppl_names.index("dense")]
                c = vals[ppl_names.index("compressed")]
                row.append(_fmt(c / d, ".3f") if c is not None and d else _DASH)
            rows.append(row)
        lines += ["### Perplexity", "", *_table(header, rows), ""]
    zs_names = [v for v in names if variants[v].get("zeroshot")]
    tasks: list[str] = []
    for v in zs_names:
        tasks += [t for t in (variants[v].get("zeroshot") or {}) if t not in tasks]
    if tasks:
        header = ["task", "n"] + [f"{v} {m}" for v in zs_names for m in ("acc", "acc_norm")]
        rows = []
        for t in tasks:
            res = {v: (variants[v].get("zeroshot") or {}).get(t, {}) for v in zs_names}
            n = next((r.get("n") for r in res.values() if r.get("n") is not None), None)
            row = [t, _fmt(n)]
            row += [_fmt(res[v].get(m), ".4f") for v in zs_names for m in ("acc", "acc_norm")]
            rows.append(row)
        lines += ["### Zero-shot", "", *_table(header, rows), ""]
    speed = {v: variants[v]["speed"] for v in names if variants[v].get("speed")}
    if speed:
        header = [
            "model",
            "device",
            "dtype",
            "batch",
            "prefill tok/s",
            "decode tok/s",
            "peak memory MiB",
            "weights MiB",
        ]
        rows = [
            [
                v,
                s.get("device"),
                s.get("dtype"),
                s.get("batch_size"),
                _fmt(s.get("prefill_tok_s"), ".1f"),
                _fmt(s.get("decode_tok_s"), ".1f"),
                _fmt((s.get("peak_mem_bytes") or 0) / 2**20, ".1f"),
                _fmt((s.get("model_bytes") or 0) / 2**20, ".1f"),
            ]
            for v, s in speed.items()
        ]
        lines += ["### Speed", "", *_table(header, rows), ""]
    if not lines:
        lines = ["```json", json.dumps(evaluation, indent=2, default=str), "```", ""]
    return lines


def _module_lines(report: Report) -> list[str]:
    rows = []
    for m in report.modules:
        size = m.rank if m.kind == "lowrank" else m.width
        kept = m.params_after / m.params_before if m.params_before else None
        rows.append(
            [
                m.name,
                m.group,
                f"{m.shape[0]}×{m.shape[1]}",
                m.kind,
                _fmt(size),
                f"{m.params_before:,}",
                f"{m.params_after:,}",
                _fmt(kept, ".1%"),
                _fmt(m.rel_error, ".3e"),
                "; ".join(m.notes),
            ]
        )
    header = [
        "module",
        "group",
        "shape",
        "kind",
        "rank/width",
        "params before",
        "params after",
        "kept",
        "rel error",
        "notes",
    ]
    return _table(header, rows)


def _block_lines(report: Report) -> list[str]:
    cols = [
        ("seconds", "seconds", ".1f", 1),
        ("rel output error", "rel_output_error", ".3e", 1),
        ("loss before", "loss_before", ".4f", 1),
        ("loss after", "loss_after", ".4f", 1),
        ("peak device MiB", "peak_device_bytes", ".0f", 2**20),
        ("peak RSS MiB", "peak_rss_bytes", ".0f", 2**20),
    ]
    used = [c for c in cols if any(getattr(b, c[1]) is not None for b in report.blocks)]
    rows = []
    for b in report.blocks:
        row = [str(b.index)]
        for _, attr, spec, scale in used:
            v = getattr(b, attr)
            row.append(_fmt(None if v is None else v / scale, spec))
        rows.append(row)
    return _table(["block"] + [c[0] for c in used], rows)


def format_markdown(report: Report, images: Sequence[str] = ()) -> str:
    """The markdown report: summary, calibration, evaluation, per-module and per-block tables,
    warnings; ``images`` (file names next to the markdown) are linked at the end."""
    title = f"# factorlm report: {report.method}, ratio {report.ratio:g}"
    lines = [title, "", *_table(["quantity", "value"], _summary_rows(report)), ""]
    if report.calibration:
        cal = ", ".join(f"{k} {v}" for k, v in report.calibration.items())
        lines += [f"Calibration: {cal}.", ""]
    if report.options:
        lines += [f"Options: `{json.dumps(report.options, default=str, sort_keys=True)}`", ""]
    if report.evaluation:
        lines += ["## Evaluation", "", *_evaluation_lines(report.evaluation)]
    if report.modules:
        lines += ["## Modules", "", *_module_lines(report), ""]
    if report.blocks:
        lines += ["## Blocks", "", *_block_lines(report), ""]
    lines += ["## Warnings", ""]
    lines += [f"- {w}" for w in report.warnings] if report.warnings else ["none"]
    lines.append("")
    if images:
        lines += ["## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
    if report.environment:
        env = ", ".join(f"{k}: {v}" for k, v in report.environment.items())
        lines += [f"Environment: {env}", ""]
    return "\n".join(lines)


def summary_table(report: Report) -> str:
    """A short plain-text summary for terminals (aligned key / value lines, perplexities)."""
    rows = _summary_rows(report)
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows if v != _DASH]
    ranks = [m.rank for m in report.modules if m.rank is not None]
    if ranks:
        lines.append(
            f"{'ranks':<{width}}  min {min(ranks)}, max {max(ranks)}, over {len(ranks)} modules"
        )
    results = perplexity_results(report)
    for src, res in results.get("compressed", {}).items():
        dense = results.get("dense", {}).get(src, {}).get("ppl")
        before = f"dense {dense:.3f} -> " if isinstance(dense, int | float) else ""
        key = f"ppl {Path(src).name}"
        lines.append(
            f"{key:<{width}}  {before}{_fmt(res.get('ppl'), '.3f')} ({res.get('seqlen')}-token windows)"
        )
    if report.warnings:
        lines.append(f"{'warnings':<{width}}  {len(report.warnings)} (see report.md)")
    return "\n".join(lines)


def write_report(report: Report, out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (``plots=True``) ``ranks.png`` / ``errors.png``.

    A plot that cannot be drawn is skipped with a logged warning (it never fails a save); a
    plot with nothing to show (e.g. no calibration error recorded) is not written.

    Returns:
        ``{"json": path, "markdown": path, "ranks": path, "errors": path}`` for the files
        actually written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if plots:
        for key, fn in (("ranks", plot_ranks), ("errors", plot_errors)):
            try:
                path = fn(report, out / f"{key}.png")
            except Exception as e:  # noqa: BLE001 - plots are optional
                logger.warning("could not draw %s.png: %s: %s", key, type(e).__name__, e)
                continue
            if path is not None:
                written[key] = path
    json_path = out / "report.json"
    json_path.write_text(report.to_json() + "\n", encoding="utf-8")
    written["json"] = json_path
    md_path = out / "report.md"
    images = [p.name for k, p in written.items() if k in ("ranks", "errors")]
    md_path.write_text(format_markdown(report, images), encoding="utf-8")
    written["markdown"] = md_path
    return written


def load_report(source: str | os.PathLike | Report | dict[str, Any]) -> Report:
    """A :class:`Report` from a ``report.json`` path, a directory containing one, or a dict."""
    if isinstance(source, Report):
        return source
    if isinstance(source, dict):
        try:
            return Report.from_dict(source)
        except (TypeError, KeyError, ValueError) as e:
            raise FormatError(f"not a factorlm report: {e}") from e
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "report.json"
        if not path.is_file():
            raise ConfigError(f"{source}: no report.json in this directory")
    elif not path.exists():
        raise ConfigError(f"no such report: {source}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Report.from_dict(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: unreadable report ({e})") from e
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise FormatError(f"{path}: not a factorlm report ({e})") from e


def _label(source: Any, report: Report) -> str:
    if isinstance(source, str | os.PathLike):
        p = Path(source)
        return (p.parent.name if p.is_file() else p.name) or str(p)
    return f"{report.method}@{report.ratio:g}"


def compare_reports(
    paths_or_reports: Sequence[str | os.PathLike | Report | dict[str, Any]],
    out_dir: str | os.PathLike | None = None,
) -> str:
    """Markdown table of several runs side by side (one row per run, plus one "dense" row per
    model when the runs recorded dense evaluations).

    With ``out_dir``, also writes ``compare.md`` and ``ppl_vs_ratio.png`` there (the plot only
    when some run has a perplexity).

    Raises:
        ConfigError: no run, or a path that is neither a report.json nor a directory with one.
        FormatError: an unreadable / foreign report.json.
    """
    if isinstance(paths_or_reports, str | os.PathLike | Report):
        paths_or_reports = [paths_or_reports]
    if not paths_or_reports:
        raise ConfigError("compare_reports needs at least one report")
    runs = [(_label(s, r), r) for s in paths_or_reports for r in [load_report(s)]]
    sources: list[str] = []
    tasks: list[str] = []
    for _, r in runs:
        for res in perplexity_results(r).values():
            sources += [s for s in res if s not in sources]
        zs = _variants(r.evaluation or {}).get("compressed", {}).get("zeroshot") or {}
        tasks += [t for t in zs if t not in tasks]
    header = [
        "run",
        "method",
        "allocation",
        "requested",
        "achieved",
        "whole model removed",
        "params after",
        "wall s",
        "peak RSS",
    ]
    header += [f"ppl {Path(s).name}" for s in sources] + [f"acc {Path(t).stem}" for t in tasks]
    rows: list[list[str]] = []
    dense_done: set[str | None] = set()
    for _, r in runs:
        dense = perplexity_results(r).get("dense")
        if dense and r.model_name not in dense_done:
            dense_done.add(r.model_name)
            row = [f"dense ({r.model_name})" if r.model_name else "dense", "dense", _DASH]
            row += ["0", "0", "0.00%", f"{r.params_total_before:,}", _DASH, _DASH]
            row += [_fmt(dense.get(s, {}).get("ppl"), ".3f") for s in sources] + [_DASH] * len(
                tasks
            )
            rows.append(row)
    for label, r in runs:
        ppl = perplexity_results(r).get("compressed", {})
        zs = _variants(r.evaluation or {}).get("compressed", {}).get("zeroshot") or {}
        row = [label, r.method, r.allocation, f"{r.ratio:g}", f"{r.achieved_ratio:.4f}"]
        row += [
            f"{r.total_ratio:.2%}",
            f"{r.params_total_after:,}",
            f"{r.wall_seconds:.1f}",
            _gib(r.peak_rss_bytes),
        ]
        row += [_fmt(ppl.get(s, {}).get("ppl"), ".3f") for s in sources]
        row += [_fmt(zs.get(t, {}).get("acc"), ".4f") for t in tasks]
        rows.append(row)
    windows: set[str] = set()
    for _, r in runs:
        for results in perplexity_results(r).values():
            windows |= {str(x.get("seqlen")) for x in results.values() if isinstance(x, dict)}
    lines = ["# factorlm runs compared", ""]
    if windows:
        lines += [f"Perplexity windows: {', '.join(sorted(windows))} tokens.", ""]
    lines += _table(header, rows)
    text = "\n".join(lines) + "\n"
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = text
        try:
            png = plot_ppl_vs_ratio([r for _, r in runs], out / "ppl_vs_ratio.png")
        except Exception as e:  # noqa: BLE001 - the table matters more than the plot
            logger.warning("could not draw ppl_vs_ratio.png: %s: %s", type(e).__name__, e)
            png = None
        if png is not None:
            md += f"\n![perplexity vs ratio]({png.name})\n"
        (out / "compare.md").write_text(md, encoding="utf-8")
    return text
