"""Test helpers: tiny model directories and calibration files, and a CLI wrapper for subprocesses.

As a script (``python tests/helpers_cli.py compress ...``) it runs ``factorlm.cli.main``;
``FACTORLM_TEST_BLOCK_DELAY=<seconds>`` makes every block forward sleep that long first, so that a
test can kill a run on a tiny model between two blocks' checkpoints. Library code never sleeps.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

WORDS = ["[UNK]", "[PAD]", "<eos>"] + [f"w{i}" for i in range(125)]


def tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>"
    )


def make_model_dir(path: Path, n_layers: int = 3, seed: int = 0) -> Path:
    """A tiny random Llama (vocab 128, hidden 64) + word-level tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=2,
        pad_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(path))
    tokenizer().save_pretrained(str(path))
    return path


def calib_text(n_lines: int = 100, words_per_line: int = 20, seed: int = 0) -> str:
    r = random.Random(seed)
    return "\n".join(
        " ".join(f"w{r.randrange(125)}" for _ in range(words_per_line)) for _ in range(n_lines)
    )


def write_calib(path: Path, n_lines: int = 100, words_per_line: int = 20) -> Path:
    path.write_text(calib_text(n_lines, words_per_line), encoding="utf-8")
    return path


def main() -> int:
    delay = float(os.environ.get("FACTORLM_TEST_BLOCK_DELAY", "0") or 0)
    if delay > 0:
        from factorlm.calibration import pipeline

        run_block = pipeline.run_block

        def slow_run_block(*args, **kwargs):
            time.sleep(delay)
            return run_block(*args, **kwargs)

        pipeline.run_block = slow_run_block
    from factorlm.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
