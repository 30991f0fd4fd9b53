"""How a compression runs (as opposed to *what* it produces, the method's config): calibration
size and batches, sequential / one-pass pipeline, rank rounding, device and offload, progress,
checkpoints and resume. Validated when built; serialised to versioned JSON for ``recipe.json``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from factorlm.calibration.data import check_sizes
from factorlm.errors import ConfigError
from factorlm.io.format import dtype_name, parse_dtype
from factorlm.methods.config import is_int

#: fields that do not change the result: not part of a recipe's identity (see :meth:`recipe`)
LOCAL_FIELDS = ("device", "offload", "progress", "workdir", "resume")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Pipeline settings of :func:`factorlm.compress` (see its docstring for each)."""

    version: ClassVar[int] = 1

    n_samples: int = 64
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    sequential: bool = True
    rank_multiple: int | None = None
    calib_dtype: torch.dtype | str | None = None
    one_pass: bool = True
    device: Any = None
    offload: Any = "cpu"
    progress: bool = True
    workdir: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        check_sizes(self.n_samples, self.seqlen, self.batch_size)
        if self.rank_multiple is not None and (
            not is_int(self.rank_multiple) or self.rank_multiple < 1
        ):
            raise ConfigError(
                f"rank_multiple must be a positive integer, got {self.rank_multiple!r}"
            )
        if not is_int(self.seed):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        for name in ("sequential", "one_pass", "progress", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        dt = parse_dtype(self.calib_dtype, what="calib_dtype")
        if dt not in (None, torch.bfloat16, torch.float16, torch.float32):
            raise ConfigError(
                f"calib_dtype must be bfloat16, float16 or float32, got {self.calib_dtype!r}"
            )
        object.__setattr__(self, "calib_dtype", dt)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.dtype):
                v = dtype_name(v)
            elif isinstance(v, torch.device):
                v = str(v)
            out[f.name] = v
        return out

    def recipe(self) -> dict[str, Any]:
        """The settings that decide the result (what ``--recipe`` re-runs)."""
        return {k: v for k, v in self.to_dict().items() if k not in LOCAL_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> RunOptions:
        if not isinstance(data, Mapping):
            raise ConfigError(f"run options must be a JSON object, got {data!r}")
        data = dict(data)
        version = data.pop("version", 1)
        if not is_int(version) or version > cls.version:
            raise ConfigError(
                f"run options version {version!r} is not readable by this factorlm "
                f"(reads up to {cls.version})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown run options {unknown}")
        return cls(**{**data, **overrides})
