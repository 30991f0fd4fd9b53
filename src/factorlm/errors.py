"""Typed errors. Every user-facing failure is one of these, with a message naming the problem."""

from __future__ import annotations


class FactorLMError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits non-zero, without a traceback."""


class ConfigError(FactorLMError, ValueError):
    """Invalid option: unknown method, ratio out of range, rank too large, ..."""


class ModelLoadError(FactorLMError):
    """A model path / hub id / GGUF file that cannot be loaded."""


class CalibrationError(FactorLMError, ValueError):
    """Calibration source missing, empty, too short, or malformed."""


class NumericalError(FactorLMError, ArithmeticError):
    """NaN/Inf in weights, activations or statistics (the message names the layer)."""


class FormatError(FactorLMError):
    """A saved directory that is corrupt, truncated, foreign or from a newer format version."""


class OutputExistsError(FactorLMError, FileExistsError):
    """The output directory exists and is not empty (pass overwrite=True / --overwrite)."""


class EvaluationError(FactorLMError):
    """Evaluation failed: non-finite perplexity window, unknown task, dataset unavailable offline..."""
