"""Cheap checks before the heavy work (factorlm.preflight): option values, NaN/Inf in weights,
activations and statistics named by layer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import factorlm
from factorlm.errors import ConfigError, NumericalError
from factorlm.methods import make_config
from helpers_input import _JSONISH, _OPTION_KEYS, FAST, _base, _cli, _error_line

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
