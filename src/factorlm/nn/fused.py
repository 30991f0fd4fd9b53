"""Stacked first factors: linears that read the same input run their first matmul together.

In a decoder block q/k/v (and gate/up) are called on the very same hidden-state tensor. When they
are factorized (:class:`~factorlm.nn.lowrank.LowRankLinear`, y = A (B x)), their ``B`` matrices
are stacked into one ``(r_q + r_k + r_v) x in`` weight that runs as ONE matmul; each member then
applies its own narrow ``A`` to its slice of the result. Plain ``nn.Linear`` members next to
low-rank ones (e.g. modular's dense v_proj next to factorized q/k) are stacked whole, and take
their slice of the output; a group of plain linears only (LoRAP's or modular's pruned gate/up)
stays as the dense model runs it unless asked (``plain_groups``).

The parent's forward (Hugging Face's attention / MLP code) is never touched: ``q_proj``,
``k_proj``, ``v_proj`` stay attributes of the parent and are called as before. They share a
:class:`StackedInput` module that remembers the last input tensor it saw (by identity and version
counter) and its stacked product: the first member called on ``x`` computes the product, the others
reuse it; a member called on a different tensor computes the product anew, so any calling order
gives the unfused result. The cache is dropped once every member has read it. Inside
``torch.compile`` the cache is a plain dict that dynamo traces: the first member called on a
traced tensor puts one stacked matmul into the graph, the others narrow its result (the last
member clears it, so nothing outlives the graph).

The save format is unchanged: :func:`factorlm.save` writes a fused model as unfused factors
(:func:`unfused`), and :func:`fuse` is re-applied after loading (``factorlm.load(dir, fuse=True)``,
``factorlm eval --speed``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from factorlm.nn.lowrank import LowRankLinear

log = logging.getLogger(__name__)

__all__ = ["FusedMember", "StackedInput", "fuse", "is_fused", "unfuse", "unfused"]


class StackedInput(nn.Module):
    """The stacked first factors of a group: ``z = W x (+ b)`` computed once per input tensor."""

    def __init__(
        self,
        weight: torch.Tensor,
        widths: list[int],
        bias: torch.Tensor | None,
        dense: bool,
        plain: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dense = dense  # some members are plain linears stacked whole (no second factor)
        self.plain = plain  # every member is (fuse's plain_groups)
        self.widths = list(widths)
        self.offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self._x: torch.Tensor | None = None
        self._version = -2
        self._z: torch.Tensor | None = None
        self._unread: set[int] = set()  # members that have not read the cached product yet
        self._traced: dict[str, torch.Tensor] = {}  # the same cache while dynamo traces

    def slice(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s part of the stacked product of ``x`` (cached across members)."""
        start, width = self.offsets[index], self.widths[index]
        if torch.compiler.is_compiling():
            traced = self._traced
            if index == 0 or traced.get("x") is not x:  # member 0: a new forward, fresh product
                traced["x"], traced["z"] = x, F.linear(x, self.weight, self.bias)
            z = traced["z"]
            if index == len(self.widths) - 1:
                traced.clear()
            return z.narrow(-1, start, width)
        version = -1 if x.is_inference() else x._version  # inference tensors have no counter
        unread = self._unread  # mutated in place: an nn.Module attribute assignment is slow
        if self._x is not x or self._version != version or index not in unread:
            self._z = F.linear(x, self.weight, self.bias)
            self._x, self._version = x, version
            unread.update(range(len(self.widths)))
        z = self._z
        unread.discard(index)
        if not unread:  # every member read it: hold no activation between forwards
            self._x = self._z = None
        return z.narrow(-1, start, width)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, widths={self.widths}"


class FusedMember(nn.Module):
    """One linear of a fused group: its slice of the stacked product, then its own ``A`` (if any).

    ``A`` is ``None`` for a plain linear stacked whole (its bias is then in the stacked bias).
    """

    def __init__(
        self,
        stacked: StackedInput,
        index: int,
        A: nn.Linear | None,
        bias: torch.Tensor | None,
        in_features: int,
        out_features: int,
    ) -> None:
        super().__init__()
        # not a registered child: the stacked weight belongs to the parent (saved once)
        object.__setattr__(self, "_stacked", stacked)
        self.index = index
        self.A = A
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = in_features, out_features

    @property
    def stacked(self) -> StackedInput:
        return self._stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self._stacked.slice(x, self.index)
        if self.A is None:
            return z
        return F.linear(z, self.A.weight, self.bias)

    def extra_repr(self) -> str:
        kind = "dense" if self.A is None else f"rank={self.A.in_features}"
        return f"index={self.index}, in_features={self.in_features}, out_features={self.out_features}, {kind}"


def _groups(block: nn.Module, patterns: tuple[str, ...]) -> list[list[str]]:
    """Relative names in ``block`` matching each pattern, grouped by the ``*`` components."""
    by_key: dict[tuple[str, ...], dict[int, str]] = {}
    for name, _ in block.named_modules():
        parts = name.split(".")
        for i, pat in enumerate(patterns):
            pp = pat.split(".")
            if len(pp) == len(parts) and all(a in ("*", b) for a, b in zip(pp, parts, strict=True)):
                key = tuple(b for a, b in zip(pp, parts, strict=True) if a == "*")
                by_key.setdefault(key, {})[i] = name
    return [[members[i] for i in sorted(members)] for members in by_key.values()]


