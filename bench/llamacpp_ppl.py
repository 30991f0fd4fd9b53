"""Perplexity of a GGUF in llama.cpp (llama-cpp-python) on given token ids, factorlm's protocol.

Run by bench/gguf_check.py with the Python of a separate venv that has llama-cpp-python:

    /work/venv-llamacpp/bin/python bench/llamacpp_ppl.py MODEL.gguf IDS.json --seqlen 512

With ``--tokenize``, IDS.json is ``{"text", "ids"}`` and the script prints whether llama.cpp's
tokenizer of the GGUF turns the text into the same ids. Otherwise IDS.json is a list of token ids (tokenized by factorlm, no special tokens). They are cut into
non-overlapping windows of ``seqlen`` tokens (the last partial window dropped); each window is
evaluated from an empty context and every position's logits predict the next token of the window
(``seqlen - 1`` predictions per window), as in factorlm.eval.perplexity. Prints one JSON object.
Depends on numpy and llama_cpp only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
from llama_cpp import Llama


def window_nll(logits: np.ndarray, ids: list[int]) -> float:
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("ids")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--tokenize",
        action="store_true",
        help='IDS.json is {"text", "ids"}: print whether llama.cpp tokenizes text into ids',
    )
    args = p.parse_args()
    ids = json.loads(open(args.ids).read())
    if args.tokenize:
        llm = Llama(model_path=args.gguf, vocab_only=True, verbose=False)
        got = llm.tokenize(ids["text"].encode("utf-8"), add_bos=False, special=False)
        want = ids["ids"]
        diff = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        if diff is None and len(got) == len(want):
            print(f"identical ({len(want)} tokens)")
        else:
            print(
                f"differ from token {diff if diff is not None else min(len(got), len(want))} "
                f"({len(got)} vs {len(want)} tokens)"
            )
        return
    llm = Llama(
        model_path=args.gguf,
        n_ctx=args.seqlen,
        n_batch=args.seqlen,
        n_ubatch=args.seqlen,
        logits_all=True,
        n_threads=args.threads,
        verbose=False,
    )
    n_windows = len(ids) // args.seqlen
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for w in range(n_windows):
        window = ids[w * args.seqlen : (w + 1) * args.seqlen]
        llm.reset()
        llm.eval(window)
        nll = window_nll(np.asarray(llm.scores[: len(window)]), window)
        if not math.isfinite(nll):
            raise SystemExit(f"window {w}: non-finite loss")
        total += nll
        count += len(window) - 1
    print(
        json.dumps(
            {
                "ppl": math.exp(total / count),
                "nll": total / count,
                "n_tokens": count,
                "n_windows": n_windows,
                "seqlen": args.seqlen,
                "seconds": time.perf_counter() - t0,
                "n_vocab": llm.n_vocab(),
            }
        )
    )


if __name__ == "__main__":
    main()
