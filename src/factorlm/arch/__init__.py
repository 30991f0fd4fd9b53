from factorlm.arch.modules import (
    block_targets,
    get_blocks,
    get_spec,
    linear_shape,
    linear_weight,
    model_targets,
    unfuse_experts,
)
from factorlm.arch.registry import ARCHITECTURES, ArchSpec, MLPUnit, register_architecture

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "MLPUnit",
    "block_targets",
    "get_blocks",
    "get_spec",
    "linear_shape",
    "linear_weight",
    "model_targets",
    "register_architecture",
    "unfuse_experts",
]
