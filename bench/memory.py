"""Memory of the offloaded pipeline: a model larger than the compute device, one block on it.

    .venv/bin/python bench/memory.py            # ~1-2 min on 2 cores
    FACTORLM_MACHINE=mybox .venv/bin/python bench/memory.py --blocks 4 16 --hidden 512

For each depth in ``--blocks`` a random-weight Llama (hidden 512, MLP 1408, vocab 8192, fp32) is
saved as safetensors and compressed with svd-llm in a fresh process, which measures:

* **device memory**, on a compute device emulated on the CPU (:class:`DeviceEmulator`): the
  pipeline runs with ``device="cpu"`` (the emulated device) and ``offload="meta"`` (a tag for host
  memory). ``Tensor.to`` is patched so that a move between the two really copies, as between a GPU
  and its host, and a ``TorchDispatchMode`` counts the bytes of every live storage on the device:
  storages moved there, and every storage an operator creates from device inputs (or a factory
  call) -- activations, statistics, factorization workspaces, temporaries -- until it is freed.
  That is ``torch.cuda.max_memory_allocated`` without allocator rounding. The pipeline's own
  ``reset_device_peak`` / ``peak_device_bytes`` are redirected to it, so the report's per-block
  ``peak_device_bytes`` is filled exactly as on a GPU;
* **CPU memory**: the high-water mark of the resident set (VmHWM, reset through
  ``/proc/self/clear_refs``) while loading and while compressing, against the model's size.
  Here the emulated device lives in host memory too, so the compression peak includes it.

The stated device cap is half the deepest model's weights: the model cannot sit on such a
device, and the check is that the peak stays below the cap and does not grow with depth.
Results: bench/results/memory-<machine>.json and .md (machine: $FACTORLM_MACHINE or the host name).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, versions, write_json  # noqa: E402

HOST = "meta"  # the pipeline's offload device in this benchmark: a tag, the data stays on the CPU
MiB = 2**20


# --- the emulated device ---------------------------------------------------------------------------


def _key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


class DeviceEmulator(TorchDispatchMode):
    """Counts the bytes of the storages living on an emulated compute device (see the module doc).

    Storages that exist before ``__enter__`` are on the host. A storage is on the device when
    ``.to("cpu")`` moved it there or an operator created it with a device input, or with no tensor
    input at all (factories); ``.to("meta")`` moves it back to the host (a copy, as on a GPU).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage key -> bytes, for storages on the device
        self.current = 0
        self.peak = 0
        self._quiet = 0
        self._orig_to = torch.Tensor.to
        self._orig_cpu = torch.Tensor.cpu

    # bookkeeping
    def _add(self, t: torch.Tensor) -> None:
        k = _key(t)
        if k is None or k in self.live:
            return
        s = t.untyped_storage()
        n = s.nbytes()
        self.live[k] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(s, self._free, k)

    def _free(self, k: int) -> None:
        n = self.live.pop(k, None)
        if n is not None:
            self.current -= n

    def on_device(self, t: torch.Tensor) -> bool:
        return _key(t) in self.live

    def reset_peak(self, *_args) -> None:
        self.peak = self.current

    def peak_bytes(self, *_args) -> int:
        return self.peak

    # operators
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._quiet:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        in_keys = {_key(t) for t in ins}
        on_dev = not ins or any(k in self.live for k in in_keys)
        if on_dev:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and _key(t) not in in_keys:
                    self._add(t)
        return out

    # moves
    def _to(self, t: torch.Tensor, *args, **kwargs):
        device, dtype, non_blocking, fmt = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or device.type not in ("cpu", HOST):
            return self._orig_to(t, *args, **kwargs)
        kw = dict(dtype=dtype, non_blocking=non_blocking, memory_format=fmt)
        here = self.on_device(t)
        if (device.type == "cpu") == here:  # already there: at most a dtype conversion
            return self._orig_to(t, "cpu", copy=kwargs.get("copy", False), **kw)
        self._quiet += 1
        try:
            new = self._orig_to(t, "cpu", copy=True, **kw)
        finally:
            self._quiet -= 1
        if device.type == "cpu":
            self._add(new)
        return new

    def __enter__(self):
        em = self
        torch.Tensor.to = lambda t, *a, **k: em._to(t, *a, **k)
        torch.Tensor.cpu = lambda t, *a, **k: em._to(t, HOST)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.to = self._orig_to
        torch.Tensor.cpu = self._orig_cpu
        return super().__exit__(*exc)


