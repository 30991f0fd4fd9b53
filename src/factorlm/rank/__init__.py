from factorlm.rank.allocation import (
    achieved_ratio,
    check_ratio,
    global_ranks,
    lowrank_params,
    max_useful_rank,
    uniform_ranks,
)

__all__ = [
    "achieved_ratio",
    "check_ratio",
    "global_ranks",
    "lowrank_params",
    "max_useful_rank",
    "uniform_ranks",
]
