from factorlm.rank.allocation import (
    RankPolicy,
    achieved_ratio,
    check_ratio,
    estimated_time_ratio,
    global_ranks,
    kernel_rank,
    lowrank_params,
    max_useful_rank,
    rank_policy,
    uniform_ranks,
)

__all__ = [
    "RankPolicy",
    "achieved_ratio",
    "check_ratio",
    "estimated_time_ratio",
    "global_ranks",
    "lowrank_params",
    "kernel_rank",
    "max_useful_rank",
    "rank_policy",
    "uniform_ranks",
]
