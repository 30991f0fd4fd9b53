"""A run's recipe: everything needed to re-run a compression exactly (``recipe.json`` in a saved
model's directory, and its ``factorlm`` block's ``recipe``): the model source and dtype, the
calibration source, the method's config and the run options. ``factorlm compress --recipe``
replays one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factorlm.errors import ConfigError
from factorlm.io import format as fmt
from factorlm.methods.base import config_from_dict, make_config
from factorlm.methods.config import MethodConfig
from factorlm.run_options import RunOptions

RECIPE_FILE = "recipe.json"
VERSION = 1


@dataclass(frozen=True)
class Recipe:
    model: str | None
    config: MethodConfig
    run: RunOptions
    calibration: Any = None  # the calibration source as given (None: the bundled sample)
    dtype: str | None = None  # dtype the model was loaded in (None: float32)
    quantize: str | None = None  # weight-only quantization after compression ("int8", "int4")

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        """JSON form; ``extra`` (the command line, the calibration summary) is informational."""
        c = self.config
        return {
            "version": VERSION,
            **extra,
            "model": self.model,
            "dtype": self.dtype,
            "calibration_source": self.calibration,
            # readable at a glance (and by older tools); the config below is authoritative
            "method": c.method,
            "ratio": c.ratio,
            "allocation": c.allocation,
            "options": c.changed_options(),
            "quantize": self.quantize,
            "config": c.to_dict(),
            "run": self.run.recipe(),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a recipe is a JSON object")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > VERSION:
            raise ConfigError(f"{where}: recipe version {version!r} is newer than this factorlm's")
        try:
            if "config" in data:
                config = config_from_dict(data["config"])
            else:  # written before configs were versioned: method + ratio + options
                config = make_config(
                    data["method"],
                    ratio=data["ratio"],
                    allocation=data.get("allocation", "uniform"),
                    **(data.get("options") or {}),
                )
            if "run" in data:
                run = RunOptions.from_dict(data["run"])
            else:
                summary = data.get("calibration") or {}
                run = RunOptions(
                    **{k: summary[k] for k in ("n_samples", "seqlen", "seed") if k in summary}
                )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: incomplete recipe ({type(e).__name__}: {e})") from e
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        calibration = data.get("calibration_source")
        dtype = data.get("dtype")
        if dtype is not None:
            fmt.parse_dtype(dtype)
        quantize = data.get("quantize")
        if quantize not in (None, "int8", "int4"):
            raise ConfigError(f"{where}: quantize must be int8 or int4, got {quantize!r}")
        return cls(data.get("model"), config, run, calibration, dtype, quantize)


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe in a ``recipe.json`` file or in a saved model's directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        file = p / RECIPE_FILE
        if not file.is_file():
            block = (
                fmt.block_of(_read_json(p / "config.json")) if (p / "config.json").is_file() else {}
            )
            if "recipe" not in block:
                raise ConfigError(f"{p}: no {RECIPE_FILE} and no recipe in config.json")
            return Recipe.from_dict(block["recipe"], str(p))
        p = file
    if not p.is_file():
        raise ConfigError(f"recipe: no such file or directory: {path}")
    return Recipe.from_dict(_read_json(p), str(p))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from e