# --- one measurement (child process) ---------------------------------------------------------------


def _status() -> dict[str, int]:
    """RssAnon / RssFile / VmRSS / VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


class RssPeaks:
    """Peak anonymous / file-backed resident memory during a ``with`` block (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.anon = self.file = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        st = _status()
        self.anon = max(self.anon, st["RssAnon"])
        self.file = max(self.file, st["RssFile"])

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def __enter__(self) -> RssPeaks:
        self._sample()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


def nbytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _warm_up(tf) -> None:
    """Load the libraries' lazy parts (modeling code, loaders, kernels) before the baseline."""
    import factorlm.methods  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        make_model(Path(tmp), 1, 64, 128, 128)
        model = tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long))
    del model


def measure(model_dir: str, n_samples: int, seqlen: int, batch_size: int) -> dict:
    import transformers as tf

    import factorlm
    import factorlm.api
    import factorlm.calibration.pipeline as pipeline
    from factorlm.arch.modules import block_targets, get_blocks, get_spec
    from factorlm.calibration.stats import StatsCollector

    _warm_up(tf)
    start = _status()
    with RssPeaks() as load_peaks:
        model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = _status()
    spec = get_spec(model)
    blocks = get_blocks(model, spec)
    model_bytes, block_bytes = nbytes(model), nbytes(blocks[0])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (n_samples, seqlen), generator=g)

    # statistics of one block, as svd-llm keeps them (shared inputs share one accumulator)
    with torch.no_grad(), StatsCollector(block_targets(blocks[0], spec), {"gram"}) as col:
        h = torch.randn(batch_size, seqlen, model.config.hidden_size)
        pos = torch.arange(seqlen)[None]
        blocks[0](h, position_embeddings=model.model.rotary_emb(h, pos), position_ids=pos)
    stats_bytes = sum(
        t.numel() * t.element_size()
        for s in {id(s): s for s in col.stats.values()}.values()
        for t in s.tensors().values()
    )
    del col, h

    em = DeviceEmulator()
    # sanity check of the emulator: one block in, one block out
    with em:
        blocks[1].to("cpu")
        check_in = em.current
        blocks[1].to(HOST)
        check_out = em.current
    for mod in (pipeline, factorlm.api):
        mod.reset_device_peak, mod.peak_device_bytes = em.reset_peak, em.peak_bytes

    before = _status()
    t0 = time.perf_counter()
    with em, RssPeaks() as peaks:
        report = factorlm.compress(
            model, "svd-llm", ratio=0.3, calibration=ids, n_samples=n_samples, seqlen=seqlen,
            batch_size=batch_size, device="cpu", offload=HOST, progress=False,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    after = _status()
    hidden = model.config.hidden_size
    act_stream = n_samples * seqlen * hidden * 4
    return {
        "model_bytes": model_bytes,
        "block_bytes": block_bytes,
        "n_blocks": len(blocks),
        "stats_bytes_per_block": stats_bytes,
        "activation_bytes_per_stream": act_stream,
        "activation_bytes_per_batch": batch_size * seqlen * hidden * 4,
        "emulator_check": {"block_in_bytes": check_in, "after_block_out_bytes": check_out},
        "device": {
            "peak_bytes": report.peak_device_bytes,
            "per_block_peak_bytes": [b.peak_device_bytes for b in report.blocks],
            "left_on_device_bytes": em.current,
        },
        "cpu": {  # RssAnon: process memory; RssFile: libraries + the mmap-ed checkpoint
            "start": start,
            "loaded": loaded,
            "load_peak_anon_bytes": load_peaks.anon,
            "before_compress": before,
            "compress_peak_anon_bytes": peaks.anon,
            "compress_peak_file_bytes": peaks.file,
            "after_compress": after,
            "per_block_peak_rss_bytes": [b.peak_rss_bytes for b in report.blocks],
        },
        "compress_seconds": seconds,
        "achieved_ratio": report.achieved_ratio,
    }


# --- driver ----------------------------------------------------------------------------------------


def make_model(path: Path, n_blocks: int, hidden: int, inter: int, vocab: int) -> None:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=n_blocks,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


SLACK = 64 * MiB  # allocator, thread stacks, lazily loaded code


def host_bound(r: dict) -> int:
    """Model + one block's working set (the emulated device's peak) + 3 activation streams."""
    return (
        r["model_bytes"] + r["device"]["peak_bytes"] + 3 * r["activation_bytes_per_stream"] + SLACK
    )


def _mib(x) -> str:
    return "-" if x is None else f"{x / MiB:,.1f}"


def markdown(res: dict) -> str:
    cfg, runs = res["config"], res["runs"]
    cap = res["device_cap_bytes"]
    lines = [
        f"# Memory: offloaded block-by-block compression ({res['machine']['name']})",
        "",
        f"CPU {res['machine']['cpu']} ({res['machine']['cores']} cores); torch {res['versions']['torch']}, "
        f"transformers {res['versions']['transformers']}. Random-weight Llama, hidden {cfg['hidden']}, "
        f"MLP {cfg['intermediate']}, vocab {cfg['vocab']} (untied), fp32; svd-llm ratio 0.3; calibration "
        f"{cfg['n_samples']} x {cfg['seqlen']} tokens in batches of {cfg['batch_size']}.",
        "",
        "Device memory is measured on a compute device emulated on the CPU (every live storage on the",
        "device, temporaries included; see bench/memory.py). Stated device cap: "
        f"**{_mib(cap)} MiB** (half the deepest model's weights).",
        "",
        "| blocks | model weights MiB | one block MiB | block stats MiB (fp64) | peak device MiB | peak / block | max per-block peak MiB | under cap |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in runs:
        d = r["device"]
        lines.append(
            f"| {r['n_blocks']} | {_mib(r['model_bytes'])} | {_mib(r['block_bytes'])} | "
            f"{_mib(r['stats_bytes_per_block'])} | {_mib(d['peak_bytes'])} | "
            f"{d['peak_bytes'] / r['block_bytes']:.1f} | {_mib(max(d['per_block_peak_bytes']))} | "
            f"{'yes' if d['peak_bytes'] <= cap else 'NO'} |"
        )
    lines += [
        "",
        "CPU memory: anonymous resident memory (RssAnon, sampled every 5 ms) above the process's at",
        "start (torch + transformers imported). The checkpoint is memory-mapped by transformers: its",
        "pages count as file-backed (RssFile: clean page cache, dropped under pressure), not anonymous.",
        "The emulated device lives in host memory here, so the compression peak includes it; the bound",
        "is model + device peak (one block's working set) + 3 activation streams + 64 MiB. Run with",
        "MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave the resident set.",
        "",
        "| blocks | model MiB | anon after load MiB | peak anon loading MiB | peak anon compressing MiB | bound MiB | file-backed growth MiB | anon after MiB | time s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        c, a0 = r["cpu"], r["cpu"]["start"]["RssAnon"]
        lines.append(
            f"| {r['n_blocks']} | {_mib(r['model_bytes'])} | {_mib(c['loaded']['RssAnon'] - a0)} | "
            f"{_mib(c['load_peak_anon_bytes'] - a0)} | {_mib(c['compress_peak_anon_bytes'] - a0)} | "
            f"{_mib(host_bound(r))} | "
            f"{_mib(c['compress_peak_file_bytes'] - c['before_compress']['RssFile'])} | "
            f"{_mib(c['after_compress']['RssAnon'] - a0)} | {r['compress_seconds']:.1f} |"
        )
    lines += ["", *(f"- {n}" for n in res.get("notes", []))]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.n_samples, args.seqlen, args.batch_size)))
        return 0

    runs = []
    # a fixed glibc mmap threshold: freed large buffers go back to the system, so the resident set
    # follows live memory (with the default dynamic threshold glibc keeps freed blocks around)
    # one thread: on a shared machine oversubscribed OpenMP makes LAPACK 10x slower
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.blocks:
            path = Path(tmp) / f"llama{n}"
            make_model(path, n, args.hidden, args.intermediate, args.vocab)
            cmd = [sys.executable, __file__, "--child", str(path), "--n-samples", str(args.n_samples),
                   "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            d = runs[-1]["device"]
            print(f"{n} blocks: model {_mib(runs[-1]['model_bytes'])} MiB, peak device "
                  f"{_mib(d['peak_bytes'])} MiB, {runs[-1]['compress_seconds']:.1f} s")  # fmt: skip
    mach = machine()
    mach["name"] = os.environ.get("FACTORLM_MACHINE") or platform.node()
    deepest = max(runs, key=lambda r: r["n_blocks"])
    res = {
        "benchmark": "memory",
        "machine": mach,
        "versions": versions(),
        "config": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "vocab": args.vocab,
            "n_samples": args.n_samples,
            "seqlen": args.seqlen,
            "batch_size": args.batch_size,
            "method": "svd-llm",
            "ratio": 0.3,
        },
        "device_cap_bytes": deepest["model_bytes"] // 2,
        "runs": runs,
    }
    peaks = [r["device"]["peak_bytes"] for r in runs]
    res["checks"] = {
        "model_exceeds_cap": deepest["model_bytes"] > res["device_cap_bytes"],
        "peak_under_cap": all(p <= res["device_cap_bytes"] for p in peaks),
        "peak_independent_of_depth": max(peaks) <= 1.05 * min(peaks),
        "nothing_left_on_device": all(r["device"]["left_on_device_bytes"] == 0 for r in runs),
        "per_block_peaks_flat": all(
            max(r["device"]["per_block_peak_bytes"])
            <= 1.05 * min(r["device"]["per_block_peak_bytes"])
            for r in runs
        ),
        "host_within_bound": all(
            r["cpu"]["compress_peak_anon_bytes"] - r["cpu"]["start"]["RssAnon"] <= host_bound(r)
            for r in runs
        ),
        "load_without_second_copy": all(
            r["cpu"]["load_peak_anon_bytes"] - r["cpu"]["start"]["RssAnon"]
            <= r["model_bytes"] + SLACK
            for r in runs
        ),
    }
    d, chk = deepest["device"], deepest["emulator_check"]
    work = d["peak_bytes"] - deepest["block_bytes"] - deepest["stats_bytes_per_block"]
    res["notes"] = [
        f"The device peak is {_mib(d['peak_bytes'])} MiB at every depth: one block's weights "
        f"({_mib(deepest['block_bytes'])} MiB) + its float64 statistics "
        f"({_mib(deepest['stats_bytes_per_block'])} MiB) + {_mib(work)} MiB of float64 "
        "factorization workspace and one batch's activations; it does not grow with the number "
        "of blocks (per-block peaks in the JSON). Whole model on the device instead: "
        f"{_mib(deepest['model_bytes'] + work + deepest['stats_bytes_per_block'])} MiB.",
        f"Emulator check: moving one block to the device counts {_mib(chk['block_in_bytes'])} MiB "
        f"(its weights: {_mib(deepest['block_bytes'])} MiB), moving it back leaves "
        f"{_mib(chk['after_block_out_bytes'])} MiB.",
        "Host memory: the original weights stay in the memory-mapped checkpoint (file-backed "
        "growth = the pages read); the anonymous memory ends at the compressed model's size.",
        f"One thread per process (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}); times are on a "
        "shared machine.",
        f"Checks: {', '.join(f'{k} = {v}' for k, v in res['checks'].items())}.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"memory-{mach['name']}"
    write_json(stem.with_suffix(".json"), res)
    stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0 if all(res["checks"].values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
