"""The Python API: ``compress``, ``save``, ``load``, ``load_model``, ``evaluate``."""

from __future__ import annotations

import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from factorlm import distributed
from factorlm.arch.modules import (
    count_params,
    get_spec,
    model_targets,
    target_params,
    unfuse_experts,
)
from factorlm.arch.registry import ArchSpec
from factorlm.calibration.data import CalibrationSet, build_calibration
from factorlm.calibration.pipeline import Streams, capture_block_inputs, run_pipeline
from factorlm.errors import CalibrationError, ConfigError
from factorlm.methods.base import BUILDER_OPTIONS, BUILDERS, available_methods
from factorlm.pages import trim_heap
from factorlm.preflight import check_finite_weights, check_option_values
from factorlm.rank.allocation import check_ratio
from factorlm.report.schema import Report
from factorlm.utils import measure_peak_rss, peak_device_bytes, reset_device_peak

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "global", "bottom-first", "loss")
LOSS_AWARE_METHODS = ("modular", "distill")  # distill with init="modular"


@dataclass
class CompressionPlan:
    """Everything a method builder may use to set up its block compressor."""

    model: nn.Module
    spec: ArchSpec
    method: str
    ratio: float
    allocation: str
    options: dict[str, Any]
    calibration: CalibrationSet
    device: Any
    offload: Any
    report: Report
    rank_multiple: int = 8
    sequential: bool = True
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def capture(self) -> Streams:
        """Inputs of the first block for this process's calibration batches (all when single)."""
        batches = distributed.shard(self.calibration.batches)
        return capture_block_inputs(self.model, self.spec, batches, self.device, self.offload)

    def probe(self, compressor, desc: str = "probe") -> None:
        """Run a non-sequential pass (e.g. to collect spectra) with a compressor that changes nothing."""
        run_pipeline(
            self.model,
            self.spec,
            self.capture(),
            compressor,
            Report(self.method, self.ratio),
            self.device,
            self.offload,
            sequential=False,
            progress=self.progress,
            desc=desc,
            autocast=self.extra.get("calib_autocast"),
        )


def environment() -> dict[str, Any]:
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": " ".join(sys.argv),
        "world_size": distributed.world_size(),
    }


def validate(method: str, ratio: float, allocation: str, options: dict[str, Any]) -> None:
    """Cheap checks of every option, before any heavy work."""
    check_ratio(ratio)
    if method not in BUILDERS:
        raise ConfigError(
            f"unknown method {method!r}; choose one of: {', '.join(available_methods())}"
        )
    if allocation not in ALLOCATIONS:
        raise ConfigError(
            f"unknown allocation {allocation!r}; choose one of: {', '.join(ALLOCATIONS)}"
        )
    if allocation == "loss" and method not in LOSS_AWARE_METHODS:
        raise ConfigError(
            f"allocation 'loss' is implemented by {', '.join(LOSS_AWARE_METHODS)} (not {method!r})"
        )
    unknown = sorted(set(options) - set(BUILDER_OPTIONS[method]))
    if unknown:
        allowed = ", ".join(BUILDER_OPTIONS[method]) or "none"
        raise ConfigError(
            f"method {method!r} has no option {', '.join(map(repr, unknown))} (options: {allowed})"
        )
    check_option_values(method, options)


def check_fixed_rank(rank: int, targets: dict[str, nn.Module]) -> None:
    from factorlm.arch.modules import linear_shape

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    for name, mod in targets.items():
        m, n = linear_shape(mod)
        if rank > min(m, n):
            raise ConfigError(
                f"rank {rank} is larger than layer {name} allows ({m}x{n}: at most {min(m, n)})"
            )


def _autocast_dtype(calib_dtype, weight_dtype: torch.dtype) -> torch.dtype | None:
    if calib_dtype is None:
        return None
    dt = getattr(torch, calib_dtype, None) if isinstance(calib_dtype, str) else calib_dtype
    if dt not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"calib_dtype must be bfloat16, float16 or float32, got {calib_dtype!r}")
    return None if dt == weight_dtype else dt


