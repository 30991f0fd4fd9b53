"""The head structure of a block's attention, for compressing attention as modules.

Read from the config (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, the rotary
share) and from the architecture's data (:attr:`ArchSpec.rope`, :attr:`ArchSpec.qk_norms`); the
block must have separate q/k/v/o linears (roles ``q``, ``k``, ``v``, ``o``) of the head shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from factorlm.arch.registry import ArchSpec


@dataclass(frozen=True)
class HeadLayout:
    """``heads`` query heads sharing ``kv_heads`` key/value heads of ``head_dim`` dimensions
    (query head h reads key/value head h // group, transformers' ``repeat_kv``); the first
    ``rotary`` dimensions of each q/k head are rotated in pairs (i, i + rotary/2)."""

    heads: int
    kv_heads: int
    head_dim: int
    rotary: int
    q: str
    k: str
    v: str
    o: str
    qk_removable: bool  # False when a per-head norm on q/k (qwen3, gemma3) needs every dimension

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def units(self) -> list[tuple[int, ...]]:
        """The q/k dimensions that are removed together: rotary pairs, then single dimensions."""
        half = self.rotary // 2
        pairs = [(i, i + half) for i in range(half)]
        return pairs + [(i,) for i in range(2 * half, self.head_dim)]


def _rotary_share(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None)
    return 1.0 if factor is None else float(factor)


def head_layout(
    config, spec: ArchSpec, block: nn.Module, targets: dict[str, nn.Module]
) -> HeadLayout | None:
    """The block's head layout, or ``None`` when its attention is not four separate linears of
    the head shapes the config describes (fused qkv, state-space blocks, already compressed)."""
    roles = {spec.role_of(rel): rel for rel in targets}
    if not all(r in roles for r in "qkvo"):
        return None
    mods = {r: targets[roles[r]] for r in "qkvo"}
    if not all(type(m) is nn.Linear for m in mods.values()):
        return None
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    shapes_ok = (
        heads % kv == 0
        and mods["q"].out_features == heads * hd
        and mods["k"].out_features == kv * hd
        and mods["v"].out_features == kv * hd
        and mods["o"].in_features == heads * hd
    )
    if not shapes_ok:
        return None
    rotary = int(hd * _rotary_share(config)) if spec.rope else 0
    rotary -= rotary % 2
    has_norm = any(_has(block, p) for p in spec.qk_norms)
    return HeadLayout(heads, kv, hd, rotary, *(roles[r] for r in "qkvo"), not has_norm)


def _has(block: nn.Module, path: str) -> bool:
    try:
        m = block.get_submodule(path)
    except AttributeError:
        return False
    return not isinstance(m, nn.Identity)
