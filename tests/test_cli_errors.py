"""The command line refuses every bad compress input with one error line, before the model is
loaded (moved from test_reliability.py)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers_input import _JSONISH, _OPTION_KEYS, FAST, _base, _cli, _error_line

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
