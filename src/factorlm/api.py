"""The Python API: ``compress``, ``save``, ``load``, ``load_model``, ``evaluate``."""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from factorlm import distributed
from factorlm.arch.modules import (
    count_params,
    get_spec,
    linear_shape,
    model_targets,
    target_params,
    unfuse_experts,
)
from factorlm.arch.registry import ArchSpec
from factorlm.calibration.data import CalibrationSet, build_calibration
from factorlm.calibration.pipeline import Streams, capture_block_inputs, run_pipeline
from factorlm.defaults import DEFAULT_METHOD
from factorlm.errors import CalibrationError, ConfigError
from factorlm.io import format as fmt
from factorlm.methods.base import get_method, make_config
from factorlm.methods.config import MethodConfig
from factorlm.pages import trim_heap
from factorlm.preflight import check_finite_weights
from factorlm.rank.allocation import estimated_time_ratio, kernel_rank, rank_policy
from factorlm.report.schema import Report
from factorlm.run_options import RunOptions
from factorlm.utils import measure_peak_rss, peak_device_bytes, reset_device_peak

log = logging.getLogger(__name__)


@dataclass
class CompressionPlan:
    """Everything a method's builder may use to set up its block compressor."""

    model: nn.Module
    spec: ArchSpec
    config: MethodConfig
    run: RunOptions
    calibration: CalibrationSet
    device: Any
    report: Report
    progress: bool = True  # run.progress, on the main process only
    autocast: torch.dtype | None = None  # of the calibration forward passes

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def ratio(self) -> float:
        return self.config.ratio

    @property
    def allocation(self) -> str:
        return self.config.allocation

    @property
    def rank_multiple(self) -> int:
        """The run's ``rank_multiple``, or the compute device's kernel tile width when unset."""
        if self.run.rank_multiple is not None:
            return self.run.rank_multiple
        return rank_policy(self.device).multiple

    @property
    def sequential(self) -> bool:
        return self.run.sequential

    @property
    def offload(self) -> Any:
        return self.run.offload

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
            autocast=self.autocast,
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


def _autocast_dtype(
    calib_dtype: torch.dtype | None, weight_dtype: torch.dtype
) -> torch.dtype | None:
    return None if calib_dtype is None or calib_dtype == weight_dtype else calib_dtype


_RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunOptions))


def _arguments(
    config: MethodConfig | str | None, positional: tuple, run: RunOptions | None, kwargs: dict
) -> tuple[MethodConfig, Any, Any, RunOptions]:
    """(config, calibration, tokenizer, run) from either call form of :func:`compress`."""
    if isinstance(config, str):  # compress(model, "svd", 0.3, calib, tok, ...): the method's name
        if "method" in kwargs:
            raise ConfigError("method given twice (positionally and as method=)")
        kwargs["method"], config = config, None
    names = (
        ("calibration", "tokenizer")
        if config is not None
        else ("ratio", "calibration", "tokenizer")
    )
    if len(positional) > len(names):
        raise ConfigError(
            f"compress takes at most {len(names) + 2} positional arguments "
            f"(model, {'config' if config is not None else 'method'}, {', '.join(names)})"
        )
    for name, value in zip(names, positional, strict=False):
        if name in kwargs:
            raise ConfigError(f"{name} given twice")
        kwargs[name] = value
    calibration = kwargs.pop("calibration", None)
    tokenizer = kwargs.pop("tokenizer", None)
    run_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _RUN_FIELDS}
    if run is None:
        run = RunOptions(**run_kwargs)
    elif run_kwargs:
        raise ConfigError(
            f"pass {', '.join(sorted(run_kwargs))} inside run= (a RunOptions), not beside it"
        )
    elif not isinstance(run, RunOptions):
        raise ConfigError(f"run must be a factorlm.RunOptions, got {type(run).__name__}")
    if config is None:
        method = kwargs.pop("method", DEFAULT_METHOD)
        if not isinstance(method, str):
            raise ConfigError(f"method must be a method's name, got {method!r}")
        config = make_config(
            method,
            ratio=kwargs.pop("ratio", 0.2),
            allocation=kwargs.pop("allocation", None),
            rank=kwargs.pop("rank", None),
            **kwargs,
        )
    elif not isinstance(config, MethodConfig):
        raise ConfigError(f"config must be a method config or a method name, got {config!r}")
    elif kwargs:
        raise ConfigError(
            f"{', '.join(sorted(kwargs))}: with a config, the method's settings are the config's "
            "fields (dataclasses.replace(config, ...))"
        )
    return config, calibration, tokenizer, run


