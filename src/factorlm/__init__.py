"""factorlm: post-training low-rank compression of causal language models.

>>> import factorlm
>>> model, tok = factorlm.default_model()
>>> report = factorlm.compress(model, method="modular", ratio=0.2, tokenizer=tok)
>>> factorlm.save(model, "out", tokenizer=tok, report=report)
>>> model2 = factorlm.load("out")
"""

from __future__ import annotations

__version__ = "0.1.0"

from factorlm.api import compress
from factorlm.errors import (
    CalibrationError,
    ConfigError,
    EvaluationError,
    FactorLMError,
    FormatError,
    ModelLoadError,
    NumericalError,
    OutputExistsError,
)
from factorlm.io.loading import load
from factorlm.io.save import save
from factorlm.methods import MethodConfig, make_config, register
from factorlm.nn.lowrank import LowRankLinear
from factorlm.report.schema import Report
from factorlm.run_options import RunOptions


def load_model(source: str, dtype=None, device=None, trust_remote_code: bool = False):
    """(model, tokenizer) from a local directory, a hub id, a .gguf file or "smollm2-135m"."""
    from factorlm.io.hub import load_model as _load_model

    return _load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def default_model(dtype=None, device=None):
    """The embedded SmolLM2-135M-Instruct (converted once from its GGUF into a safetensors cache)."""
    from factorlm.io.default_model import default_model as _default_model

    return _default_model(dtype=dtype, device=device)


def evaluate(model, tokenizer, **kwargs):
    """Perplexity / zero-shot / speed: see :func:`factorlm.eval.api.evaluate`."""
    from factorlm.eval.api import evaluate as _evaluate

    return _evaluate(model, tokenizer, **kwargs)


def export(model_or_dir, out, format: str = "hf", **kwargs):
    """Write the plain architecture (``format="hf"``) or a GGUF for llama.cpp (``"gguf"``)."""
    from factorlm.io.export import export as _export

    return _export(model_or_dir, out, format=format, **kwargs)


def quantize(model, scheme: str = "int8", group_size: int | None = None) -> int:
    """Weight-only int8 / int4 quantization of the decoder blocks' linears and factors, in place."""
    from factorlm.quantization import quantize as _quantize

    return _quantize(model, scheme, group_size)


def densify(model):
    """Turn a compressed model back into the plain dense architecture (in a new model)."""
    from factorlm.io.densify import densify as _densify

    return _densify(model)


__all__ = [
    "CalibrationError",
    "ConfigError",
    "EvaluationError",
    "FactorLMError",
    "FormatError",
    "LowRankLinear",
    "MethodConfig",
    "ModelLoadError",
    "NumericalError",
    "OutputExistsError",
    "Report",
    "RunOptions",
    "compress",
    "default_model",
    "densify",
    "evaluate",
    "export",
    "load",
    "load_model",
    "quantize",
    "make_config",
    "register",
    "save",
]
