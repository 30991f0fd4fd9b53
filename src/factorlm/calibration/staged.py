"""One calibration pass per block: compress each linear the moment every token has reached it.

The two-pass pipeline runs a block twice per block (dense with statistics hooks, then the
compressed block to produce the next block's inputs). Here the calibration batches run through the
block *once*, each batch in its own worker thread, and every targeted linear is a synchronisation
point: when all batches have reached linear ``L``, their statistics are summed (in batch order, so
the result does not depend on thread scheduling), ``L`` is factorized, and every batch continues
through the *compressed* ``L``. Later linears of the block therefore see the outputs of the
already-compressed earlier ones (the "true sequential" order of GPTQ-style pipelines), and the
block's outputs at the end are the next block's inputs: no second pass.

Only one worker computes at a time, in batch order (a turn handed from batch to batch between
synchronisation points), so the threads never compete for cores and each linear's statistics are
summed in one float64 accumulator in batch order (deterministic, one copy instead of one per
batch); the threads only keep the batches' intermediate tensors alive across a synchronisation
point. The schedule needs every targeted linear to be called exactly once per
batch, in the same order: architectures whose blocks route tokens (mixture of experts) or read a
weight without calling its module (Mamba's ``dt_proj``) opt out with ``ArchSpec.single_pass``;
anything else that breaks the rule is detected (:class:`StagedUnsupported`) and the caller falls
back to two passes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from factorlm.arch.modules import get_submodule, set_submodule
from factorlm.calibration.stats import LayerStats, accumulate, check_stats_finite


class StagedUnsupported(RuntimeError):
    """The block's forward does not call each targeted linear exactly once, in one order."""


class _SyncLinear(nn.Module):
    """Stands in for a targeted linear during the pass: synchronise, then call the current module."""

    def __init__(self, rel: str, inner: nn.Module, pass_: StagedPass) -> None:
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_rel", rel)
        object.__setattr__(self, "_pass", pass_)

    @property
    def weight(self):  # some blocks read .weight (dtype / device checks)
        return self.inner.weight

    def forward(self, x, *args, **kwargs):
        self._pass._sync(self._rel, x)
        return self._pass._current(self._rel, self)(x, *args, **kwargs)


