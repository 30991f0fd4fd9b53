from factorlm.nn.lowrank import LowRankLinear

__all__ = ["LowRankLinear"]
