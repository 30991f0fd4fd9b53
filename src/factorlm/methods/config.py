"""Method configurations: one frozen dataclass per method, validated when built.

A config holds everything that decides *what* a compression produces: the target ``ratio``, the
rank ``allocation`` policy, an optional fixed ``rank``, and the method's own options with their
defaults (written once, as the dataclass fields). Building one checks every value (one
:class:`~factorlm.errors.ConfigError` naming the method and the option), so a bad value is
refused before any model is loaded. Configs serialise to versioned JSON (:meth:`to_dict` /
:func:`config_from_dict`); ``factorlm.save`` stores that in the saved model's ``factorlm`` block
and in ``recipe.json``.

How a run is carried out (calibration size, batches, passes, device, resume) is not part of a
config: see :class:`factorlm.run_options.RunOptions`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from factorlm.errors import ConfigError

#: every allocation policy: "loss" (per-block ratios from the loss's sensitivity) is modular's
ALLOCATIONS = ("uniform", "global", "bottom-first", "loss")
#: fields every method config has (the rest are the method's options)
COMMON = ("ratio", "allocation", "rank")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of every method's config. Subclasses set :attr:`method`, add their options as fields
    with defaults, and check them in :meth:`validate` (called when the config is built)."""

    method: ClassVar[str] = ""
    #: version of this config's JSON form; bump it (and extend :meth:`migrate`) when a field's
    #: meaning changes
    version: ClassVar[int] = 1
    #: allocation policies this method accepts, and the one it uses when none is given
    allocations: ClassVar[tuple[str, ...]] = ("uniform", "global", "bottom-first")
    default_allocation: ClassVar[str] = "uniform"
    #: whether ``rank`` (one fixed rank for every matrix) is accepted
    fixed_rank: ClassVar[bool] = True

    ratio: float = 0.2
    allocation: str | None = None  # None: the method's default_allocation
    rank: int | None = None

    def __post_init__(self) -> None:
        r = self.ratio
        if not is_number(r) or not 0 < r < 1:
            raise ConfigError(
                f"ratio must be a number in (0, 1) (fraction of parameters removed), got {r!r}"
            )
        self._set("ratio", float(r))
        if self.allocation is None:
            self._set("allocation", self.default_allocation)
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"unknown allocation {self.allocation!r}; choose one of: {', '.join(ALLOCATIONS)}"
            )
        if self.allocation not in self.allocations:
            raise ConfigError(
                f"method {self.method!r} does not support allocation {self.allocation!r} "
                f"(supported: {', '.join(self.allocations)})"
            )
        if self.rank is not None:
            if not self.fixed_rank:
                raise ConfigError(
                    f"a fixed rank is not supported by method {self.method!r}, which sets its "
                    "own ranks and widths from ratio; name a method that takes one (e.g. "
                    "method='svd-llm', --method svd-llm)"
                )
            if not is_int(self.rank) or self.rank < 1:
                raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        self.validate()

    # -------------------------------------------------------------- for subclasses
    def validate(self) -> None:
        """Check the method's own options (raise with :meth:`fail`)."""

    def fail(self, option: str, want: str) -> None:
        raise ConfigError(
            f"method {self.method!r}: option {option} must be {want}, got {getattr(self, option)!r}"
        )

    def _set(self, name: str, value: Any) -> None:
        """Normalise a field while validating (the dataclass is frozen)."""
        object.__setattr__(self, name, value)

    def check_number(
        self,
        option: str,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = False,
        high_open: bool = False,
        none: bool = False,
    ) -> None:
        v = getattr(self, option)
        if none and v is None:
            return
        ok = is_number(v)
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if not ok:
            if low is not None and high is not None:
                want = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            elif low is not None:
                want = f"a number {'>' if low_open else '>='} {low}"
            elif high is not None:
                want = f"a number {'<' if high_open else '<='} {high}"
            else:
                want = "a number"
            self.fail(option, ("None or " if none else "") + want)
        self._set(option, float(v))

    def check_int(self, option: str, low: int = 1, *, none: bool = False) -> None:
        v = getattr(self, option)
        if none and v is None:
            return
        if not is_int(v) or v < low:
            self.fail(option, ("None or " if none else "") + f"an integer >= {low}")

    def check_choice(self, option: str, choices: tuple[Any, ...]) -> None:
        if getattr(self, option) not in choices:
            self.fail(option, "one of " + ", ".join(map(repr, choices)))

    def check_bool(self, option: str, *, none: bool = False) -> None:
        v = getattr(self, option)
        if not (isinstance(v, bool) or (none and v is None)):
            self.fail(option, "None, true or false" if none else "true or false")

    # -------------------------------------------------------------- options and JSON
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in COMMON)

    def options(self) -> dict[str, Any]:
        """The method's own options (every field but ratio, allocation and rank)."""
        return {name: getattr(self, name) for name in self.option_names()}

    @classmethod
    def from_options(
        cls,
        ratio: float = 0.2,
        allocation: str | None = None,
        rank: int | None = None,
        **options: Any,
    ) -> MethodConfig:
        """Build from loose keyword options (the keyword API, the CLI's ``--opt``)."""
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            allowed = ", ".join(cls.option_names()) or "none"
            raise ConfigError(
                f"method {cls.method!r} has no option {', '.join(map(repr, unknown))} "
                f"(options: {allowed})"
            )
        return cls(ratio=ratio, allocation=allocation, rank=rank, **options)

    def changed_options(self) -> dict[str, Any]:
        """The options whose value is not the default (what a report names)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in COMMON:
                continue
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            if getattr(self, f.name) != default:
                out[f.name] = getattr(self, f.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Versioned, JSON-serialisable form (tuples become lists)."""
        return {
            "method": self.method,
            "version": self.version,
            "ratio": self.ratio,
            "allocation": self.allocation,
            "rank": self.rank,
            "options": _jsonable(self.options()),
        }

    @classmethod
    def migrate(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Bring ``data`` written by an older version of this config to :attr:`version`."""
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a method config must be a JSON object, got {data!r}")
        data = dict(data)
        if data.get("method") != cls.method:
            raise ConfigError(f"config of method {data.get('method')!r} given to {cls.method!r}")
        version = data.get("version")
        if not is_int(version) or version < 1:
            raise ConfigError(f"method {cls.method!r}: config has no valid version ({version!r})")
        if version > cls.version:
            raise ConfigError(
                f"method {cls.method!r}: config version {version} is newer than this factorlm's "
                f"({cls.version}): upgrade factorlm"
            )
        data = cls.migrate(data)
        unknown = sorted(set(data) - {"method", "version", *COMMON, "options"})
        if unknown:
            raise ConfigError(f"method {cls.method!r}: unknown config keys {unknown}")
        options = data.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"method {cls.method!r}: 'options' must be a JSON object")
        return cls.from_options(
            ratio=data.get("ratio", 0.2),
            allocation=data.get("allocation", "uniform"),
            rank=data.get("rank"),
            **options,
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class FactorizeConfig(MethodConfig):
    """Base of the training-free family: each matrix factorized on its own statistics by the
    method's pure decomposition; ``min_rank`` is the floor of the ``bottom-first`` allocation."""

    #: options used by the block compressor, not passed to the decomposition
    pipeline_options: ClassVar[tuple[str, ...]] = ("min_rank",)

    min_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("min_rank", none=True)

    def decompose_options(self) -> dict[str, Any]:
        """Keyword arguments of the method's decomposition function."""
        return {k: v for k, v in self.options().items() if k not in self.pipeline_options}