@measure_peak_rss
def compress(
    model: nn.Module,
    method: str = "svd-llm",
    ratio: float = 0.2,
    calibration: Any = None,
    tokenizer=None,
    *,
    allocation: str = "uniform",
    n_samples: int = 64,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    sequential: bool = True,
    rank_multiple: int = 8,
    device: Any = None,
    offload: Any = "cpu",
    progress: bool = True,
    workdir: str | None = None,
    resume: bool = False,
    rank: int | None = None,
    calib_dtype: torch.dtype | str | None = None,
    one_pass: bool = True,
    **options: Any,
) -> Report:
    """Compress ``model`` in place and return a :class:`Report`.

    ``ratio`` is the fraction of the targeted linear parameters removed (every linear inside the
    decoder blocks). ``calibration``: list of strings, a text/JSONL file or folder, a HF dataset
    name, token batches, or None for the bundled English sample. Method options are keyword
    arguments (``alpha``, ``variant``, ``k1_share``, ...). With ``workdir`` a checkpoint is written
    after each block; ``resume=True`` continues from it. ``rank`` fixes one rank for every matrix
    (instead of deriving ranks from ``ratio``). ``calib_dtype="bfloat16"`` runs the calibration
    forward passes' matmuls in bf16 (autocast; ~2x faster on CPUs with bf16 units) while statistics
    still accumulate in float64 and the factorizations use the original weights.
    ``one_pass`` (default): methods that factorize each linear on its own statistics (svd, fwsvd,
    asvd, svd-llm, nsvd with uniform or precomputed ranks) run the calibration tokens through each
    block once, compressing each linear as soon as every token has reached it (later linears see
    the compressed earlier ones); ``one_pass=False`` runs two passes per block (statistics of the
    dense block, then its compressed outputs). Architectures that route tokens (MoE) always take
    two passes.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the processes share the work (see
    :mod:`factorlm.distributed`) and all end with the same model; save it from rank 0 only
    (``if factorlm.distributed.is_main(): factorlm.save(...)``).
    """
    import factorlm.methods  # noqa: F401  (registers builders)

    validate(method, ratio, allocation, options)
    check_finite_weights(model)
    t0 = time.perf_counter()
    device = distributed.resolve_device(device)  # "cuda" under torchrun: cuda:LOCAL_RANK
    # under torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA
    distributed.init_from_env(device if device is not None else next(model.parameters()).device)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    progress = progress and distributed.is_main()
    reset_device_peak(device)
    spec = get_spec(model)
    unfuse_experts(model, spec)
    targets = model_targets(model, spec)
    if not targets:
        raise ConfigError(f"no linear layers to compress were found in {spec.blocks}")
    if rank is not None:
        if "fixed_rank" not in BUILDER_OPTIONS[method]:
            raise ConfigError(f"a fixed rank is not supported by method {method!r}")
        check_fixed_rank(rank, targets)
        options["fixed_rank"] = rank
    del targets  # holding the original linears would keep every replaced weight on the device
    report = Report(
        method=method,
        ratio=float(ratio),
        allocation=allocation,
        options=dict(options),
        model_type=getattr(model.config, "model_type", None),
        model_name=getattr(model.config, "_name_or_path", None) or None,
        params_targeted_before=target_params(model, spec),
        params_total_before=count_params(model),
        environment=environment(),
    )
    calib = build_calibration(
        calibration, tokenizer, n_samples=n_samples, seqlen=seqlen, seed=seed, batch_size=batch_size
    )
    report.calibration = dict(calib.summary)
    trim_heap()  # what loading and tokenizing freed leaves the process before the peak
    vocab = (
        model.get_input_embeddings().num_embeddings
        if model.get_input_embeddings() is not None
        else None
    )
    top = max(int(b.max()) for b in calib.batches)
    if vocab is not None and (top >= vocab or min(int(b.min()) for b in calib.batches) < 0):
        raise CalibrationError(
            f"calibration token id {top} is outside the model's vocabulary (size {vocab}): wrong tokenizer for this model?"
        )
    was_training = model.training
    model.eval()
    calib_autocast = _autocast_dtype(calib_dtype, next(model.parameters()).dtype)
    plan = CompressionPlan(
        model,
        spec,
        method,
        float(ratio),
        allocation,
        dict(options),
        calib,
        device,
        offload,
        report,
        rank_multiple,
        sequential,
        progress,
    )
    plan.extra["calib_autocast"] = calib_autocast
    if calib_autocast is not None:
        report.calibration["autocast"] = str(calib_autocast).replace("torch.", "")
    compressor = BUILDERS[method](plan)
    streams = plan.capture()
    capture_peak = peak_device_bytes(device)
    checkpoint = None
    start = 0
    if workdir is not None:
        from factorlm.io.checkpoint import Checkpointer

        run_id = {
            "method": method,
            "ratio": ratio,
            "allocation": allocation,
            "options": options,
            "calibration": calib.summary,
            "model": report.model_name,
            "params": report.params_total_before,
            "sequential": sequential,
            "multiple": rank_multiple,
            "calib_dtype": str(calib_autocast),
            "one_pass": one_pass,
        }
        if distributed.is_dist():  # each process checkpoints its own shard of the activations
            run_id["world_size"] = distributed.world_size()
            workdir = f"{workdir}/rank{distributed.rank()}"
        ck = Checkpointer(workdir, run_id)
        if resume:
            start, streams = ck.restore(model, spec, streams, report)

        def checkpoint(i, s):
            ck.save(i, model, spec, s, report)

    run_pipeline(
        model,
        spec,
        streams,
        compressor,
        report,
        device,
        offload,
        sequential,
        progress,
        checkpoint,
        start,
        desc=method,
        autocast=calib_autocast,
        one_pass=one_pass,
    )
    finish = getattr(compressor, "finish", None)
    if finish is not None:
        finish(plan)
    model.train(was_training)
    report.params_targeted_after = target_params(model, spec)
    report.params_total_after = count_params(model)
    report.achieved_ratio = 1 - report.params_targeted_after / report.params_targeted_before
    report.wall_seconds = time.perf_counter() - t0
    peaks = [capture_peak, peak_device_bytes(device)] + [b.peak_device_bytes for b in report.blocks]
    peaks = [p for p in peaks if p is not None]  # the pipeline resets the peak at each block
    report.peak_device_bytes = max(peaks) if peaks else None
    model.config.__dict__["factorlm"] = {"method": method, "ratio": float(ratio)}
    log.info(
        "%s: removed %.2f%% of targeted parameters in %.1f s",
        method,
        100 * report.achieved_ratio,
        report.wall_seconds,
    )
    return report
