"""The method registry: one entry per method = its config class + its block compressor's builder
(+ for the training-free family, its pure decomposition ``(W, stats, **options) -> Decomposition``).

Adding a method is one module and one call::

    @dataclass(frozen=True, kw_only=True)
    class MyConfig(FactorizeConfig):
        method: ClassVar[str] = "mine"
        beta: float = 1.0

        def validate(self):
            self.check_number("beta", 0, 2)

    factorlm.methods.register(MyConfig, decompose=decompose_mine, needs={"gram"})

after which ``factorlm.compress(model, method="mine", beta=0.5)`` and ``factorlm compress
--method mine --opt beta=0.5`` use it. A method that compresses whole blocks (lorap, distill)
passes ``build=`` instead: ``plan -> BlockCompressor`` (see :class:`factorlm.api.CompressionPlan`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from factorlm.calibration.stats import LayerStats
from factorlm.errors import ConfigError
from factorlm.methods.config import FactorizeConfig, MethodConfig


@dataclass
class Decomposition:
    """Spectrum + factor extraction for one matrix W (m x n)."""

    spectrum: torch.Tensor  # singular values, descending; sum of squares of the tail ~ error
    factors: Callable[
        [int], tuple[torch.Tensor, torch.Tensor]
    ]  # rank -> (A m x r, B r x n), float64
    notes: list[str] = field(default_factory=list)


#: statistics a decomposition may ask the calibration pass for
STATISTICS = frozenset({"gram", "abs", "sq", "fisher", "absmax"})


@dataclass(frozen=True)
class MethodEntry:
    """One registered method."""

    name: str
    config: type[MethodConfig]
    #: ``plan -> BlockCompressor``; None: the training-free family's generic compressor
    build: Callable[[Any], Any] | None = None
    #: ``(W, stats, **config.decompose_options()) -> Decomposition`` (training-free family)
    decompose: Callable[..., Decomposition] | None = None
    needs: frozenset[str] = frozenset()
    doc: str = ""

    def builder(self) -> Callable[[Any], Any]:
        if self.build is not None:
            return self.build
        from factorlm.methods.trainingfree import build_trainingfree

        return build_trainingfree


REGISTRY: dict[str, MethodEntry] = {}


def register(
    config: type[MethodConfig],
    build: Callable[[Any], Any] | None = None,
    *,
    decompose: Callable[..., Decomposition] | None = None,
    needs: Iterable[str] = (),
    doc: str = "",
) -> MethodEntry:
    """Register the method ``config.method`` (replacing an entry of the same name)."""
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise TypeError(f"config must be a MethodConfig subclass, got {config!r}")
    name = config.method
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config.__name__}.method must name the method")
    if build is None and decompose is None:
        raise TypeError(f"method {name!r}: give a block compressor (build=) or decompose=")
    if decompose is not None and not issubclass(config, FactorizeConfig):
        raise TypeError(f"method {name!r}: a decomposition method's config is a FactorizeConfig")
    needs = frozenset(needs)
    if needs - STATISTICS:
        raise TypeError(f"method {name!r}: unknown statistics {sorted(needs - STATISTICS)}")
    entry = MethodEntry(name, config, build, decompose, needs, doc)
    REGISTRY[name] = entry
    return entry


def _load_builtins() -> None:
    import factorlm.methods  # noqa: F401  (registers the built-in methods)


def available_methods() -> list[str]:
    _load_builtins()
    return sorted(REGISTRY)


def decomposition_methods() -> list[str]:
    """The training-free family: methods with a per-matrix decomposition."""
    _load_builtins()
    return sorted(n for n, e in REGISTRY.items() if e.decompose is not None)


def get_method(name: str) -> MethodEntry:
    _load_builtins()
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def make_config(
    method: str,
    ratio: float = 0.2,
    allocation: str | None = None,
    rank: int | None = None,
    **options: Any,
) -> MethodConfig:
    """The validated config of ``method`` from loose keyword options (``allocation`` None: the
    method's default)."""
    return get_method(method).config.from_options(
        ratio=ratio, allocation=allocation, rank=rank, **options
    )


def config_from_dict(data: Mapping[str, Any]) -> MethodConfig:
    """Inverse of :meth:`MethodConfig.to_dict` (the method named in ``data``)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("method"), str):
        raise ConfigError(f"a method config needs a 'method' name, got {data!r}")
    return get_method(data["method"]).config.from_dict(data)


def factorize(
    method: str, W: torch.Tensor, stats: LayerStats | None, rank: int, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convenience: (A, B) of ``W`` at ``rank`` with ``method`` (pure; float64 results)."""
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ConfigError(f"rank {rank} is outside [1, {min(m, n)}] for a {m}x{n} matrix")
    entry = get_method(method)
    if entry.decompose is None:
        raise ConfigError(f"method {method!r} has no per-matrix decomposition")
    config = entry.config.from_options(**options)
    return entry.decompose(W, stats, **config.decompose_options()).factors(rank)
