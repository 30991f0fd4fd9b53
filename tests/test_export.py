"""Export: the plain HF architecture (no remote code, same logits), GGUF (shapes, per-block widths,
tensor types, tokenizer) read back with the ``gguf`` package, and the refusals."""

from __future__ import annotations

import functools
import json

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from torch import nn

import factorlm
from conftest import calib_ids, make_model
from factorlm.cli import main
from factorlm.errors import ConfigError
from factorlm.io.export import block_mlp_widths
from factorlm.io.gguf_export import interleave_rope_rows

KW = dict(n_samples=16, seqlen=32, progress=False)


@functools.cache
def _lorap(arch: str) -> nn.Module:
    model = make_model(arch)
    factorlm.compress(model, method="lorap", ratio=0.3, calibration=calib_ids(), **KW)
    return model


def lorap(arch: str) -> nn.Module:
    import copy

    return copy.deepcopy(_lorap(arch))


def narrow_mlp(model: nn.Module, block: int, width: int) -> None:
    """Prune block ``block``'s llama MLP to its first ``width`` channels (plain linears)."""
    mlp = model.model.layers[block].mlp
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, width, bias=False)
        new.weight.data = old.weight.data[:width].clone()
        setattr(mlp, name, new)
    new = nn.Linear(width, mlp.down_proj.out_features, bias=False)
    new.weight.data = mlp.down_proj.weight.data[:, :width].clone()
    mlp.down_proj = new


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt2", "opt"])
def test_hf_plain_loads_without_remote_code_with_equal_logits(arch, tmp_path):
    model = lorap(arch)
    widths = block_mlp_widths(model)
    original = make_model(arch)
    assert len(set(widths)) == 1 and widths[0] < block_mlp_widths(original)[0]
    summary = factorlm.export(model, tmp_path / "plain", format="hf")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert cfg["model_type"] == original.config.model_type
    assert "auto_map" not in cfg and "factorlm" not in cfg
    assert not list((tmp_path / "plain").glob("*.py"))
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert type(plain) is type(original)
    assert block_mlp_widths(plain) == widths
    assert summary.densified  # lorap factorizes attention: the summary says so
    x = calib_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_hf_refuses_per_block_widths_and_names_gguf(tmp_path):
    model = lorap("llama")
    narrow_mlp(model, 0, block_mlp_widths(model)[0] - 8)
    with pytest.raises(ConfigError, match="differ between blocks.*--format gguf"):
        factorlm.export(model, tmp_path / "plain", format="hf")
    assert not (tmp_path / "plain").exists()


def test_gguf_per_block_widths_and_shapes_read_back(tmp_path):
    model = lorap("llama")
    narrow_mlp(model, 1, 24)
    widths = block_mlp_widths(model)
    assert widths[0] != widths[1] == 24
    summary = factorlm.export(model, tmp_path / "m.gguf", format="gguf", dtype="f32")
    reader = gguf.GGUFReader(str(summary.path))
    # llama.cpp's llama sizes every block by block 0's width: per-block widths go as deci, its
    # Llama variant that reads the per-layer array (loaded in llama.cpp: bench/gguf_check.py)
    assert field(reader, "general.architecture") == "deci"
    assert field(reader, "deci.feed_forward_length") == widths
    assert field(reader, "deci.block_count") == 2
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    hidden = model.config.hidden_size
    for i, w in enumerate(widths):  # GGUF shapes list the row length first
        assert shapes[f"blk.{i}.ffn_down.weight"] == (w, hidden)
        assert shapes[f"blk.{i}.ffn_gate.weight"] == (hidden, w)
    assert shapes["blk.0.attn_q.weight"] == (hidden, hidden)  # low-rank q written dense
    assert "output.weight" in shapes and "token_embd.weight" in shapes


def test_gguf_equal_widths_stay_llama_and_unsupported_per_block_widths_are_refused(tmp_path):
    model = lorap("llama")
    summary = factorlm.export(model, tmp_path / "m.gguf", format="gguf", dtype="f32")
    assert field(gguf.GGUFReader(str(summary.path)), "general.architecture") == "llama"
    qwen = lorap("qwen2")
    narrow_mlp(qwen, 1, 24)
    with pytest.raises(ConfigError, match="differ between blocks.*uniform"):
        factorlm.export(qwen, tmp_path / "q.gguf", format="gguf")
    assert not (tmp_path / "q.gguf").exists()


