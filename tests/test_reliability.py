"""Reliability: every bad input refused early with one clear message; corrupt saved models refused;
NaN/Inf reported with the layer name; the peak-memory check."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import factorlm
from factorlm import memory
from factorlm.calibration.data import build_calibration, precheck_calibration
from factorlm.cli import main
from factorlm.errors import (
    CalibrationError,
    ConfigError,
    FactorLMError,
    FormatError,
    ModelLoadError,
    NumericalError,
    OutputExistsError,
)
from factorlm.methods import make_config
from helpers_cli import make_model_dir, write_calib

FAST = settings(
    max_examples=40,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they cost a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Loaded(FactorLMError):
    """Raised by the patched model loader: the run got past every pre-load check."""


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

    def fake(*a, **k):
        raise _Loaded("MODEL-LOADED")

    monkeypatch.setattr(factorlm, "load_model", fake)


def _cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["-q", *map(str, args)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _base(files: Path, **over) -> list[str]:
    args = {
        "--method": "svd-llm",
        "--ratio": "0.3",
        "--n-samples": "8",
        "--seqlen": "32",
        "--calib": str(files / "calib.txt"),
        "--out": str(files / "out-never-written"),
    }
    args.update(over)
    return [x for k, v in args.items() if v is not None for x in (k, v)]


# --- bad input through the CLI: refused before the model is loaded ----------------------------

BEFORE_LOAD = [
    ({"--method": "nosuch"}, ["unknown method", "'nosuch'", "svd-llm"]),
    ({"--method": "nsvd", "--variant": "III"}, ["variant", "'III'"]),
    ({"--method": "nsvd", "--k1-share": "7"}, ["k1_share"]),
    ({"--method": "nsvd", "--opt": 'k1_share="abc"'}, ["k1_share", "abc"]),
    ({"--method": "asvd", "--alpha": "-1"}, ["alpha"]),
    ({"--method": "svd-llm", "--alpha": "0.5"}, ["no option", "'alpha'"]),
    ({"--opt": "whiten=sideways"}, ["whiten", "sideways"]),
    ({"--opt": "no-equals-sign"}, ["KEY=VALUE"]),
    ({"--method": "fwsvd", "--opt": "fisher_batches=0"}, ["fisher_batches"]),
    ({"--ratio": "1.5"}, ["ratio", "(0, 1)"]),
    ({"--ratio": "0"}, ["ratio"]),
    ({"--ratio": "nan"}, ["ratio"]),
    ({"--rank": "0"}, ["rank", "positive"]),
    ({"--rank": "4096"}, ["rank 4096", "model.layers.0.", "at most 64"]),
    ({"--allocation": "sideways"}, ["allocation", "'sideways'"]),
    ({"--calib": "{root}/missing.txt"}, ["no such file", "missing.txt"]),
    ({"--calib": "{root}/empty.txt"}, ["contains no text", "empty.txt"]),
    ({"--calib": "{root}/short.txt"}, ["too short", "8 samples x 32"]),
    ({"--calib": "{root}/wrong_field.jsonl"}, ["no field 'text'", "'content'"]),
    ({"--calib": "{root}/bad.jsonl"}, ["invalid JSON", "line 1"]),
    ({"--calib": "{root}/binary.txt"}, ["not UTF-8"]),
    ({"--calib": "{root}/empty_dir"}, ["folder holds no .txt or .jsonl file"]),
    ({"--n-samples": "0"}, ["n_samples"]),
    ({"--seqlen": "1"}, ["seqlen"]),
    ({"--batch-size": "0"}, ["batch_size"]),
    ({"--dtype": "float7"}, ["dtype", "float7"]),
    ({"--device": "warp-drive"}, ["device", "warp-drive"]),
    ({"--out": "{root}/nonempty"}, ["not empty", "--overwrite"]),
    ({"--out": "{root}/a_file"}, ["not a directory"]),
    ({"--eval-ppl": "{root}/missing-eval.txt"}, ["no such file", "missing-eval.txt"]),
]


@pytest.mark.parametrize("over,needles", BEFORE_LOAD, ids=[str(o) for o, _ in BEFORE_LOAD])
def test_cli_bad_input_refused_before_loading(files, capsys, no_load, over, needles):
    over = {k: v.format(root=files) for k, v in over.items()}
    rc, err = _cli(capsys, "compress", files / "model", *_base(files, **over))
    assert rc == 2
    line = _error_line(err)
    assert "MODEL-LOADED" not in line
    for needle in needles:
        assert needle in line, line
    assert (files / "nonempty" / "keep.txt").read_text() == "precious"


def test_cli_cuda_device_without_cuda(files, capsys, no_load):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, err = _cli(capsys, "compress", files / "model", *_base(files, **{"--device": "cuda"}))
    assert rc == 2 and "CUDA is not available" in _error_line(err)


def test_cli_valid_input_reaches_the_loader(files, capsys, no_load):
    rc, err = _cli(capsys, "compress", files / "model", *_base(files))
    assert rc == 2 and "MODEL-LOADED" in _error_line(err)


def test_cli_nonempty_output_refused_fast(files, capsys, no_load):
    """Refused before anything heavy: even with a calibration source that would take long to read."""
    rc, err = _cli(
        capsys, "compress", files / "model", *_base(files, **{"--out": str(files / "nonempty")})
    )
    assert rc == 2 and "exists and is not empty" in _error_line(err)
    assert str(files / "nonempty") in err


@pytest.mark.parametrize(
    "source,needle",
    [
        ("{root}/does/not/exist", "no such file or directory"),
        ("{root}/a_file", "not a model directory"),
        ("{root}/garbage.gguf", "GGUF"),
        ("{root}/no_config", "no config.json"),
        ("{root}/foreign_arch", "not_a_real_architecture"),
        ("someone/not-a-cached-model", "hub"),
    ],
)
def test_cli_bad_model_source(files, capsys, source, needle):
    source = source.format(root=files)
    rc, err = _cli(capsys, "compress", source, *_base(files))
    assert rc == 2
    line = _error_line(err)
    assert needle in line, line
    if source.startswith(str(files)):
        assert source in line


@FAST
@given(
    ratio=st.one_of(
        st.floats(max_value=0.0, allow_nan=False),
        st.floats(min_value=1.0),
        st.just(float("nan")),
    )
)
def test_cli_ratio_out_of_range(files, capsys, no_load, ratio):
    rc, err = _cli(capsys, "compress", files / "model", *_base(files), f"--ratio={ratio!r}")
    assert rc == 2
    assert "ratio" in _error_line(err)


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=5,
)
_OPTION_KEYS = [
    ("nsvd", "k1_share"),
    ("nsvd", "variant"),
    ("asvd", "alpha"),
    ("asvd", "scale"),
    ("svd-llm", "whiten"),
    ("fwsvd", "fisher_batches"),
    ("svd", "min_rank"),
    ("lorap", "a"),
    ("lorap", "keep_least"),
    ("lorap", "channel_multiple"),
    ("distill", "lr"),
    ("distill", "betas"),
    ("distill", "holdout"),
]


# values every option accepts, and values none can take (containers, negative numbers, numbers
# where a name is expected, names where a number is expected, unknown names)
_VALID = {
    "k1_share": [0.5, 1.0], "variant": ["I", "II"], "alpha": [0, 0.5, 2], "scale": ["abs", "absmax"],
    "whiten": ["cholesky", "eig"], "fisher_batches": [1, 4, None], "min_rank": [1, 8, None],
}  # fmt: skip
_NAMED = {"variant", "scale", "whiten"}
_CONTAINER = st.lists(_JSONISH, min_size=1, max_size=3) | st.dictionaries(
    st.text(max_size=3), _JSONISH, min_size=1, max_size=2
)
_NEGATIVE = st.floats(max_value=-1e-6, allow_infinity=False) | st.integers(max_value=-1)


def _never_valid(name: str):
    if name in _NAMED:
        known = {str(v).lower() for v in _VALID[name]}
        other = st.text(max_size=8).filter(lambda t: t.lower() not in known)
        return _CONTAINER | _NEGATIVE | st.floats(min_value=0) | other
    return _CONTAINER | _NEGATIVE | st.text(max_size=8)


@FAST
@given(key=st.sampled_from(_OPTION_KEYS), value=_JSONISH)
def test_api_garbage_option_values(key, value):
    """Any value: accepted, or a ConfigError naming the option; never another exception."""
    method, name = key
    try:
        make_config(method, ratio=0.3, **{name: value})
    except ConfigError as e:
        assert name in str(e) or repr(value)[:20] in str(e) or method in str(e)


_ORACLE_KEYS = [k for k in _OPTION_KEYS if k[1] in _VALID]


@FAST
@given(key=st.sampled_from(_ORACLE_KEYS), data=st.data())
def test_api_refuses_values_no_option_takes(key, data):
    method, name = key
    value = data.draw(_never_valid(name))
    with pytest.raises(ConfigError) as e:
        make_config(method, ratio=0.3, **{name: value})
    assert name in str(e.value) or method in str(e.value)


@pytest.mark.parametrize("key", _ORACLE_KEYS)
def test_api_accepts_the_valid_option_values(key):
    method, name = key
    for value in _VALID[name]:
        make_config(method, ratio=0.3, **{name: value})


@FAST
@given(key=st.sampled_from(_OPTION_KEYS), value=_JSONISH)
def test_cli_garbage_option_values(files, capsys, no_load, key, value):
    method, name = key
    opt = f"{name}={json.dumps(value, allow_nan=True)}"
    rc, err = _cli(
        capsys, "compress", files / "model", *_base(files, **{"--method": method}), "--opt", opt
    )
    assert rc == 2
    line = _error_line(err)
    assert "MODEL-LOADED" in line or name in line or method in line, line


# --- the same through the API -----------------------------------------------------------------


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


# --- memory check -----------------------------------------------------------------------------


def test_memory_estimate_from_checkpoint(files):
    est = memory.estimate_for_checkpoint(files / "model", None, 8, 32)
    n_params = sum(
        t.numel() for t in load_file(str(files / "model" / "model.safetensors")).values()
    )
    assert est.model_bytes == 4 * n_params
    assert (
        memory.estimate_for_checkpoint(files / "model", "bf16", 8, 32).model_bytes == 2 * n_params
    )
    bigger = memory.estimate_for_checkpoint(files / "model", None, 800, 320)
    assert bigger.stream_bytes >= 800 * 320 * 64 * 4 * 3  # three float32 streams
    assert est.total < 64 * 2**20
    assert memory.estimate_for_checkpoint("org/hub-id", None, 8, 32) is None
    assert memory.available_bytes() is None or memory.available_bytes() > 0


def test_cli_refuses_a_run_that_does_not_fit(files, capsys, no_load, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 2**20)
    rc, err = _cli(capsys, "compress", files / "model", *_base(files))
    assert rc == 2
    line = _error_line(err)
    assert "not enough memory" in line and "1.00 MiB" not in line and "--no-memory-check" in line
    assert "calibration activations" in line
    rc, err = _cli(capsys, "compress", files / "model", *_base(files), "--no-memory-check")
    assert "MODEL-LOADED" in _error_line(err)


def test_memory_check_on_a_gpu_device(monkeypatch):
    # a 10 GiB model whose block (0.5 GiB + 1 GiB of statistics + 0.5 GiB of one batch) fits a
    # 4 GiB GPU: the model stays on the host, one block at a time visits the device
    est = memory.MemoryEstimate(
        model_bytes=10 * 2**30,
        block_bytes=2**29,
        stats_bytes=2**30,
        stream_bytes=2**30,
        batch_bytes=2**29,
        outside_bytes=2**29,
    )
    assert est.device_bytes() == 2 * 2**30 and est.host_bytes(on_gpu=True) == 11 * 2**30
    gpu = {"free": 4 * 2**30}
    monkeypatch.setattr(
        memory, "available_bytes", lambda device=None: gpu["free"] if device else 64 * 2**30
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    memory.check_memory(est, "cuda")
    gpu["free"] = 2**30  # the block and its statistics do not fit
    with pytest.raises(memory.InsufficientMemoryError, match="free memory on cuda") as e:
        memory.check_memory(est, "cuda")
    assert "one block 0.50 GiB" in str(e.value)
    memory.check_memory(est, None)  # 12.5 GiB on the host: fits
    with pytest.raises(memory.InsufficientMemoryError, match="host memory"):
        memory.check_memory(dataclasses.replace(est, model_bytes=64 * 2**30), "cuda")


def test_memory_estimate_puts_one_block_on_the_device(tmp_path):
    shallow = make_model_dir(tmp_path / "shallow", n_layers=1)
    deep = make_model_dir(tmp_path / "deep", n_layers=4)
    est, deep_est = (memory.estimate_for_checkpoint(d, None, 8, 32) for d in (shallow, deep))
    tensors = load_file(str(shallow / "model.safetensors"))
    block = sum(t.numel() for k, t in tensors.items() if k.startswith("model.layers.0."))
    outside = sum(t.numel() for k, t in tensors.items() if ".layers." not in k)
    assert est.block_bytes == 4 * block and est.outside_bytes == 4 * outside
    assert est.device_bytes() >= est.block_bytes + est.stats_bytes + est.batch_bytes
    # more blocks: more host memory, the same device memory (one block at a time)
    assert deep_est.model_bytes == est.model_bytes + 3 * 4 * block
    assert deep_est.device_bytes() == est.device_bytes()
    assert deep_est.host_bytes(on_gpu=True) == deep_est.model_bytes + deep_est.stream_bytes


# --- numerics ---------------------------------------------------------------------------------


def _poisoned(files, name: str, value: float):
    model, tok = factorlm.load_model(str(files / "model"))
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[5] = value
    return model, tok


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "name",
    ["model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"],
)
def test_nonfinite_weight_named(files, name, value):
    model, tok = _poisoned(files, name, value)
    with pytest.raises(NumericalError) as info:
        factorlm.compress(
            model, "svd-llm", 0.3, str(files / "calib.txt"), tok, n_samples=8, seqlen=32
        )
    assert name.removesuffix(".weight") in str(info.value)


def test_inf_activations_named(files):
    # finite weights, but the second block's input norm scales activations past float32's range
    model, tok = _poisoned(files, "model.layers.1.input_layernorm.weight", 3e38)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight.fill_(3e38)
    with pytest.raises(NumericalError) as info:
        factorlm.compress(
            model, "svd-llm", 0.3, str(files / "calib.txt"), tok, n_samples=8, seqlen=32
        )
    msg = str(info.value)
    assert "q_proj" in msg and "activations" in msg and "NaN or Inf" in msg


def test_overflowing_statistics_named(files):
    # activations ~1e19 are finite, but their Gram matrix (x x^T ~ 1e38 per token) overflows
    model, tok = factorlm.load_model(str(files / "model"))
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(1e19)
    with pytest.raises(NumericalError) as info:
        factorlm.compress(
            model, "svd-llm", 0.3, str(files / "calib.txt"), tok, n_samples=8, seqlen=32
        )
    msg = str(info.value)
    assert "mlp" in msg and ("Gram" in msg or "activations" in msg or "NaN" in msg), msg


def test_cli_reports_nonfinite_weight(files, tmp_path, capsys):
    model, tok = _poisoned(files, "model.layers.0.mlp.down_proj.weight", float("nan"))
    model.save_pretrained(str(tmp_path / "nan_model"))
    tok.save_pretrained(str(tmp_path / "nan_model"))
    rc, err = _cli(
        capsys, "compress", tmp_path / "nan_model", *_base(files, **{"--out": str(tmp_path / "o")})
    )
    assert rc == 2
    assert "model.layers.0.mlp.down_proj" in _error_line(err)
    assert not (tmp_path / "o").exists()


def test_save_refuses_nonfinite_weights(files, tmp_path):
    model, _ = _poisoned(files, "model.norm.weight", float("nan"))
    with pytest.raises(NumericalError, match="model.norm"):
        factorlm.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


# --- corrupt saved models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(files, tmp_path_factory):
    model, tok = factorlm.load_model(str(files / "model"))
    factorlm.compress(
        model, "svd-llm", 0.3, str(files / "calib.txt"), tok, n_samples=8, seqlen=32, progress=False
    )
    out = tmp_path_factory.mktemp("saved") / "compressed"
    factorlm.save(model, out, tokenizer=tok)
    return out


def _edit_config(fn):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def _edit_tensors(fn):
    def edit(d: Path):
        t = load_file(str(d / "model.safetensors"))
        fn(t)
        save_file(t, str(d / "model.safetensors"))

    return edit


def _first_module(cfg) -> dict:
    return next(iter(cfg["factorlm"]["modules"].values()))


Q = "model.layers.0.self_attn.q_proj"
CORRUPTIONS = {
    "truncated": (lambda d: _truncate(d / "model.safetensors", 0.5), "truncated"),
    "truncated_header": (lambda d: _truncate(d / "model.safetensors", 20), "truncated"),
    "empty_file": (lambda d: (d / "model.safetensors").write_bytes(b""), "corrupt"),
    "garbage": (lambda d: (d / "model.safetensors").write_bytes(bytes(range(256)) * 64), "corrupt"),
    "foreign_tensors": (
        lambda d: save_file({"encoder.weight": torch.zeros(3, 3)}, str(d / "model.safetensors")),
        "do not match",
    ),
    "extra_tensor": (_edit_tensors(lambda t: t.update(extra=torch.zeros(2))), "unexpected"),
    "missing_tensor": (_edit_tensors(lambda t: t.pop(f"{Q}.A.weight")), "missing"),
    "wrong_shape": (
        _edit_tensors(lambda t: t.update({f"{Q}.A.weight": torch.zeros(64, 3)})),
        f"{Q}.A.weight",
    ),
    "int_tensor": (
        _edit_tensors(lambda t: t.update({f"{Q}.B.weight": t[f"{Q}.B.weight"].to(torch.int32)})),
        "dtype",
    ),
    "nan_tensor": (
        _edit_tensors(lambda t: t["model.norm.weight"].fill_(float("nan"))),
        "NaN",
    ),
    "format_version_999": (
        _edit_config(lambda c: c["factorlm"].update(format_version=999)),
        "format version 999",
    ),
    "format_version_missing": (
        _edit_config(lambda c: c["factorlm"].pop("format_version")),
        "format_version",
    ),
    "rank_inconsistent": (
        _edit_config(lambda c: _first_module(c).update(rank=_first_module(c)["rank"] + 8)),
        "disagree",
    ),
    "rank_too_large": (_edit_config(lambda c: _first_module(c).update(rank=10_000)), "rank"),
    "module_entry_dropped": (
        _edit_config(lambda c: c["factorlm"]["modules"].pop(next(iter(c["factorlm"]["modules"])))),
        "do not match",
    ),
    "module_of_other_model": (
        _edit_config(
            lambda c: c["factorlm"]["modules"].update(
                {"model.layers.9.mlp.up_proj": {"type": "linear", "in": 1, "out": 1, "bias": False}}
            )
        ),
        "model.layers.9.mlp.up_proj",
    ),
    "modules_not_a_table": (_edit_config(lambda c: c["factorlm"].update(modules=[])), "modules"),
    "bad_dtype": (_edit_config(lambda c: c["factorlm"].update(dtype="int8")), "dtype"),
    "bad_unfused": (
        _edit_config(lambda c: c["factorlm"].update(unfused_experts=["model.layers.0.mlp"])),
        "model.layers.0.mlp",
    ),
    "hidden_size_changed": (_edit_config(lambda c: c.update(hidden_size=32)), "shape"),
    "unknown_model_class": (
        _edit_config(lambda c: c.update(architectures=["NoSuchForCausalLM"])),
        "NoSuchForCausalLM",
    ),
    "unknown_model_type": (_edit_config(lambda c: c.update(model_type="teapot")), "teapot"),
    "no_factorlm_block": (_edit_config(lambda c: c.pop("factorlm")), "not a factorlm model"),
    "config_invalid_json": (lambda d: (d / "config.json").write_text("{oops"), "invalid JSON"),
    "config_not_object": (lambda d: (d / "config.json").write_text("[1, 2]"), "not a JSON object"),
    "config_missing": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "weights_deleted": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "index_lists_missing_shard": (
        lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}})
        ),
        "model-00002-of-00002.safetensors",
    ),
    "index_malformed": (
        lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
        "index",
    ),
}


def _truncate(path: Path, keep) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_model_refused(saved, tmp_path, capsys, kind):
    corrupt, needle = CORRUPTIONS[kind]
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    corrupt(d)
    with pytest.raises(FormatError) as info:
        factorlm.load(d)
    msg = str(info.value)
    assert needle in msg, msg
    assert "\n" not in msg
    rc, err = _cli(capsys, "inspect", d)
    assert rc == 2
    assert err.strip() == _error_line(err)


def test_load_model_delegates_corrupt_factorlm_dirs(saved, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    _truncate(d / "model.safetensors", 0.9)
    with pytest.raises(FormatError, match="truncated"):
        factorlm.load_model(str(d))


def test_intact_model_loads(saved, capsys):
    model = factorlm.load(saved)
    assert isinstance(model.model.layers[0].self_attn.q_proj, factorlm.LowRankLinear)
    capsys.readouterr()
    assert main(["inspect", str(saved)]) == 0
    out = capsys.readouterr().out
    assert f"{Q} " in out and "lowrank" in out


def test_load_missing_paths(tmp_path):
    with pytest.raises(FormatError, match="no such directory"):
        factorlm.load(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(FormatError, match="not a directory"):
        factorlm.load(tmp_path / "f")
    with pytest.raises(ConfigError, match="dtype"):
        factorlm.load(tmp_path, dtype="float7")


def test_output_exists_error_is_typed(files, tiny):
    model, tok = tiny
    with pytest.raises(OutputExistsError, match="nonempty"):
        factorlm.save(model, files / "nonempty")
    assert isinstance(OutputExistsError("x"), FileExistsError)


def test_model_load_error_is_typed(files):
    with pytest.raises(ModelLoadError):
        factorlm.load_model(str(files / "a_file"))


def _rss_file() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


def test_replaced_weights_of_a_mapped_checkpoint_leave_memory(tmp_path):
    """A replaced weight memory-mapped from a file: its clean pages are handed back (its content
    stays readable), a page written since loading keeps its value, an aliased weight is kept."""
    from factorlm.arch.modules import replace_module

    n = 16 * 2**20  # 64 MiB of float32
    path = tmp_path / "weights.bin"
    torch.arange(n, dtype=torch.float32).numpy().tofile(path)

    def mapped_linear() -> torch.nn.Linear:
        lin = torch.nn.Linear(1, 1)
        t = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
        lin.weight = torch.nn.Parameter(t.view(-1, 1024), requires_grad=False)
        return lin

    root = torch.nn.Sequential(mapped_linear())
    w = root[0].weight  # the weight itself (not an alias): factorlm reads it before replacing
    assert float(w.sum()) != 0  # fault every page in
    alias = w.detach()  # someone still reads the dense weight (distillation does)
    before = _rss_file()
    replace_module(root, "0", torch.nn.Identity())
    assert before - _rss_file() < 2**20  # kept: an alias shares its storage
    assert float(alias.sum()) != 0
    del alias, w

    root[0] = mapped_linear()
    w = root[0].weight
    w[100, 0] = -7.0  # copy-on-write: this page now differs from the file
    assert float(w.sum()) != 0
    before = _rss_file()
    replace_module(root, "0", torch.nn.Identity())
    assert before - _rss_file() >= 0.9 * n * 4
    assert float(w[100, 0]) == -7.0  # the written page was not dropped
    assert torch.equal(w[0, :5], torch.arange(5, dtype=torch.float32))  # re-read from the file

    anon = torch.nn.Linear(1024, 1024)
    root[0] = anon
    w = anon.weight.detach().clone()
    replace_module(root, "0", torch.nn.Identity())  # not a file mapping: untouched
    assert torch.equal(anon.weight, w)


def test_clean_pages_of_a_weight_in_use_leave_memory_but_written_pages_stay(tmp_path):
    """The NaN check reads every weight: the pages still equal to the file are handed back (they
    fault in again on the next read), a page written since (copy-on-write) keeps its new value."""
    from factorlm.pages import release_clean_pages
    from factorlm.preflight import check_finite_weights

    n = 16 * 2**20  # 64 MiB of float32
    path = tmp_path / "weights.bin"
    torch.arange(n, dtype=torch.float32).numpy().tofile(path)
    t = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
    t[1024 * 100] = -7.0  # one page now differs from the file
    model = torch.nn.Linear(1, 1)
    model.weight = torch.nn.Parameter(t.view(-1, 1024), requires_grad=False)
    before = _rss_file()
    check_finite_weights(model)  # reads (faults in) everything, then releases the clean pages
    assert before - _rss_file() >= -4 * 2**20  # not the whole 64 MiB left resident
    assert float(t[1024 * 100]) == -7.0  # the written page was not dropped
    assert torch.equal(t[:5], torch.arange(5, dtype=torch.float32))
    assert float(t.sum()) > 0  # everything in again
    assert release_clean_pages([t]) >= n * 4 - 3 * 4096  # all but the written (and edge) pages
    assert float(t[1024 * 100]) == -7.0
    anon = torch.ones(2**20)
    assert release_clean_pages([anon]) == 0