def _warn_if_slower(model, spec, before, policy, device, report: Report) -> None:
    """A warning when the compressed linears would decode no faster than the dense ones."""
    from factorlm.arch.modules import get_blocks
    from factorlm.nn.lowrank import LowRankLinear

    after = {}
    for name, m in model_targets(model, spec).items():
        out_f, in_f = linear_shape(m)
        after[name] = (out_f, in_f, m.rank if isinstance(m, LowRankLinear) else None)
    groups = [
        [f"{spec.blocks}.{i}.{rel}" for rel in pats]
        for i in range(len(get_blocks(model, spec)))
        for pats in spec.shared_inputs
    ]
    est = estimated_time_ratio(before, after, policy, groups)
    slow = [
        k
        for k, (m, n, r) in after.items()
        if r is not None and kernel_rank(m, n, r, policy) is None
    ]
    if est < 1 and not slow:
        return
    kind = torch.device(device).type
    msg = (
        f"on {kind} the compressed linears are estimated to decode at {1 / est:.2f}x the dense "
        f"speed (batch 1, stacked q/k/v and gate/up)"
    )
    if slow:
        msg += f"; {len(slow)} factorizations save less than a kernel launch (e.g. {slow[0]})"
    if est >= 1:
        msg += ": slower than dense, pick a higher ratio (or a structured method) for speed"
    log.warning(msg)
    report.warnings.append(msg)


