"""A cheap estimate of a compression run's peak memory, checked before the model is loaded.

The model stays in host memory (memory-mapped when it comes from safetensors) and only the block
being compressed visits the compute device, so the two memories hold different things:

* **device**: one block's weights (at the run's dtype) + its statistics and decompositions
  (float64 Gram matrices of its inputs, float64 copies of its weights, the factors) + one batch's
  activations (the block's input and output, the forward intermediates); while the first block's
  inputs are captured, what runs before it (embeddings) is on the device instead of the
  statistics;
* **host**: the model + the calibration activations kept between blocks (``n_samples x seqlen x
  hidden`` floats, three streams: inputs, dense outputs, compressed outputs; four with a teacher
  stream).

distill's end-to-end stage (``e2e_epochs > 0``) is the exception: it trains every block at once,
so the device then holds the whole compressed model, the trainable factors' gradients and one
micro-batch's activations through every block and the LM head's logits; the optimizer's state
(fp32 master copies of fp16 / bf16 weights and two AdamW moments) is on the device too, or on the
host when offloaded (``e2e_offload``: "auto" offloads it when it does not fit the device), and
under torchrun each process holds its share of it only; the host keeps a copy of the block pass's
weights (restored when the stage fails or does not help).

``modular``'s ``compensate`` also keeps one block's MLP inputs of every calibration token, where
they fit in a quarter of the free memory (else it runs one more forward per block instead:
:func:`factorlm.methods.modular_pass.can_keep`), so the estimate leaves them out.

On the CPU both are host memory. The estimate is rough on purpose: the check only refuses runs
that clearly do not fit (``--no-memory-check`` skips it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from factorlm import distributed
from factorlm.errors import FactorLMError

log = logging.getLogger(__name__)

GiB = 2**30


class InsufficientMemoryError(FactorLMError, MemoryError):
    """The estimated peak memory of the run exceeds the memory available."""


@dataclass
class MemoryEstimate:
    model_bytes: int  # the whole model at the run's dtype (host)
    block_bytes: int  # the largest block's weights at the run's dtype
    stats_bytes: int  # one block's float64 statistics and decompositions
    stream_bytes: int  # calibration activations kept between blocks (host)
    batch_bytes: int  # one batch through one block: input, output, intermediates
    outside_bytes: int = 0  # weights outside the blocks (embeddings...), on the device at capture
    # modular's loss_metric: the gradient Gram of every sub-layer output (float32, host, whole run)
    metric_bytes: int = 0
    # distill's end-to-end stage (0: none): the compressed model's weights on the device, what
    # training adds there (gradients, activations, logits), the optimizer's state (fp32 masters,
    # AdamW moments: on the device, or on the host when offloaded), the host copy
    e2e_weights_bytes: int = 0
    e2e_train_bytes: int = 0
    e2e_state_bytes: int = 0
    e2e_host_state_bytes: int = 0  # the same state offloaded (fp32 masters of every weight)
    e2e_copy_bytes: int = 0
    # where the optimizer's state goes on a GPU: "off" (the device), "on" (the host), "auto"
    # (check_memory picks the device when it fits there)
    e2e_offload: str = "off"

    def _blockwise_device(self) -> int:
        capture = self.outside_bytes + self.block_bytes + self.batch_bytes
        return max(capture, self.block_bytes + self.stats_bytes + self.batch_bytes)

    @property
    def _offloaded(self) -> bool:
        return self.e2e_offload == "on"

    def _e2e_device(self) -> int:
        if not self.e2e_train_bytes:
            return 0
        state = 0 if self._offloaded else self.e2e_state_bytes
        return self.e2e_weights_bytes + self.e2e_train_bytes + state

    def _e2e_binds(self, on_gpu: bool) -> bool:
        if not self.e2e_train_bytes:
            return False
        if on_gpu:
            return self._e2e_device() > self._blockwise_device()
        work = self.e2e_train_bytes + self.e2e_state_bytes + self.e2e_copy_bytes
        return work > self.stats_bytes + self.batch_bytes

    def device_bytes(self) -> int:
        """Peak on a compute device that is not the host: one block at a time, or the whole
        compressed model while the end-to-end stage trains."""
        return max(self._blockwise_device(), self._e2e_device())

    def host_bytes(self, on_gpu: bool) -> int:
        if on_gpu:
            state = self.e2e_host_state_bytes if self._offloaded else 0
            held = self.model_bytes + self.stream_bytes + self.metric_bytes
            return held + self.e2e_copy_bytes + state
        return self.total

    @property
    def total(self) -> int:
        """Everything in one memory (a CPU run): the block's weights are part of the model."""
        state = self.e2e_host_state_bytes if self._offloaded else self.e2e_state_bytes
        e2e = self.e2e_train_bytes + state + self.e2e_copy_bytes
        work = max(self.stats_bytes + self.batch_bytes, e2e)
        return self.model_bytes + self.stream_bytes + self.metric_bytes + work

    def describe(self, on_gpu: bool = False) -> str:
        text = self._describe(on_gpu)
        if self.metric_bytes:
            text += f"; loss_metric's gradient Grams {self.metric_bytes / GiB:.2f} GiB (host)"
        return text

    def _describe(self, on_gpu: bool) -> str:
        if self._e2e_binds(on_gpu):
            where = "device" if on_gpu else "memory"
            offloaded = on_gpu and self._offloaded
            size = self.e2e_host_state_bytes if offloaded else self.e2e_state_bytes
            state = f"optimizer state (fp32 masters, AdamW moments) {size / GiB:.2f} GiB"
            return (
                f"{where}: distill's end-to-end stage trains the whole compressed model at once: "
                f"its weights {self.e2e_weights_bytes / GiB:.2f} GiB + gradients and one "
                f"micro-batch's activations {self.e2e_train_bytes / GiB:.2f} GiB"
                + ("" if offloaded else f" + {state}")
                + f"; host: model {self.model_bytes / GiB:.2f} GiB + calibration activations "
                f"{self.stream_bytes / GiB:.2f} GiB + the block pass's weights "
                f"{self.e2e_copy_bytes / GiB:.2f} GiB"
                + (f" + {state} (offloaded)" if offloaded else "")
                + " (e2e_epochs=0 skips the stage, e2e_micro_batch=1 needs the least"
                + (
                    ", e2e_offload=auto moves the optimizer state to the host"
                    if on_gpu and not offloaded
                    else ""
                )
                + ")"
            )
        if on_gpu:
            return (
                f"device: one block {self.block_bytes / GiB:.2f} GiB + its statistics "
                f"{self.stats_bytes / GiB:.2f} GiB + one batch {self.batch_bytes / GiB:.2f} GiB; "
                f"host: model {self.model_bytes / GiB:.2f} GiB + calibration activations "
                f"{self.stream_bytes / GiB:.2f} GiB"
            )
        return (
            f"model {self.model_bytes / GiB:.2f} GiB + one block's statistics "
            f"{self.stats_bytes / GiB:.2f} GiB + calibration activations "
            f"{(self.stream_bytes + self.batch_bytes) / GiB:.2f} GiB"
        )


