"""Evaluation: text sources, perplexity protocol, local multiple choice, lm-eval wrapping, speed."""

from __future__ import annotations

import copy
import json
import math
import sys
import types

import pytest
import torch
import transformers as tf

from factorlm.errors import ConfigError, EvaluationError
from factorlm.eval import compare_speed, evaluate, load_texts, measure_speed, perplexity, zeroshot
from factorlm.eval.perplexity import tokenize_joined
from factorlm.eval.zeroshot import encode_pair, loglikelihoods

SENTENCES = [
    "The cat sat on the mat and looked at the dog.",
    "A dog ran in the park while the children played with a red ball.",
    "Economists said the market would recover after the long winter of losses.",
    "She opened the window, and the cold air of the morning filled the small room.",
    "In 1961 the committee voted to build a new bridge across the river.",
    "He wrote three letters to his brother, but none of them were ever answered.",
]
TEXT = "\n\n".join(" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(len(SENTENCES)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest (and least disturbed by busy machines) on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer trained offline on a few sentences (like GPT-2's, small)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES * 4, vocab_size=320, min_frequency=2, show_progress=False)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tok) + 2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return tf.LlamaForCausalLM(config).eval()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(TEXT + "\n")
    return path


# ----------------------------------------------------------------------------- sources


def test_load_texts_list_and_txt_documents(text_file, tmp_path):
    assert load_texts(["a b", "  ", "c"]) == ["a b", "c"]
    docs = load_texts(text_file)
    assert len(docs) == len(SENTENCES)
    assert docs[0].startswith("The cat sat")
    with pytest.raises(EvaluationError, match="item 1"):
        load_texts(["ok", 3])


def test_load_texts_folder_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second doc\n\nthird doc")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n")
    (tmp_path / "ignored.csv").write_text("x,y")
    assert load_texts(tmp_path) == ["first doc", "second doc", "third doc"]


def test_load_texts_jsonl_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "one"}\n\n{"body": "two"}\n')
    assert load_texts(path, text_field="body") == ["one", "two"]
    with pytest.raises(EvaluationError, match=r"line 1: no field 'text'"):
        load_texts(path)
    path.write_text('{"text": "one"}\n{"other": "two"}\n')
    with pytest.raises(EvaluationError, match=r"line 2: no field 'text'"):
        load_texts(path)
    path.write_text('{"text": "one"}\n{not json\n')
    with pytest.raises(EvaluationError, match="line 2: invalid JSON"):
        load_texts(path)


def test_load_texts_errors(tmp_path):
    with pytest.raises(EvaluationError, match="no such file"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(EvaluationError, match="unknown text source"):
        load_texts("not_a_dataset")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(EvaluationError, match="no text"):
        load_texts(tmp_path / "empty.txt")
    with pytest.raises(EvaluationError, match="no text"):
        load_texts([])


def test_dataset_shortcut_offline_message(monkeypatch):
    calls = []

    def fail(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fail))
    with pytest.raises(EvaluationError, match=r"could not download 'wikitext2' \(offline\?\)"):
        load_texts("wikitext2")
    assert calls[0][0][:2] == ("Salesforce/wikitext", "wikitext-2-raw-v1")


# ----------------------------------------------------------------------------- perplexity


def _direct_ppl(model, ids: list[int], seqlen: int) -> tuple[float, int]:
    n = len(ids) // seqlen
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = torch.tensor(ids[i * seqlen : (i + 1) * seqlen]).unsqueeze(0)
            losses.append(float(model(w, labels=w).loss))  # mean over seqlen - 1 tokens
    return math.exp(sum(losses) / n), n  # equal token counts per window