def test_gguf_loads_in_transformers_with_equal_logits(tmp_path):
    """transformers' GGUF loader undoes llama.cpp's q/k row order: equal logits prove the names,
    the hyper-parameters and the rotary reordering."""
    model = lorap("llama")
    factorlm.export(model, tmp_path / "m.gguf", format="gguf", dtype="f32")
    back = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    x = calib_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_interleave_rope_rows_pairs_the_two_halves_of_each_head():
    w = torch.arange(8.0).reshape(8, 1)  # 2 heads of 4 dims
    assert interleave_rope_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_gguf_tensor_types(dtype, tmp_path):
    model = lorap("llama")  # MLP width 40: ffn_down rows are no multiple of 32
    summary = factorlm.export(model, tmp_path, format="gguf", dtype=dtype)
    assert summary.path.name == f"model-{dtype}.gguf"
    reader = gguf.GGUFReader(str(summary.path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    want = gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_gate.weight"] == want
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert any("ffn_down" in n for n in summary.notes) == (dtype == "q8_0")
    gate = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    values = gguf.quants.dequantize(gate.data, gate.tensor_type)
    ref = model.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    np.testing.assert_allclose(values, ref, atol=0.02 * np.abs(ref).max())


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(["the cat sat on the mat", "a dog and the cat"] * 20, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_gguf_tokenizer_from_hf_bpe_and_copied_from_a_gguf(tmp_path):
    tok = _bpe_tokenizer()
    config = tf.LlamaConfig(
        vocab_size=len(tok) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = tf.LlamaForCausalLM(config).eval()
    first = factorlm.export(model, tmp_path / "a.gguf", format="gguf", tokenizer=tok).path
    reader = gguf.GGUFReader(str(first))
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL
    assert types[-3:] == [gguf.TokenType.UNUSED] * 3
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert len(field(reader, "tokenizer.ggml.merges")) == len(merges)
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    copied = factorlm.export(model, tmp_path / "b.gguf", format="gguf", tokenizer_gguf=first).path
    again = gguf.GGUFReader(str(copied))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert field(again, key) == field(reader, key)


def test_fused_model_exports_like_unfused_and_stays_fused(tmp_path):
    from factorlm.nn.fused import fuse, is_fused

    model = lorap("llama")
    assert fuse(model) > 0
    factorlm.export(model, tmp_path / "plain", format="hf")
    assert is_fused(model)
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    x = calib_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_quantized_model_is_refused(tmp_path):
    from factorlm.quantization import quantize

    model = lorap("llama")
    quantize(model, "int8")
    with pytest.raises(ConfigError, match="quantized"):
        factorlm.export(model, tmp_path / "m.gguf", format="gguf")


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_refuses_an_output_inside_the_input(fmt, tmp_path):
    factorlm.save(lorap("llama"), tmp_path / "c")
    with pytest.raises(ConfigError, match="inside"):
        factorlm.export(tmp_path / "c", tmp_path / "c" / "out", format=fmt)
    assert not (tmp_path / "c" / "out").exists()


def test_cli_export_gguf_and_hf_refusal(tmp_path, capsys):
    model = lorap("llama")
    factorlm.save(model, tmp_path / "c")
    assert (
        main(
            [
                "-q",
                "export",
                str(tmp_path / "c"),
                "--format",
                "gguf",
                "--out",
                str(tmp_path / "x.gguf"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "low-rank layers written dense" in out and (tmp_path / "x.gguf").is_file()
    narrow_mlp(model, 0, 24)
    factorlm.save(model, tmp_path / "d")
    assert main(["-q", "export", str(tmp_path / "d"), "--out", str(tmp_path / "p")]) == 2
    assert "--format gguf" in capsys.readouterr().err
    assert (
        main(["-q", "export", str(tmp_path / "c"), "--out", str(tmp_path / "p"), "--dtype", "q8_0"])
        == 2
    )
