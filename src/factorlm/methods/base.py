"""The method interface: a pure function (W, stats, rank) -> (A, B), plus a registry.

Every training-free method produces a :class:`Decomposition` of one weight matrix: its spectrum in
the method's own error metric (used by global rank allocation) and the factors at any rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from factorlm.calibration.stats import LayerStats
from factorlm.errors import ConfigError


@dataclass
class Decomposition:
    """Spectrum + factor extraction for one matrix W (m x n)."""

    spectrum: torch.Tensor  # singular values, descending; sum of squares of the tail ~ error
    factors: Callable[
        [int], tuple[torch.Tensor, torch.Tensor]
    ]  # rank -> (A m x r, B r x n), float64
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    decompose: Callable[..., Decomposition]  # (W, stats, **options) -> Decomposition
    needs: frozenset[str]  # subset of {"gram", "abs", "sq", "fisher", "absmax"}
    options: tuple[str, ...] = ()  # accepted keyword options
    doc: str = ""


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    import factorlm.methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def factorize(
    method: str, W: torch.Tensor, stats: LayerStats | None, rank: int, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convenience: (A, B) of ``W`` at ``rank`` with ``method`` (pure; float64 results)."""
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ConfigError(f"rank {rank} is outside [1, {min(m, n)}] for a {m}x{n} matrix")
    return get_method(method).decompose(W, stats, **options).factors(rank)


# --- block-level methods -------------------------------------------------------------------------
# A builder turns a CompressionPlan (see factorlm.api) into a BlockCompressor for the pipeline.
# The training-free family registers one generic builder per method; lorap and distill add theirs.
BUILDERS: dict[str, Callable] = {}
BUILDER_OPTIONS: dict[str, tuple[str, ...]] = {}
BUILDER_CHECKS: dict[str, Callable[[dict], object]] = {}  # options -> raises ConfigError if bad


def register_builder(
    name: str,
    builder: Callable,
    options: tuple[str, ...] = (),
    check: Callable[[dict], object] | None = None,
) -> None:
    BUILDERS[name] = builder
    BUILDER_OPTIONS[name] = options
    if check is not None:
        BUILDER_CHECKS[name] = check


def available_methods() -> list[str]:
    import factorlm.methods  # noqa: F401

    return sorted(set(BUILDERS) | set(METHODS))
