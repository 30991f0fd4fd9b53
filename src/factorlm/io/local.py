"""Loading of local sources: Hugging Face model directories (plain or factorlm-compressed) and
``.gguf`` files. :func:`factorlm.io.hub.load_model` dispatches here; the default model's cache
(:mod:`factorlm.io.default_model`) is a local directory converted from a GGUF by these functions.

Every failure is raised as :class:`~factorlm.errors.ModelLoadError` (or ``FormatError`` for a
corrupt factorlm directory) with a one-line message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from factorlm.errors import ModelLoadError
from factorlm.io import format as fmt

logger = logging.getLogger(__name__)

_IM_START = "<|im_start|>"
_IM_END = "<|im_end|>"


#: what reading a truncated or corrupt weight file raises (safetensors, the GGUF reader)
_UNREADABLE: tuple[type[BaseException], ...] = (
    SafetensorError,
    struct.error,
    EOFError,
    IndexError,
    RuntimeError,
)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """Normalize a dtype argument: ``None`` -> ``torch.float32``; names like ``"bf16"``,
    ``"float16"``, ``"torch.bfloat16"``; ``"auto"`` is kept (the checkpoint's own dtype).

    Raises:
        ConfigError: unknown dtype name or type.
    """
    return fmt.parse_dtype(dtype, allow_auto=True) or torch.float32


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def hub_errors() -> tuple[type[BaseException], ...]:
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


def finish(model: nn.Module, dtype: torch.dtype | str, device: Any) -> nn.Module:
    """Cast (when a concrete dtype was asked), move to ``device`` and switch to eval mode."""
    if isinstance(dtype, torch.dtype):
        model.to(dtype)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(path: str, *, trust_remote_code: bool = False, **kwargs: Any):
    """Load the tokenizer next to a model, or return ``None`` (with a warning) if it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (*hub_errors(), TypeError, AttributeError, ImportError) as e:
        logger.warning(
            "no usable tokenizer in %s (%s); continuing without one", path, first_line(e)
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


def _load_factorlm_dir(directory: Path, dtype: torch.dtype | str, device: Any) -> nn.Module:
    """Delegate a factorlm-compressed directory to ``factorlm.io.loading.load``."""
    from factorlm.io.loading import load

    return load(str(directory), dtype=None if dtype == "auto" else dtype, device=device)


def load_local_dir(directory: Path, dtype: torch.dtype | str, device: Any, trust_remote_code: bool):
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a model directory (no config.json)")
    raw = _read_config_json(directory)
    if fmt.has_block(raw):
        logger.info("loading factorlm-compressed model from %s", directory)
        model = _load_factorlm_dir(directory, dtype, device)
    else:
        from transformers import AutoModelForCausalLM

        logger.info("loading model from %s", directory)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), dtype=dtype, trust_remote_code=trust_remote_code
            )
        except SafetensorError as e:
            raise ModelLoadError(
                f"{directory}: corrupt or truncated safetensors file ({first_line(e)})"
            ) from e
        except (*hub_errors(), *_UNREADABLE, TypeError, ImportError) as e:
            raise ModelLoadError(f"could not load the model in {directory}: {first_line(e)}") from e
    tokenizer = load_tokenizer(str(directory), trust_remote_code=trust_remote_code)
    return finish(model, dtype, device), tokenizer


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


def load_gguf(path: Path, dtype: torch.dtype | str, device: Any, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(path.parent), path.name
    logger.info("loading GGUF %s (de-quantizing; this takes a while)", path)
    t0 = time.perf_counter()
    gguf_dtype = torch.float32 if dtype == "auto" else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=gguf_dtype, trust_remote_code=trust_remote_code
        )
    except (*hub_errors(), *_UNREADABLE, TypeError, ImportError) as e:
        raise ModelLoadError(f"could not load GGUF file {path}: {first_line(e)}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (*hub_errors(), *_UNREADABLE, TypeError, ImportError) as e:
        logger.warning("no usable tokenizer in GGUF %s (%s)", path, first_line(e))
        tokenizer = None
    model = _dequantized_copy(model, gguf_dtype)
    _fix_chatml_eos(tokenizer, model)
    logger.info("GGUF %s loaded in %.1f s", path, time.perf_counter() - t0)
    return finish(model, dtype, device), tokenizer