def test_perplexity_matches_direct_computation(model, tok, text_file):
    ids = tok("\n\n".join(load_texts(text_file)), add_special_tokens=False)["input_ids"]
    seqlen = 40
    expected, n = _direct_ppl(model, ids, seqlen)
    res = perplexity(model, tok, text_file, seqlen=seqlen, batch_size=3, progress=False)
    assert res["n_windows"] == len(ids) // seqlen == n
    assert res["n_tokens"] == n * (seqlen - 1)
    assert res["seqlen"] == seqlen and res["source"] == str(text_file)
    assert res["ppl"] == pytest.approx(expected, rel=1e-5)
    assert res["nll"] == pytest.approx(math.log(expected), rel=1e-5)
    # batch size does not change the result
    res1 = perplexity(model, tok, text_file, seqlen=seqlen, batch_size=1, progress=False)
    assert res1["ppl"] == pytest.approx(res["ppl"], rel=1e-6)


def test_perplexity_max_tokens_and_default_seqlen(model, tok, text_file):
    ids = tok("\n\n".join(load_texts(text_file)), add_special_tokens=False)["input_ids"]
    res = perplexity(model, tok, text_file, seqlen=32, max_tokens=100, progress=False)
    assert res["n_windows"] == 100 // 32
    expected, _ = _direct_ppl(model, ids[:100], 32)
    assert res["ppl"] == pytest.approx(expected, rel=1e-5)
    # the prefix tokenization equals the whole-text tokenization, truncated
    long_texts = load_texts(text_file) * 8
    full = tok("\n\n".join(long_texts), add_special_tokens=False)["input_ids"]
    for k in (1, 57, 300):
        assert tokenize_joined(tok, long_texts, k, margin=8) == full[:k]
    # default window: min(2048, max_position_embeddings = 256)
    many = [TEXT] * 12
    assert perplexity(model, tok, many, progress=False)["seqlen"] == 256


