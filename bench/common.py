"""Shared helpers of the benchmark scripts: machine description, RSS sampling, result files."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from factorlm.utils import RSSSampler  # noqa: F401  (re-exported for the bench scripts)

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(
    os.environ.get("FACTORLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    name = os.environ.get("FACTORLM_MACHINE") or (
        gpu.replace(" ", "-").lower() if gpu else f"cpu{os.cpu_count()}"
    )
    mem = None
    try:
        mem = int(open("/proc/meminfo").readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "name": name,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "gpu": gpu,
        "platform": platform.platform(),
    }


def versions() -> dict:
    import torch
    import transformers

    import factorlm

    return {
        "factorlm": factorlm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def git_commit() -> str | None:
    """Short hash of the checked-out commit (+ "-dirty" with uncommitted changes to tracked files
    other than the results themselves, so a grid's later runs in one checkout keep its commit)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("-dirty" if dirty else "")) or None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
