"""The tokenizer part of a GGUF export: copied from a source GGUF, or built from a HF tokenizer.

A model loaded from a GGUF (the embedded SmolLM2 is one) gets its source file's ``tokenizer.*``
fields verbatim: the same vocabulary, merges, pre-tokenizer and chat template llama.cpp had.
A Hugging Face byte-level BPE tokenizer (GPT-2 style, ``tokenizer.json``) is written as llama.cpp's
``gpt2`` tokenizer model: tokens in id order, their types, the merges and the special token ids.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import gguf

from factorlm.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

TOKENIZER_PREFIX = "tokenizer."


def copy_tokenizer(writer: gguf.GGUFWriter, source: str | os.PathLike, vocab_size: int) -> None:
    """Copy every ``tokenizer.*`` field of the GGUF file ``source`` into ``writer``."""
    try:
        reader = gguf.GGUFReader(str(source))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the tokenizer GGUF {source}: {e}") from e
    fields = {k: f for k, f in reader.fields.items() if k.startswith(TOKENIZER_PREFIX)}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelLoadError(f"{source} has no tokenizer (no tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab_size:
        raise ConfigError(
            f"the tokenizer of {source} has {len(tokens.data)} tokens, the model {vocab_size}"
        )
    for key, f in fields.items():
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)
    log.info("tokenizer copied from %s (%d tokens)", source, vocab_size)


def _bpe_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: the GGUF export builds the "
            "vocabulary from tokenizer.json (or pass tokenizer_gguf= / --tokenizer-gguf FILE)"
        )
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(
            f"the GGUF export writes byte-level BPE tokenizers (GPT-2 style); this one is "
            f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}: "
            "pass a GGUF holding its tokenizer with tokenizer_gguf= / --tokenizer-gguf FILE"
        )
    return data


def vocab_from_tokenizer(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order (``vocab_size`` of them, padded with unused tokens) and their types."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    if max(by_id, default=-1) >= vocab_size:
        raise ConfigError(
            f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = getattr(added[i], "special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def write_hf_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, pre: str | None = None
) -> None:
    """Write a HF byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model."""
    data = _bpe_json(tokenizer)
    tokens, types = vocab_from_tokenizer(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    if pre is None:
        log.warning(
            "GGUF tokenizer: pre-tokenizer unknown, written as 'default' (llama.cpp splits text "
            "with its generic rule; pass tokenizer_gguf= to copy a GGUF's exact tokenizer)"
        )
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            add(value)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    log.info("tokenizer built from %s (%d tokens)", type(tokenizer).__name__, vocab_size)