def compress(
    model: nn.Module,
    config: MethodConfig | str | None = None,
    *args: Any,
    run: RunOptions | None = None,
    **kwargs: Any,
) -> Report:
    """Compress ``model`` in place and return a :class:`Report`.

    Two call forms::

        compress(model, config, calibration=None, tokenizer=None, run=RunOptions(...))
        compress(model, method="modular", ratio=0.2, calibration=None, tokenizer=None,
                 allocation=None, rank=None, <run options>, <method options>)

    The first is the core: ``config`` is a method's config (``factorlm.make_config("asvd",
    ratio=0.3, alpha=0.5)`` or its dataclass), ``run`` the pipeline settings. The second builds
    both from keywords (``compress(model, "svd", 0.3, calib, tok)`` positionally): the method's
    options are keywords (``alpha``, ``variant``, ``k1_share``, ``a``, ``init``, ...), every value
    is checked before any heavy work.

    ``ratio`` is the fraction of the targeted linear parameters removed (every linear inside the
    decoder blocks). ``calibration``: list of strings, a text/JSONL file or folder, a HF dataset
    name, token batches, or None for the bundled English sample. ``rank`` fixes one rank for every
    matrix (instead of deriving ranks from ``ratio``). Run options (:class:`RunOptions`):
    ``n_samples``, ``seqlen``, ``seed``, ``batch_size``, ``sequential``, ``rank_multiple`` (ranks
    are rounded down to it; default: the compute device's kernel tile width, 8 on CPU, 64 on
    CUDA), ``device``, ``offload``, ``progress``; with ``workdir`` a checkpoint is written after each
    block and ``resume=True`` continues from it. ``calib_dtype="bfloat16"`` runs the calibration
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
    config, calibration, tokenizer, run = _arguments(config, args, run, kwargs)
    return _compress(model, config, calibration, tokenizer, run)


@measure_peak_rss
def _compress(
    model: nn.Module, config: MethodConfig, calibration: Any, tokenizer: Any, run: RunOptions
) -> Report:
    method, ratio, allocation, rank = config.method, config.ratio, config.allocation, config.rank
    device, offload = run.device, run.offload
    entry = get_method(method)
    check_finite_weights(model)
    t0 = time.perf_counter()
    device = distributed.resolve_device(device)  # "cuda" under torchrun: cuda:LOCAL_RANK
    # under torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA
    distributed.init_from_env(device if device is not None else next(model.parameters()).device)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    progress = run.progress and distributed.is_main()
    reset_device_peak(device)
    spec = get_spec(model)
    unfuse_experts(model, spec)
    targets = model_targets(model, spec)
    if not targets:
        raise ConfigError(f"no linear layers to compress were found in {spec.blocks}")
    if rank is not None:
        check_fixed_rank(rank, targets)
    shapes_before = {name: linear_shape(m) for name, m in targets.items()}
    del targets  # holding the original linears would keep every replaced weight on the device
    report = Report(
        method=method,
        ratio=float(ratio),
        allocation=allocation,
        options=config.changed_options(),
        config=config.to_dict(),
        run=run.recipe(),
        model_type=getattr(model.config, "model_type", None),
        model_name=getattr(model.config, "_name_or_path", None) or None,
        params_targeted_before=target_params(model, spec),
        params_total_before=count_params(model),
        environment=environment(),
    )
    calib = build_calibration(
        calibration,
        tokenizer,
        n_samples=run.n_samples,
        seqlen=run.seqlen,
        seed=run.seed,
        batch_size=run.batch_size,
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
    calib_autocast = _autocast_dtype(run.calib_dtype, next(model.parameters()).dtype)
    plan = CompressionPlan(
        model, spec, config, run, calib, device, report, progress=progress, autocast=calib_autocast
    )
    if calib_autocast is not None:
        report.calibration["autocast"] = fmt.dtype_name(calib_autocast)
    compressor = entry.builder()(plan)
    streams = plan.capture()
    capture_peak = peak_device_bytes(device)
    checkpoint = None
    start = 0
    workdir = run.workdir
    if workdir is not None:
        from factorlm.io.checkpoint import Checkpointer

        run_id = {
            "method": method,
            "ratio": ratio,
            "allocation": allocation,
            "options": config.to_dict()["options"],
            "calibration": calib.summary,
            "model": report.model_name,
            "params": report.params_total_before,
            "sequential": run.sequential,
            "multiple": plan.rank_multiple,
            "calib_dtype": str(calib_autocast),
            "one_pass": run.one_pass,
        }
        if distributed.is_dist():  # each process checkpoints its own shard of the activations
            run_id["world_size"] = distributed.world_size()
            workdir = f"{workdir}/rank{distributed.rank()}"
        ck = Checkpointer(workdir, run_id)
        if run.resume:
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
        run.sequential,
        progress,
        checkpoint,
        start,
        desc=method,
        autocast=calib_autocast,
        one_pass=run.one_pass,
    )
    finish = getattr(compressor, "finish", None)
    if finish is not None:
        finish(plan, streams)
    model.train(was_training)
    report.params_targeted_after = target_params(model, spec)
    report.params_total_after = count_params(model)
    report.achieved_ratio = 1 - report.params_targeted_after / report.params_targeted_before
    report.wall_seconds = time.perf_counter() - t0
    peaks = [capture_peak, peak_device_bytes(device)] + [b.peak_device_bytes for b in report.blocks]
    peaks = [p for p in peaks if p is not None]  # the pipeline resets the peak at each block
    report.peak_device_bytes = max(peaks) if peaks else None
    _warn_if_slower(model, spec, shapes_before, rank_policy(device), device, report)
    fmt.attach(model.config, {"method": method, "ratio": float(ratio)})
    log.info(
        "%s: removed %.2f%% of targeted parameters in %.1f s",
        method,
        100 * report.achieved_ratio,
        report.wall_seconds,
    )
    return report