def _lowrank(m: nn.Module) -> bool:
    return isinstance(m, LowRankLinear) and type(m.B) is nn.Linear


def _fusable(mods: list[nn.Module], dense: bool, plain_groups: bool = False) -> bool:
    if len(mods) < 2 or len({getattr(m, "in_features", None) for m in mods}) != 1:
        return False
    if all(_lowrank(m) for m in mods):
        return True
    if not plain_groups and not any(_lowrank(m) for m in mods):
        return False
    return dense and all(_lowrank(m) or type(m) is nn.Linear for m in mods)


def _fuse_group(parent: nn.Module, leaves: list[str], mods: list[nn.Module]) -> StackedInput:
    """Stack the members' first matmuls: a low-rank member's ``B``, a plain linear whole.

    A plain member's bias goes into the stacked bias (zeros in the low-rank members' rows); a
    low-rank member keeps its own, added after its ``A``.
    """
    lowrank = [_lowrank(m) for m in mods]
    with torch.no_grad():
        pairs = list(zip(mods, lowrank, strict=True))
        weight = torch.cat([m.B.weight if lr else m.weight for m, lr in pairs], 0)
        widths = [m.rank if lr else m.out_features for m, lr in pairs]
        plain_biases = [None if lr else m.bias for m, lr in pairs]
        bias = None
        if any(b is not None for b in plain_biases):
            bias = torch.cat(
                [
                    b if b is not None else weight.new_zeros(w)
                    for b, w in zip(plain_biases, widths, strict=True)
                ]
            )
        stacked = StackedInput(weight, widths, bias, dense=not all(lowrank), plain=not any(lowrank))
    setattr(parent, "fused_" + "_".join(leaves), stacked)
    for i, (leaf, m, lr) in enumerate(zip(leaves, mods, lowrank, strict=True)):
        A = m.A if lr else None
        bias = m.bias if lr else None
        setattr(parent, leaf, FusedMember(stacked, i, A, bias, m.in_features, m.out_features))
    return stacked


def fuse(model: nn.Module, spec=None, dense: bool = True, plain_groups: bool = False) -> int:
    """Stack the first factors of every group of linears that reads one input (in place).

    Groups come from the architecture's ``shared_inputs``; a group is fused when its members have
    one input width and are all :class:`LowRankLinear`, or (``dense=True``) each a
    :class:`LowRankLinear` or a plain ``nn.Linear`` (stacked whole) with at least one
    :class:`LowRankLinear` among them. A group of plain linears only (e.g. pruned gate/up) is
    stacked with ``plain_groups=True`` alone: as the dense model runs them, one matmul each, it is
    never slower than dense, while one matmul of the stacked weight ran slower than the two on
    CPU (bench/results/speed-cpu2*.md).
    Returns the number of groups fused. Logits equal the unfused model's (same matmuls, summed in
    the same order per output element).
    """
    from factorlm.arch.modules import get_blocks, get_spec

    spec = spec or get_spec(model)
    n = 0
    for block in get_blocks(model, spec):
        for patterns in spec.shared_inputs:
            for names in _groups(block, patterns):
                parents = {nm.rpartition(".")[0] for nm in names}
                if len(names) < 2 or len(parents) != 1:
                    continue
                parent = block.get_submodule(parents.pop())
                mods = [block.get_submodule(nm) for nm in names]
                if not _fusable(mods, dense, plain_groups):
                    continue
                _fuse_group(parent, [nm.rpartition(".")[2] for nm in names], mods)
                n += 1
    log.info("fused %d groups of linears that read the same input", n)
    return n


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, StackedInput) for m in model.modules())


def unfuse(model: nn.Module) -> int:
    """Undo :func:`fuse` in place (members become ``LowRankLinear`` / ``nn.Linear`` again)."""
    n = 0
    for parent in list(model.modules()):
        for leaf, child in list(parent.named_children()):
            if not isinstance(child, FusedMember):
                continue
            st, i = child.stacked, child.index
            rows = slice(st.offsets[i], st.offsets[i + 1])
            with torch.no_grad():
                w = st.weight[rows].clone()
                if child.A is not None:
                    new: nn.Module = LowRankLinear.from_factors(
                        child.A.weight, w, child.bias, like=child.A.weight
                    )
                else:
                    bias = None if st.bias is None else st.bias[rows].clone()
                    new = nn.Linear(
                        w.shape[1],
                        w.shape[0],
                        bias=bias is not None,
                        dtype=w.dtype,
                        device=w.device,
                    )
                    new.weight.copy_(w)
                    if bias is not None:
                        new.bias.copy_(bias)
            setattr(parent, leaf, new)
        for leaf, child in list(parent.named_children()):
            if isinstance(child, StackedInput):
                delattr(parent, leaf)
                n += 1
    return n


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily unfused (for saving in the unchanged format); fused again afterwards."""
    stacks = [m for m in model.modules() if isinstance(m, StackedInput)]
    if not stacks:
        yield model
        return
    dense = any(st.dense for st in stacks)
    plain = any(st.plain for st in stacks)
    del stacks
    unfuse(model)
    try:
        yield model
    finally:
        fuse(model, dense=dense, plain_groups=plain)