def test_perplexity_non_finite_window_raises(model, tok, text_file):
    seqlen = 24
    ids = tok("\n\n".join(load_texts(text_file)), add_special_tokens=False)["input_ids"]
    assert len(ids) // seqlen > 3
    bad = torch.tensor(ids[2 * seqlen : 3 * seqlen])

    def hook(module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        for row in range(input_ids.shape[0]):
            if torch.equal(input_ids[row].cpu(), bad):
                output.logits[row, 5] = float("nan")
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(EvaluationError, match=r"window 2 of"):
            perplexity(model, tok, text_file, seqlen=seqlen, batch_size=2, progress=False)
    finally:
        handle.remove()


def test_perplexity_too_few_tokens_and_bad_options(model, tok):
    with pytest.raises(EvaluationError, match="fewer than one window"):
        perplexity(model, tok, ["The cat sat."], seqlen=64, progress=False)
    with pytest.raises(ConfigError, match="exceeds"):
        perplexity(model, tok, [TEXT], seqlen=512, progress=False)
    with pytest.raises(EvaluationError, match="tokenizer"):
        perplexity(model, None, [TEXT], progress=False)


# ----------------------------------------------------------------------------- zero-shot


class BigramStub(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: the log-prob of every token given its predecessor is
    known exactly, so the scores of the choices are known."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.config = types.SimpleNamespace(max_position_embeddings=64, vocab_size=table.shape[0])

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def word_tok():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "Q:", "A:", "pick", "an", "animal", "cat", "dog", "big", "red", "blue"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[UNK]")


def _write_mc(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_multiple_choice_known_answers(word_tok, tmp_path):
    v = word_tok.get_vocab()
    table = torch.zeros(len(v), len(v))
    table[v["A:"], v["cat"]] = 4.0  # after "A:" the model strongly prefers "cat"
    table[v["A:"], v["big"]] = 3.0
    table[v["A:"], v["dog"]] = 2.0
    table[v["dog"], v["dog"]] = 8.0  # "dog dog ..." is almost free once started
    stub = BigramStub(table)
    logp = torch.log_softmax(table, -1)
    rows = [
        {"context": "Q: pick an animal A:", "choices": ["dog", "cat"], "gold": 1},
        {"context": "Q: pick an animal A:", "choices": ["cat", "big"], "gold": 1},
        # acc picks "big" (one token), acc_norm the long "dog dog dog dog" (per-byte cheaper)
        {"context": "Q: pick an animal A:", "choices": ["big", "dog dog dog dog"], "gold": 1},
    ]
    s_big = float(logp[v["A:"], v["big"]])
    s_dogs = float(logp[v["A:"], v["dog"]] + 3 * logp[v["dog"], v["dog"]])
    assert s_big > s_dogs and s_big / 3 < s_dogs / 15  # the hand case is what it claims
    path = _write_mc(tmp_path / "animals.jsonl", rows)
    res = zeroshot(stub, word_tok, [str(path)], batch_size=2, progress=False)[str(path)]
    assert res["task"] == "animals" and res["n"] == 3
    assert res["acc"] == pytest.approx(1 / 3)  # only the first example
    assert res["acc_norm"] == pytest.approx(2 / 3)  # first and third
    assert zeroshot(stub, word_tok, [str(path)], limit=1, progress=False)[str(path)]["n"] == 1
    # the scores themselves
    reqs = [encode_pair(word_tok, rows[2]["context"], c) for c in rows[2]["choices"]]
    scores = loglikelihoods(stub, reqs, batch_size=1)
    assert scores == pytest.approx([s_big, s_dogs], rel=1e-6)


def test_mc_batched_equals_unbatched(model, tok):
    pairs = [
        encode_pair(tok, "The cat sat on the", "mat"),
        encode_pair(tok, "A dog ran in the park while the children", "played with a red ball"),
        encode_pair(tok, "She opened", " the window"),
        encode_pair(tok, "In 1961 the committee voted to build ", "a new bridge"),
    ]
    one = loglikelihoods(model, pairs, batch_size=1)
    many = loglikelihoods(model, pairs, batch_size=4)
    assert many == pytest.approx(one, rel=1e-5, abs=1e-5)
    # direct: sum of log-probs of the continuation given the context, unpadded
    ctx, cont = pairs[1]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    expected = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert one[1] == pytest.approx(expected, rel=1e-5)

    # trailing whitespace of the context moves to the continuation, like lm-eval
    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    assert pairs[0] == (enc("The cat sat on the"), enc(" mat"))
    assert encode_pair(tok, "The cat sat on the ", "mat") == (
        enc("The cat sat on the"),
        enc("  mat"),
    )
    assert encode_pair(tok, "The cat sat on the", "\nmat")[1] == enc("\nmat")


def test_mc_malformed_lines(word_tok, tmp_path):
    stub = BigramStub(torch.zeros(11, 11))
    path = _write_mc(tmp_path / "t.jsonl", [{"context": "Q:", "choices": ["cat", "dog"]}])
    with pytest.raises(EvaluationError, match=r"line 1: no field 'gold'"):
        zeroshot(stub, word_tok, [str(path)], progress=False)
    _write_mc(path, [{"context": "Q:", "choices": ["cat"], "gold": 3}])
    with pytest.raises(EvaluationError, match="line 1: field 'gold'"):
        zeroshot(stub, word_tok, [str(path)], progress=False)
    with pytest.raises(EvaluationError, match="no such"):
        zeroshot(stub, word_tok, [str(tmp_path / "missing.jsonl")], progress=False)


def test_lm_eval_failure_is_wrapped(model, tok, monkeypatch):
    import lm_eval
    import lm_eval.models.huggingface as hf

    def fail(**kwargs):
        raise KeyError("Tasks not found: definitely_not_a_task")

    monkeypatch.setattr(lm_eval, "simple_evaluate", fail, raising=False)
    monkeypatch.setattr(hf, "HFLM", lambda **kwargs: object())
    with pytest.raises(EvaluationError, match="lm-eval failed on definitely_not_a_task"):
        zeroshot(model, tok, ["definitely_not_a_task"], progress=False)


def test_lm_eval_results_are_read(model, tok, monkeypatch):
    import lm_eval
    import lm_eval.models.huggingface as hf

    seen = {}

    def fake(model, tasks, limit):
        seen.update(model=model, tasks=tasks, limit=limit)
        return {
            "results": {"piqa": {"alias": "piqa", "acc,none": 0.6, "acc_norm,none": 0.65}},
            "n-samples": {"piqa": {"original": 1838, "effective": 5}},
        }

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake, raising=False)
    monkeypatch.setattr(hf, "HFLM", lambda **kw: ("hflm", kw["pretrained"], kw["batch_size"]))
    res = zeroshot(model, tok, ["piqa"], limit=5, batch_size=3, progress=False)
    assert res["piqa"]["acc"] == 0.6 and res["piqa"]["acc_norm"] == 0.65 and res["piqa"]["n"] == 5
    assert seen["model"] == ("hflm", model, 3) and seen["tasks"] == ["piqa"] and seen["limit"] == 5


# ----------------------------------------------------------------------------- speed / api


def test_measure_speed_and_compare(model):
    res = measure_speed(model, prompt_len=16, gen_len=4, repeats=2, warmup=1)
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0
    assert res["decode_method"] == "kv-cache loop"
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert res["model_bytes"] >= params and res["peak_mem_bytes"] >= res["model_bytes"]
    assert res["device"] == "cpu" and res["dtype"] == "float32" and res["batch_size"] == 1
    wide = copy.deepcopy(model).double()  # twice the bytes of the reference
    both = compare_speed({"a": model, "b": wide}, batch_size=2, prompt_len=8, gen_len=2, repeats=1)
    a, b = both["a"], both["b"]
    assert list(both) == ["a", "b"] and b["dtype"] == "float64"
    assert b["model_bytes_ratio"] == 2.0 == b["model_bytes"] / a["model_bytes"]
    for kind in ("prefill", "decode"):  # relative to the first model, not to itself
        assert b[f"{kind}_ratio"] == pytest.approx(b[f"{kind}_tok_s"] / a[f"{kind}_tok_s"])
        assert b[f"{kind}_tok_s"] != a[f"{kind}_tok_s"]
    assert b["mem_ratio"] == pytest.approx(b["peak_mem_bytes"] / a["peak_mem_bytes"])
    with pytest.raises(ConfigError, match="exceeds"):
        measure_speed(model, prompt_len=250, gen_len=10)


def test_prefill_is_generates_first_step(model):
    """Prefill fills the cache and computes the last position's logits only, as generate does."""
    rows = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(tuple(o.shape)))
    try:
        measure_speed(model, batch_size=2, prompt_len=12, gen_len=3, repeats=1, warmup=0)
    finally:
        handle.remove()
    vocab = model.config.vocab_size
    assert (2, 12, vocab) not in rows  # no full-prompt logits
    assert rows and set(rows) == {(2, 1, vocab)}


def test_evaluate_combines(model, tok, text_file, tmp_path):
    mc = _write_mc(
        tmp_path / "mc.jsonl",
        [{"context": "The cat sat on the", "choices": ["mat", "river"], "gold": 0}] * 2,
    )
    res = evaluate(
        model,
        tok,
        ppl=[str(text_file)],
        tasks=[str(mc)],
        speed={"prompt_len": 8, "gen_len": 2, "repeats": 1},
        seqlen=32,
        max_tokens=96,
        progress=False,
    )
    assert set(res) == {"perplexity", "zeroshot", "speed"}
    assert res["perplexity"][str(text_file)]["n_windows"] == 3
    assert res["zeroshot"][str(mc)]["n"] == 2
    assert res["speed"]["decode_tok_s"] > 0
    assert evaluate(model, tok, ppl=str(text_file), seqlen=32, progress=False)["speed"] == {}


def test_compiled_benches_raise_dynamos_recompile_limit(model, monkeypatch):
    """Side-by-side compiled models share transformers' forward code: with dynamo's default limit
    (8 entries) every model after the first few would silently run eager."""
    from factorlm.eval import speed

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # no real compilation here
    # (not monkeypatch.setattr: its undo deletes a torch config entry, breaking later compiles)
    with cfg.patch({name: 8}):
        speed._Bench(model, 1, 8, 4, "cpu", compile=True)
        assert getattr(cfg, name) >= 64
