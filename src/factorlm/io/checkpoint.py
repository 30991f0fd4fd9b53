"""Per-block checkpoints of a running compression, so a killed run resumes where it stopped.

After block i: its compressed weights (``block-i.safetensors`` + structure), the activations
entering block i+1 (``streams-<i+1>.safetensors``) and ``state.json`` (written last, atomically) with
the next block index, the run's fingerprint and the report records so far. Resuming checks the
fingerprint (same model, method, options, calibration), restores blocks 0..i and continues: the
result equals an uninterrupted run's, bit for bit on CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from factorlm.arch.modules import block_targets, get_blocks, set_submodule
from factorlm.arch.registry import ArchSpec
from factorlm.calibration.pipeline import Streams
from factorlm.errors import ConfigError
from factorlm.io.structure import describe_module
from factorlm.nn.modeling_factorlm import FactorLMFormatError, make_module
from factorlm.report.schema import BlockRecord, ModuleRecord, Report

log = logging.getLogger(__name__)


def fingerprint(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, workdir: str | os.PathLike, run_id: dict[str, Any]) -> None:
        self.dir = Path(workdir)
        self.fp = fingerprint(run_id)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def save(
        self, index: int, model: nn.Module, spec: ArchSpec, streams: Streams, report: Report
    ) -> None:
        block = get_blocks(model, spec)[index]
        structure = {
            rel: d for rel, m in block_targets(block, spec).items() if (d := describe_module(m))
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        tmp = self.dir / f"block-{index}.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.dir / f"block-{index}.safetensors")
        st = {f"student.{j}": h.contiguous() for j, h in enumerate(streams.student)}
        if streams.teacher is not None:
            st.update({f"teacher.{j}": h.contiguous() for j, h in enumerate(streams.teacher)})
        # the streams file is named after the block it enters: a kill between writing it and
        # state.json leaves the previous (consistent) pair in place
        streams_name = f"streams-{index + 1}.safetensors"
        save_file(st, str(self.dir / (streams_name + ".tmp")))
        os.replace(self.dir / (streams_name + ".tmp"), self.dir / streams_name)
        state = self._read_state() or {"blocks": {}}
        old_streams = state.get("streams")
        state["fingerprint"] = self.fp
        state["dtype"] = str(next(model.parameters()).dtype)
        state["next_block"] = index + 1
        state["streams"] = streams_name
        state["blocks"][str(index)] = structure
        state["modules"] = [asdict(m) for m in report.modules]
        state["block_records"] = [asdict(b) for b in report.blocks]
        state["warnings"] = list(report.warnings)
        _atomic_write_bytes(self.state_file, json.dumps(state).encode())
        if old_streams and old_streams != streams_name:
            (self.dir / old_streams).unlink(missing_ok=True)

    def _read_state(self) -> dict[str, Any] | None:
        if not self.state_file.is_file():
            return None
        try:
            return json.loads(self.state_file.read_text())
        except ValueError:
            return None

    def restore(
        self, model: nn.Module, spec: ArchSpec, streams: Streams, report: Report
    ) -> tuple[int, Streams]:
        """Restore finished blocks into ``model``; returns (next block, streams entering it)."""
        state = self._read_state()
        if state is None:
            log.info("no checkpoint in %s: starting from the first block", self.dir)
            return 0, streams
        if state.get("fingerprint") != self.fp:
            raise ConfigError(
                f"the checkpoint in {self.dir} belongs to a different run (model, method, options or calibration "
                "changed): remove it or run without --resume"
            )
        dtype = next(model.parameters()).dtype
        if state.get("dtype", str(dtype)) != str(dtype):
            raise ConfigError(
                f"the checkpoint in {self.dir} was written with {state['dtype']}, this run uses "
                f"{dtype}: pass the same --dtype, or remove it / run without --resume"
            )
        try:
            return self._restore(state, model, spec, streams, report, dtype)
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            RuntimeError,
            SafetensorError,
            FactorLMFormatError,
        ) as e:
            raise ConfigError(
                f"the checkpoint in {self.dir} is incomplete or corrupt ({type(e).__name__}: {e}): "
                "remove it or run without --resume"
            ) from e

    def _restore(
        self,
        state: dict[str, Any],
        model: nn.Module,
        spec: ArchSpec,
        streams: Streams,
        report: Report,
        dtype,
    ) -> tuple[int, Streams]:
        blocks = get_blocks(model, spec)
        nxt = int(state["next_block"])
        if not 0 < nxt <= len(blocks):
            raise ValueError(f"next_block {nxt} outside 1..{len(blocks)}")
        t = load_file(str(self.dir / state.get("streams", "streams.safetensors")))
        n = len(streams.student)
        student = [t[f"student.{j}"] for j in range(n)]
        teacher = [t[f"teacher.{j}"] for j in range(n)] if "teacher.0" in t else None
        for i in range(nxt):
            block = blocks[i]
            for rel, d in state["blocks"][str(i)].items():
                set_submodule(block, rel, make_module(d, dtype))
            block.load_state_dict(load_file(str(self.dir / f"block-{i}.safetensors")), strict=True)
        report.modules = [
            ModuleRecord(**{**m, "shape": tuple(m["shape"])}) for m in state.get("modules", [])
        ]
        report.blocks = [BlockRecord(**b) for b in state.get("block_records", [])]
        report.warnings = list(state.get("warnings", []))
        log.info("resuming from block %d (checkpoint %s)", nxt, self.dir)
        return nxt, Streams(student=student, kwargs=streams.kwargs, teacher=teacher)
