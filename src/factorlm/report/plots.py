"""PNG plots of compression reports (matplotlib, Agg; no pyplot global state is touched)."""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from factorlm.report.schema import ModuleRecord, Report

logger = logging.getLogger(__name__)

__all__ = [
    "block_index",
    "module_role",
    "perplexity_results",
    "plot_errors",
    "plot_ppl_vs_ratio",
    "plot_ranks",
]

_INDEX = re.compile(r"^\d+$")


def block_index(name: str) -> int | None:
    """Index of the decoder block holding module ``name`` (its first numeric path component):
    ``model.layers.3.self_attn.q_proj`` -> 3; None when the name has no number."""
    for part in name.split("."):
        if _INDEX.match(part):
            return int(part)
    return None


def module_role(name: str) -> str:
    """The module's role: the last component of its name (``q_proj``, ``down_proj``, ``w1``)."""
    return name.rsplit(".", 1)[-1]


def _figure(nrows: int = 1, width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure  # rendered by Agg on savefig; pyplot is never used

    fig = Figure(figsize=(width, height * nrows), dpi=100, layout="constrained")
    axes = [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]
    return fig, axes


def _series(
    modules: Iterable[ModuleRecord], value: str
) -> dict[str, tuple[list[int], list[float]]]:
    """{role: (block indices, mean value per block)} for modules where ``value`` is set."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in modules:
        v = getattr(m, value)
        idx = block_index(m.name)
        if v is None or idx is None:
            continue
        v = float(v)
        if math.isfinite(v):
            acc[module_role(m.name)][idx].append(v)
    out = {}
    for role in sorted(acc):
        xs = sorted(acc[role])
        out[role] = (xs, [sum(acc[role][x]) / len(acc[role][x]) for x in xs])
    return out


def _plot_lines(ax: Any, series: dict[str, tuple[list[int], list[float]]], ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "v", "D", "x", "+")
    for k, (role, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, styles[k % 4], marker=markers[k % 7], markersize=4, label=role)
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8, ncol=2)


def plot_ranks(report: Report, path: str | Path) -> Path | None:
    """Rank per block, one line per module role; pruned widths in a second panel.

    Returns the written path, or None when the report has no rank and no width.
    """
    ranks = _series((m for m in report.modules if m.kind == "lowrank"), "rank")
    widths = _series((m for m in report.modules if m.kind == "pruned"), "width")
    panels = [(s, lbl) for s, lbl in ((ranks, "rank"), (widths, "kept width")) if s]
    if not panels:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(panels))
    for ax, (series, label) in zip(axes, panels, strict=True):
        _plot_lines(ax, series, label)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{report.method} @ {report.ratio:g}: {label} per block")
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def plot_errors(report: Report, path: str | Path) -> Path | None:
    """Calibration relative error per block per module role (log scale), plus the block output
    error when recorded. Returns None (nothing written) when the report has no positive error."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for role, (xs, ys) in _series(report.modules, "rel_error").items():
        pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
        if pairs:
            series[role] = ([x for x, _ in pairs], [y for _, y in pairs])
    blocks = [
        (b.index, float(b.rel_output_error))
        for b in report.blocks
        if b.rel_output_error is not None and math.isfinite(b.rel_output_error)
    ]
    blocks = [(i, e) for i, e in sorted(blocks) if e > 0]
    if not series and not blocks:
        return None
    fig, (ax,) = _figure(1)
    _plot_lines(ax, series, "relative error")
    if blocks:
        ax.plot(
            [i for i, _ in blocks],
            [e for _, e in blocks],
            "k--",
            marker="s",
            markersize=3,
            label="block output",
        )
        ax.legend(fontsize=8, ncol=2)
    ax.set_yscale("log")
    ax.set_title(f"{report.method} @ {report.ratio:g}: calibration relative error")
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def perplexity_results(report: Report) -> dict[str, dict[str, dict[str, Any]]]:
    """Perplexity results of a report by variant: ``{"compressed": {source: result}, "dense":
    ...}``. Reads ``evaluation["perplexity"]`` (one evaluation, counted as "compressed") and
    ``evaluation[variant]["perplexity"]`` (before / after evaluations of ``factorlm compress``)."""
    ev = report.evaluation or {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    if isinstance(ev.get("perplexity"), dict):
        out["compressed"] = ev["perplexity"]
    for variant, sub in ev.items():
        if isinstance(sub, dict) and isinstance(sub.get("perplexity"), dict):
            out[variant] = sub["perplexity"]
    return {k: v for k, v in out.items() if v}


def plot_ppl_vs_ratio(reports: Sequence[Report], path: str | Path) -> Path | None:
    """Perplexity (log scale) vs achieved ratio, one line per (method, evaluation source).

    Dense perplexities recorded in the reports are drawn at ratio 0 at the start of each line
    of the same source. Returns None (nothing written) when no report has a perplexity.
    """
    lines: dict[tuple[str, str], dict[float, float]] = defaultdict(dict)
    dense: dict[str, float] = {}
    for r in reports:
        results = perplexity_results(r)
        for src, res in results.get("compressed", {}).items():
            ppl = res.get("ppl") if isinstance(res, dict) else None
            if isinstance(ppl, int | float) and math.isfinite(ppl) and ppl > 0:
                lines[(r.method, Path(src).name)][float(r.achieved_ratio)] = float(ppl)
        for src, res in results.get("dense", {}).items():
            ppl = res.get("ppl") if isinstance(res, dict) else None
            if isinstance(ppl, int | float) and math.isfinite(ppl) and ppl > 0:
                dense.setdefault(Path(src).name, float(ppl))
    if not lines:
        return None
    fig, (ax,) = _figure(1)
    for (method, src), points in sorted(lines.items()):
        if src in dense:
            points = {0.0: dense[src], **points}
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=f"{method} / {src}")
    ax.set_xlabel("achieved ratio (fraction of targeted parameters removed)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("perplexity vs compression ratio")
    path = Path(path)
    fig.savefig(path, format="png")
    return path
