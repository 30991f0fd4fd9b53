"""The compression report: what every compress run returns and writes (JSON, markdown, plots)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ModuleRecord:
    """One targeted linear after compression."""

    name: str
    group: str  # attn / mlp / ssm / all
    shape: tuple[int, int]  # (out, in) of the original
    kind: str  # "lowrank" | "dense" | "pruned"
    rank: int | None = None  # for lowrank
    width: int | None = None  # kept intermediate channels, for pruned
    params_before: int = 0
    params_after: int = 0
    rel_error: float | None = None  # ||W X - W' X||_F^2 / ||W X||_F^2 on calibration inputs
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # e.g. "gram shifted by 1e-6"
    computed_by: int | None = None  # the torchrun process that factorized it (None: one process)


@dataclass
class BlockRecord:
    index: int
    seconds: float = 0.0
    rel_output_error: float | None = None  # block output vs dense block output on calibration data
    loss_before: float | None = None  # distillation: block loss at init (held-out)
    loss_after: float | None = None
    peak_device_bytes: int | None = None
    peak_rss_bytes: int | None = None


@dataclass
class Report:
    method: str
    ratio: float  # requested fraction of targeted parameters removed
    achieved_ratio: float = 0.0
    allocation: str = "uniform"
    options: dict[str, Any] = field(default_factory=dict)  # the options not at their default
    config: dict[str, Any] = field(default_factory=dict)  # the method's config (to_dict)
    run: dict[str, Any] = field(default_factory=dict)  # RunOptions.recipe()
    model_type: str | None = None
    model_name: str | None = None
    params_targeted_before: int = 0
    params_targeted_after: int = 0
    params_total_before: int = 0
    params_total_after: int = 0
    calibration: dict[str, Any] = field(
        default_factory=dict
    )  # source, n_samples, seqlen, seed, tokens
    modules: list[ModuleRecord] = field(default_factory=list)
    blocks: list[BlockRecord] = field(default_factory=list)
    wall_seconds: float = 0.0
    peak_rss_bytes: int | None = None
    peak_device_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)  # ill-conditioned Gram matrices, fallbacks...
    #: distill's end-to-end stage: held-out KL and next-token cross-entropy before / after, steps,
    #: seconds (empty without it)
    end_to_end: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # filled by factorlm.evaluate
    environment: dict[str, Any] = field(default_factory=dict)  # versions, machine, command

    @property
    def total_ratio(self) -> float:
        """Fraction of the whole model's parameters removed."""
        if not self.params_total_before:
            return 0.0
        return 1.0 - self.params_total_after / self.params_total_before

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules if m.rank is not None}

    @property
    def widths(self) -> dict[str, int]:
        return {m.name: m.width for m in self.modules if m.width is not None}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_ratio"] = self.total_ratio
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        d = dict(d)
        d.pop("total_ratio", None)
        known = set(cls.__dataclass_fields__)
        mods = [ModuleRecord(**{**m, "shape": tuple(m["shape"])}) for m in d.pop("modules", [])]
        blocks = [BlockRecord(**b) for b in d.pop("blocks", [])]
        return cls(**{k: v for k, v in d.items() if k in known}, modules=mods, blocks=blocks)

    def summary_lines(self) -> list[str]:
        lines = [
            f"method {self.method}  allocation {self.allocation}  requested ratio {self.ratio:.3f}",
            f"targeted linear parameters: {self.params_targeted_before:,} -> {self.params_targeted_after:,} "
            f"(removed {self.achieved_ratio:.2%})",
            f"whole model parameters:     {self.params_total_before:,} -> {self.params_total_after:,} "
            f"(removed {self.total_ratio:.2%})",
            f"wall time {self.wall_seconds:.1f} s"
            + (f", peak RSS {self.peak_rss_bytes / 2**30:.2f} GiB" if self.peak_rss_bytes else "")
            + (
                f", peak device memory {self.peak_device_bytes / 2**30:.2f} GiB"
                if self.peak_device_bytes
                else ""
            ),
        ]
        e2e = self.end_to_end
        if e2e.get("error"):
            lines.append(f"end-to-end refinement failed ({e2e['error']}): block pass kept")
        elif e2e.get("loss_before") is not None and e2e.get("loss_after") is not None:
            lines.append(
                f"end-to-end refinement: held-out KL {e2e['loss_before']:.4f} -> "
                f"{e2e['loss_after']:.4f}"
                + (
                    f", cross-entropy {e2e['ce_before']:.4f} -> {e2e['ce_after']:.4f}"
                    if e2e.get("ce_before") is not None and e2e.get("ce_after") is not None
                    else ""
                )
                + f" ({e2e.get('steps', 0)} steps"
                + (", optimizer state on the host" if e2e.get("offload") else "")
                + (", undone: it rose" if e2e.get("kept_init") else "")
                + ")"
            )
        return lines
