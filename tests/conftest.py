"""Shared fixtures: tiny random models of every supported architecture, built from configs (offline)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers as tf

from helpers_cli import make_model_dir, write_calib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# tiny models: thread start-up costs more than the math (10-25x slower with 2 threads under load)
torch.set_num_threads(1)

VOCAB = 96
_ATTN = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(vocab_size=VOCAB, **_ATTN),
    "mistral": lambda: tf.MistralConfig(vocab_size=VOCAB, **_ATTN),
    "qwen2": lambda: tf.Qwen2Config(vocab_size=VOCAB, **_ATTN),
    "qwen3": lambda: tf.Qwen3Config(vocab_size=VOCAB, head_dim=8, **_ATTN),
    "gemma": lambda: tf.GemmaConfig(vocab_size=VOCAB, head_dim=8, **_ATTN),
    "gemma2": lambda: tf.Gemma2Config(vocab_size=VOCAB, head_dim=8, **_ATTN),
    "phi3": lambda: tf.Phi3Config(vocab_size=VOCAB, pad_token_id=0, **_ATTN),
    "phi": lambda: tf.PhiConfig(vocab_size=VOCAB, **_ATTN),
    "mixtral": lambda: tf.MixtralConfig(
        vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2, **_ATTN
    ),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128
    ),
    "opt": lambda: tf.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
    ),
    "mamba": lambda: tf.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2
    ),
}

# expected number of targeted linears per block
EXPECTED_TARGETS = {
    "llama": 7,
    "mistral": 7,
    "qwen2": 7,
    "qwen3": 7,
    "gemma": 7,
    "gemma2": 7,
    "phi3": 4,
    "phi": 6,
    "mixtral": 4 + 3 * 4,
    "gpt2": 4,
    "opt": 6,
    "mamba": 4,
}

ARCHS = sorted(CONFIGS)


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial biases / norms so that bugs in their handling show up
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.config.architectures = [type(model).__name__]
    return model


def calib_ids(n: int = 16, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


def compress_tiny(model, method: str = "modular", ratio: float = 0.3, **options):
    """factorlm.compress on the 16 x 32 calibration tokens of :func:`calib_ids` (batches of 4)."""
    import factorlm

    options.setdefault("allocation", "uniform")
    return factorlm.compress(
        model,
        method=method,
        ratio=ratio,
        calibration=calib_ids(),
        n_samples=16,
        seqlen=32,
        batch_size=4,
        progress=False,
        **options,
    )


@pytest.fixture
def tiny():
    return make_model


@pytest.fixture
def ids():
    return calib_ids()


# --- the bad-input tests (test_cli_errors, test_preflight, test_api_errors, test_memory, ...) ---


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    model = make_model_dir(root / "model", n_layers=2)
    write_calib(root / "calib.txt")
    (root / "empty.txt").write_text("   \n\n")
    (root / "short.txt").write_text("w1 w2 w3 w4")
    (root / "wrong_field.jsonl").write_text('{"content": "w1 w2"}\n{"content": "w3"}\n')
    (root / "bad.jsonl").write_text('{"text": "w1 w2"\n')
    (root / "binary.txt").write_bytes(bytes(range(256)) * 20)
    (root / "empty_dir").mkdir()
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("precious")
    (root / "a_file").write_text("x")
    (root / "garbage.gguf").write_bytes(b"\x00" * 4096)
    (root / "no_config").mkdir()
    (root / "no_config" / "model.safetensors").write_bytes(b"")
    foreign = root / "foreign_arch"
    shutil.copytree(model, foreign)
    cfg = json.loads((foreign / "config.json").read_text())
    cfg["model_type"] = "not_a_real_architecture"
    (foreign / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture
def no_load(monkeypatch):
    """Fail loudly if the CLI gets as far as loading the model."""
    import factorlm  # here, not at import: conftest sets the environment first
    from factorlm.errors import FactorLMError

    class _Loaded(FactorLMError):
        """Raised by the patched model loader: the run got past every pre-load check."""

    def fake(*a, **k):
        raise _Loaded("MODEL-LOADED")

    monkeypatch.setattr(factorlm, "load_model", fake)