class StagedPass:
    """Run ``block`` once over ``hidden`` (one tensor per batch) compressing linears on the way.

    ``compress(rels, stats)`` is called in forward order with the statistics of every batch
    summed, once for each targeted linear (``rels`` lists the linears that read the same input
    and are compressed together); it may replace them in the block (``set_submodule``), and the
    batches then continue through the replacements. Returns the block's outputs, one per batch,
    on ``offload``.

    Which linears read the same input (k, v after q; up after gate) shows only when the batches
    reach them. ``together`` ({first linear: the later ones sharing its input}, as
    :attr:`shared_inputs` found it in an earlier block of the same architecture) compresses a
    group as soon as its statistics are complete, in one ``compress`` call: under torchrun its
    factorizations are then spread over the processes. A block that does not share the inputs
    as announced raises :class:`StagedUnsupported`.
    """

    def __init__(
        self,
        block: nn.Module,
        targets: dict[str, nn.Module],
        need: frozenset[str],
        compress: Callable[[list[str], LayerStats], None],
        prefix: str = "",
        reduce: Callable[[str, LayerStats], None] | None = None,
        together: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.block = block
        self.targets = targets
        self.need = need
        self.compress = compress
        self.prefix = prefix
        self.reduce = reduce  # e.g. all-reduce across processes, in place
        self.together = {k: tuple(v) for k, v in (together or {}).items()}
        self._leader = {f: lead for lead, fs in self.together.items() for f in fs}
        self.merged: dict[str, LayerStats] = {}
        # found by the last run: {first linear: the later ones reading the same input}
        self.shared_inputs: dict[str, tuple[str, ...]] = {}

    # --- worker side -------------------------------------------------------------------------
    def _sync(self, rel: str, x: torch.Tensor) -> None:
        local = self._local
        if rel in local.visited:
            raise StagedUnsupported(f"{self.prefix}{rel} is called more than once per forward")
        local.visited.append(rel)
        owner = local.seen.get(id(x))
        if owner is not None and owner[0] is x:
            # same input tensor as an earlier linear (k, v after q; up after gate): its summed
            # statistics are complete already, so the first batch to get here compresses it and
            # nobody waits (the batches' intermediates do not pile up at this point)
            first = self._shared.setdefault(rel, owner[1])
            if first != owner[1] or self._leader.get(rel, first) != first:
                raise StagedUnsupported(f"{self.prefix}{rel}: its input differs between batches")
            if rel not in self.merged:
                self.merged[rel] = self.merged[first]
                self._compress([rel], self.merged[rel])
            return
        if rel in self._shared or rel in self._leader:
            raise StagedUnsupported(f"{self.prefix}{rel}: input shared in some batches only")
        if local.index == 0:
            self._acc = LayerStats()
        accumulate(self._acc, x, self.need)  # our turn: batches add up in batch order
        local.seen[id(x)] = (x, rel)
        self._slots[local.index] = rel
        self._pass_turn()
        self._barrier.wait()
        self._take_turn()

    def _take_turn(self) -> None:
        local = self._local
        with self._turns:
            while self._turn != local.index:
                if self._aborted:
                    raise threading.BrokenBarrierError
                self._turns.wait()
        local.holding = True

    def _pass_turn(self) -> None:
        local = self._local
        with self._turns:
            local.holding = False
            self._turn = local.index + 1
            self._turns.notify_all()

    def _current(self, rel: str, wrapper: nn.Module) -> nn.Module:
        return self._replaced.get(rel, wrapper.inner)

    # --- the last worker to arrive runs this, while all the others wait --------------------------
    def _merge(self) -> None:
        names = set(self._slots)
        if len(names) != 1:
            raise StagedUnsupported(
                f"{self.prefix}: batches reached different linears at one step ({sorted(names)})"
            )
        rel = names.pop()
        stats, self._acc = self._acc, None
        with self._turns:  # the next segment starts with the first batch again
            self._turn = 0
        if self.reduce is not None:
            self.reduce(rel, stats)
        check_stats_finite(stats, f"{self.prefix}{rel}")
        rels = [rel, *self.together.get(rel, ())]
        for r in rels:
            self.merged[r] = stats
        self._compress(rels, stats)

    def _compress(self, rels: list[str], stats: LayerStats) -> None:
        """Let the method replace ``rels``; the wrappers stay in place until the pass ends
        (batches that have not reached a linear yet must still synchronise) and forward to the
        new modules."""
        self.compress(rels, stats)
        for rel in rels:
            wrapper = self._wrappers[rel]
            new = get_submodule(self.block, rel)
            if new is not wrapper:
                self._replaced[rel] = new
                set_submodule(self.block, rel, wrapper)

    def run(
        self, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], run_one: Callable
    ) -> list[torch.Tensor]:
        n = len(hidden)
        self._slots: list[Any] = [None] * n
        self._acc: LayerStats | None = None
        self._turns = threading.Condition()
        self._turn, self._aborted = 0, False
        self._barrier = threading.Barrier(n, action=self._merge)
        self._local = threading.local()
        self._shared: dict[str, str] = {}  # linear -> the earlier linear whose input it shares
        outputs: list[torch.Tensor | None] = [None] * n
        errors: list[BaseException | None] = [None] * n
        wrappers = {rel: _SyncLinear(rel, mod, self) for rel, mod in self.targets.items()}
        self._wrappers, self._replaced = wrappers, {}
        grad = torch.is_grad_enabled()

        def work(k: int) -> None:
            local = self._local
            local.index, local.visited, local.seen, local.holding = k, [], {}, False
            try:
                self._take_turn()
                with torch.set_grad_enabled(grad):
                    outputs[k] = run_one(hidden[k], kwargs[k])
                if len(local.visited) != len(self.targets):
                    missing = sorted(set(self.targets) - set(local.visited))
                    raise StagedUnsupported(f"{self.prefix}: {missing} not called by every batch")
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                errors[k] = e
                with self._turns:
                    self._aborted = True
                    self._turns.notify_all()
                self._barrier.abort()
            finally:
                local.seen = {}
                if local.holding:
                    self._pass_turn()

        for rel, w in wrappers.items():
            set_submodule(self.block, rel, w)
        try:
            threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for rel, w in wrappers.items():  # compressed or (left dense) original module
                set_submodule(self.block, rel, self._replaced.get(rel, w.inner))
            groups: dict[str, list[str]] = {}
            for rel, first in self._shared.items():
                groups.setdefault(first, []).append(rel)
            self.shared_inputs = {k: tuple(v) for k, v in groups.items()}
            # break the self <-> barrier cycle now: it holds the statistics being summed, which
            # would otherwise wait for a full garbage collection
            self._barrier = self._slots = self._local = self._shared = self._acc = None
            self._wrappers, self._replaced = {}, {}
            self.merged = {}
            wrappers.clear()
        real = [
            e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)
        ]
        if real:
            raise real[0]
        if any(e is not None for e in errors):  # pragma: no cover - broken without a cause
            raise StagedUnsupported(f"{self.prefix}: synchronisation failed")
        return outputs  # type: ignore[return-value]