def estimate(
    n_params: int,
    block_params: int,
    hidden: int,
    max_in: int,
    n_samples: int,
    seqlen: int,
    dtype_bytes: int = 4,
    batch_size: int = 8,
    intermediate: int | None = None,
    n_heads: int = 1,
    teacher: bool = False,
    outside_params: int = 0,
    e2e: EndToEndPlan | None = None,
    metric_grams: int = 0,
) -> MemoryEstimate:
    """Peak memory estimate of a compression run (bytes); ``metric_grams``: how many
    hidden x hidden gradient Grams ``loss_metric`` keeps (two per block)."""
    # float64: W, the whitened W, U and Vh (each at most the size of W), plus Gram + Cholesky factor
    # of the widest input (computed once per distinct input, at most a handful per block).
    stats = block_params * 8 * 4 + 4 * max_in * max_in * 8
    streams = 4 if teacher else 3
    stream = n_samples * seqlen * hidden * 4 * streams
    batch = _through_a_block(min(batch_size, n_samples), seqlen, hidden, intermediate, n_heads)
    est = MemoryEstimate(
        model_bytes=n_params * dtype_bytes,
        block_bytes=block_params * dtype_bytes,
        stats_bytes=stats,
        stream_bytes=stream,
        batch_bytes=batch,
        outside_bytes=outside_params * dtype_bytes,
        metric_bytes=metric_grams * hidden * hidden * 4,
    )
    if e2e is None:
        return est
    # the trainable weights: what the blocks keep (the targeted linears are nearly all of them)
    kept = int((n_params - outside_params) * (1.0 - e2e.ratio))
    acts = end_to_end_activation_bytes(
        e2e.n_blocks,
        min(e2e.micro_batch, n_samples),
        seqlen,
        hidden,
        e2e.vocab,
        intermediate,
        n_heads,
    )
    return dataclasses.replace(
        est,
        e2e_weights_bytes=(kept + outside_params) * dtype_bytes,
        e2e_train_bytes=kept * dtype_bytes + acts,  # the gradients, activations and logits
        e2e_state_bytes=-(-kept * optimizer_state_bytes(dtype_bytes) // e2e.shards),
        e2e_host_state_bytes=-(-kept * optimizer_state_bytes(dtype_bytes, True) // e2e.shards),
        e2e_copy_bytes=kept * dtype_bytes,
        e2e_offload=e2e.offload,
    )


def _through_a_block(
    b: int, seqlen: int, hidden: int, intermediate: int | None, n_heads: int
) -> int:
    """``b`` sequences through one block: forward intermediates, its input and output."""
    inner = b * seqlen * ((intermediate or 4 * hidden) + n_heads * seqlen) * 4 * 4
    return inner + 2 * b * seqlen * hidden * 4


def end_to_end_activation_bytes(
    n_blocks: int,
    micro_batch: int,
    seqlen: int,
    hidden: int,
    vocab: int,
    intermediate: int | None = None,
    n_heads: int = 1,
) -> int:
    """One micro-batch of the end-to-end stage: its activations through every block (kept for the
    backward pass) and the logits (student / teacher, their log-softmaxes, the gradient)."""
    acts = n_blocks * _through_a_block(micro_batch, seqlen, hidden, intermediate, n_heads)
    return acts + micro_batch * seqlen * vocab * 4 * 5


def optimizer_state_bytes(dtype_bytes: int, offloaded: bool = False) -> int:
    """Bytes per trained weight of the end-to-end stage's optimizer state: AdamW's two moments and
    the fp32 master (of fp16 / bf16 weights; of every weight when offloaded to the host)."""
    master = 4 if offloaded or dtype_bytes < 4 else 0
    return master + 2 * max(dtype_bytes, 4)


@dataclass(frozen=True)
class EndToEndPlan:
    """What the memory estimate needs to know of distill's end-to-end stage."""

    ratio: float  # the share of the blocks' parameters removed
    micro_batch: int
    n_blocks: int = 1
    vocab: int = 32000
    offload: str = "auto"  # the optimizer state's place on a GPU: "auto", "on" (host), "off"
    shards: int = 1  # processes the optimizer state is sharded over (torchrun's world size)

    @classmethod
    def of(cls, config: Any) -> EndToEndPlan | None:
        """The plan of a method config (None: no end-to-end stage)."""
        if not getattr(config, "e2e_epochs", 0):
            return None
        return cls(
            ratio=float(config.ratio),
            micro_batch=int(config.e2e_micro_batch),
            offload=str(getattr(config, "e2e_offload", "auto")),
            shards=distributed.launched_world_size(),
        )


def available_bytes(device: Any = None) -> int | None:
    """Free memory on ``device``: CUDA from ``torch.cuda.mem_get_info``, else MemAvailable from
    /proc/meminfo. None when unknown."""
    if device is not None and torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            return None
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except RuntimeError:  # pragma: no cover
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # macOS and other unixes: total physical memory as an upper bound
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def _dtype_bytes(dtype: Any, default: int) -> int:
    if dtype is None:
        return 4  # load_model's default: float32
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if str(dtype).lower() == "auto":
        return default
    try:
        from factorlm.io.hub import resolve_dtype

        d = resolve_dtype(dtype)
        return d.itemsize if isinstance(d, torch.dtype) else default
    except FactorLMError:
        return 4


def _first_int(cfg: dict[str, Any], *keys: str) -> int | None:
    for src in (cfg, cfg.get("text_config") or {}):
        for k in keys:
            v = src.get(k) if isinstance(src, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _block_index(name: str) -> str | None:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3`` (first numeric component)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return None


def keeps_loss_metric(config: Any) -> bool:
    """Whether a method config keeps modular's ``loss_metric`` Grams (distill: its init's)."""
    init_config = getattr(config, "init_config", None)
    if callable(init_config):
        config = init_config()
    return bool(getattr(config, "uses_loss_metric", False))


def estimate_for_checkpoint(
    source: str | os.PathLike,
    dtype: Any,
    n_samples: int,
    seqlen: int,
    batch_size: int = 8,
    teacher: bool = False,
    e2e: EndToEndPlan | None = None,
    loss_metric: bool = False,
) -> MemoryEstimate | None:
    """Estimate from a local model directory's config.json and safetensors headers (None: unknown
    source, e.g. a hub id or a GGUF file); ``loss_metric``: modular's option of that name."""
    from factorlm.preflight import checkpoint_tensors, read_config

    path = Path(source).expanduser()
    cfg = read_config(path) if path.is_dir() else None
    tensors = checkpoint_tensors(path) if cfg is not None else None
    if cfg is None or not tensors:
        return None
    n_params = sum(_numel(shape) for shape, _ in tensors.values())
    stored = max(nbytes for _, nbytes in tensors.values())
    per_block: dict[str, int] = {}
    max_in = 0
    for name, (shape, _) in tensors.items():
        blk = _block_index(name)
        if blk is None:
            continue
        per_block[blk] = per_block.get(blk, 0) + _numel(shape)
        if len(shape) == 2:  # the widest input of a block (an MLP's down projection)
            max_in = max(max_in, max(shape))
    hidden = _first_int(cfg, "hidden_size", "n_embd", "d_model") or max_in or 1
    if e2e is not None:
        vocab = _first_int(cfg, "vocab_size") or e2e.vocab
        e2e = dataclasses.replace(e2e, n_blocks=max(len(per_block), 1), vocab=vocab)
    return estimate(
        n_params,
        max(per_block.values(), default=0),
        hidden,
        max_in or hidden,
        n_samples,
        seqlen,
        _dtype_bytes(dtype, stored),
        batch_size,
        _first_int(cfg, "intermediate_size", "n_inner", "ffn_dim"),
        _first_int(cfg, "num_attention_heads", "n_head") or 1,
        teacher,
        outside_params=n_params - sum(per_block.values()),
        e2e=e2e,
        metric_grams=2 * len(per_block) if loss_metric else 0,
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_memory(est: MemoryEstimate | None, device: Any = None) -> None:
    """Raise :class:`InsufficientMemoryError` when ``est`` clearly does not fit."""
    if est is None:
        return
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if est.e2e_offload == "auto":  # the optimizer state stays on the device when it fits there
        free = available_bytes(device) if on_gpu else None
        on_device = dataclasses.replace(est, e2e_offload="off")
        fits = free is None or on_device.device_bytes() <= free
        est = on_device if fits else dataclasses.replace(est, e2e_offload="on")
    # torchrun: every process of this machine holds its own copy of what the host keeps
    procs = distributed.local_world_size()
    host = "host memory (MemAvailable)" + (f", {procs} processes on this host" if procs > 1 else "")
    checks = [(host, est.host_bytes(on_gpu) * procs, available_bytes(None))]
    if on_gpu:
        checks.append((f"free memory on {device}", est.device_bytes(), available_bytes(device)))
    for what, need, have in checks:
        log.debug("memory check: need ~%d bytes of %s, %s available", need, what, have)
        if have is not None and need > have:
            raise InsufficientMemoryError(
                f"not enough memory: this run needs about {need / GiB:.2f} GiB of {what} "
                f"({est.describe(on_gpu)}), {have / GiB:.2f} GiB available; lower --n-samples/--seqlen, "
                "use a smaller --dtype, or pass --no-memory-check to try anyway"
            )
