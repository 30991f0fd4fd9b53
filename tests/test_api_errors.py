"""Bad input through the Python API: typed errors with one clear message, before any heavy work."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import factorlm
from factorlm.calibration.data import build_calibration, precheck_calibration
from factorlm.errors import CalibrationError, ConfigError, ModelLoadError, OutputExistsError
from helpers_cli import write_calib
from helpers_input import FAST


@pytest.fixture(scope="module")
def tiny(files):
    model, tok = factorlm.load_model(str(files / "model"))
    return model, tok


@FAST
@given(ratio=st.one_of(st.floats().filter(lambda r: not 0 < r < 1), st.integers(), st.text()))
def test_api_ratio_out_of_range(tiny, ratio):
    model, tok = tiny
    with pytest.raises(ConfigError, match="ratio"):
        factorlm.compress(model, "svd", ratio, ["w1 w2"], tok)


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        (dict(method="bogus"), ConfigError, "bogus"),
        (dict(method="nsvd", variant="III"), ConfigError, "variant"),
        (dict(method="svd-llm", alpha=0.5), ConfigError, "alpha"),
        (dict(allocation="random"), ConfigError, "random"),
        (dict(rank=0), ConfigError, "rank"),
        (dict(rank=65), ConfigError, "at most 64"),
        (dict(calibration="{root}/missing.txt"), CalibrationError, "missing.txt"),
        (dict(calibration="{root}/empty.txt"), CalibrationError, "no text"),
        (dict(calibration="{root}/short.txt"), CalibrationError, "too short"),
        (dict(calibration="{root}/wrong_field.jsonl"), CalibrationError, "'text'"),
        (dict(calibration=[]), CalibrationError, "empty"),
        (dict(calibration=[1, 2]), CalibrationError, "strings"),
        (dict(calibration=12), CalibrationError, "int"),
        (dict(n_samples=0), CalibrationError, "n_samples"),
        (dict(batch_size=0), CalibrationError, "batch_size"),
        (dict(tokenizer=None), CalibrationError, "tokenizer"),
    ],
)
def test_api_bad_input(files, tiny, kwargs, error, needle):
    model, tok = tiny
    kw = dict(method="svd-llm", ratio=0.3, calibration=str(files / "calib.txt"), tokenizer=tok)
    kw.update(n_samples=8, seqlen=32, progress=False)
    kw.update(kwargs)
    if isinstance(kw["calibration"], str):
        kw["calibration"] = kw["calibration"].format(root=files)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        factorlm.compress(model, **kw)
    assert needle in str(info.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "model left unchanged"


def test_precheck_calibration_needs_no_tokenizer(files):
    precheck_calibration(str(files / "calib.txt"), 8, 32)
    precheck_calibration("some_dataset_name", 8, 32)  # checked later, by the dataset loader
    with pytest.raises(CalibrationError, match="too short"):
        precheck_calibration(str(files / "calib.txt"), 10_000, 512)
    with pytest.raises(CalibrationError, match="no field 'text'"):
        precheck_calibration(str(files / "wrong_field.jsonl"), 1, 2)
    precheck_calibration(None, 64, 512)  # the bundled sample: ~235 KB
    with pytest.raises(CalibrationError, match="bundled sample"):
        precheck_calibration(None, 1024, 2048)
    precheck_calibration(torch.zeros(2, 8, dtype=torch.long), 64, 512)  # token ids: later


def test_calibration_folder_and_json_sources(tmp_path, tiny):
    _, tok = tiny
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_calib(d / "a.txt", 30)
    (d / "sub" / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": f"w{i} w{i + 1} w{i + 2}"}) for i in range(20))
    )
    (d / "c.jsonl").write_text(json.dumps("w5 w6 w7 w8"))
    (d / ".hidden.txt").write_text("w1 " * 10_000)
    (d / "notes.bin").write_bytes(b"\xff\xfe")
    calib = build_calibration(str(d), tok, n_samples=4, seqlen=16)
    assert calib.summary["source_tokens"] == 30 * 20 + 20 * 3 + 4
    calib = build_calibration(d, tok, n_samples=4, seqlen=16)  # a Path works too
    assert calib.n_tokens == 64
    (tmp_path / "x.jsonl").write_text('{"text": "w1"}\n[1, 2]\n')
    with pytest.raises(CalibrationError, match="line 2"):
        build_calibration(str(tmp_path / "x.jsonl"), tok, n_samples=1, seqlen=2)
    (tmp_path / "y.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(CalibrationError, match="field 'text' is int"):
        build_calibration(str(tmp_path / "y.jsonl"), tok, n_samples=1, seqlen=2)


def test_unsupported_architecture_without_blocks(tiny):
    class Cfg:
        model_type = "teapot"
        num_hidden_layers = 2

    class Teapot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Cfg()
            self.spout = torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError) as info:
        factorlm.compress(Teapot(), "svd", 0.3, torch.zeros(1, 4, dtype=torch.long))
    msg = str(info.value)
    assert "unsupported architecture 'teapot'" in msg and "llama" in msg and "mixtral" in msg


def test_unsupported_architecture_falls_back_with_a_warning(caplog):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    caplog.set_level(logging.WARNING, logger="factorlm")
    report = factorlm.compress(model, "svd", 0.3, torch.randint(0, 64, (4, 16)), progress=False)
    assert report.achieved_ratio >= 0.3
    assert "'gpt_neox' has no adapter" in caplog.text and "llama" in caplog.text
    assert "falling back to every nn.Linear inside gpt_neox.layers" in caplog.text


def test_output_exists_error_is_typed(files, tiny):
    model, tok = tiny
    with pytest.raises(OutputExistsError, match="nonempty"):
        factorlm.save(model, files / "nonempty")
    assert isinstance(OutputExistsError("x"), FileExistsError)


def test_model_load_error_is_typed(files):
    with pytest.raises(ModelLoadError):
        factorlm.load_model(str(files / "a_file"))
