"""Options of low-rank feature distillation (:mod:`factorlm.methods.distill`): defaults,
validation, and the choices made when an option is left to None (the measurements behind them
are in ``bench/results/``)."""

from __future__ import annotations

import math
from typing import Any

from factorlm.errors import ConfigError
from factorlm.methods.base import METHODS

LOSS_TERMS = ("joint", "teacher", "student")
#: inits that are whole block compressors rather than per-matrix factorizations (distill.BLOCK_INITS)
BLOCK_INIT_NAMES = ("lorap", "modular")

#: Options of the distillation itself (everything else is passed to the ``init`` method).
DEFAULTS: dict[str, Any] = {
    # None: "lorap" with the uniform allocation (the most accurate start: LoRAP's block, low-rank
    # attention + pruned MLP, both trained), "svd-llm" when ranks come from elsewhere (allocation
    # "global" / "bottom-first", fixed_rank, min_rank), see :func:`resolve_init`
    "init": None,
    # None: per init, see :func:`default_lr`. The paper's 8.6e-5 is tuned for 13 M tokens (~1600
    # steps of 8 x 1024 tokens); with the default calibration (64 x 512 tokens) it barely moves
    # the factors
    "lr": None,
    "betas": (0.9, 0.999),
    "weight_decay": 0.0,  # decay would pull the factors towards 0, not towards the init
    "epochs": 1,
    "steps": None,  # optimizer steps per block; overrides epochs (cycles over the batches)
    # sequences per optimizer step (None: one calibration batch): more, smaller steps at the
    # same cost per epoch
    "micro_batch": 2,
    "holdout": 0.1,  # fraction (float < 1) or number (int) of the last batches kept out
    "loss_terms": "joint",
    "train_norms": False,
    # rebalance each factorization's rank-one components before training (same product, both
    # factors with the same entry size: see :func:`factorlm.methods.linalg.balance_factors`).
    # None: on after the lorap/modular inits, off otherwise (see :func:`default_balance`)
    "balance": None,
    # restore the init when training ends with a higher held-out block loss than it started
    "keep_best": True,
    "shuffle": False,  # shuffle the (micro-)batches each epoch with the per-block generator
    "autocast": True,  # bf16 autocast on CUDA (CPU always trains in the weights' dtype)
}


def _check(name: str, ok: bool, want: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"distill option {name} must be {want}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_distill_options(o: dict[str, Any]) -> None:
    """Cheap validation of the distillation options (init method options are checked by it)."""
    _check(
        "init",
        o["init"] is None or (o["init"] in METHODS or o["init"] in BLOCK_INIT_NAMES),
        f"one of {sorted([*METHODS, *BLOCK_INIT_NAMES])}",
        o["init"],
    )
    lr = o["lr"]
    _check("lr", lr is None or (_is_num(lr) and lr > 0), "None or a positive number", lr)
    b = o["betas"]
    _check(
        "betas",
        isinstance(b, (tuple, list)) and len(b) == 2 and all(_is_num(x) and 0 <= x < 1 for x in b),
        "two numbers in [0, 1)",
        b,
    )
    wd = o["weight_decay"]
    _check("weight_decay", _is_num(wd) and wd >= 0, "a number >= 0", wd)
    _check("epochs", _is_int(o["epochs"]) and o["epochs"] >= 1, "an integer >= 1", o["epochs"])
    s = o["steps"]
    _check("steps", s is None or (_is_int(s) and s >= 0), "None or an integer >= 0", s)
    mb = o["micro_batch"]
    _check("micro_batch", mb is None or (_is_int(mb) and mb >= 1), "None or an integer >= 1", mb)
    h = o["holdout"]
    _check(
        "holdout",
        (_is_int(h) and h >= 0) or (isinstance(h, float) and 0 <= h < 1),
        "a fraction in [0, 1) or a number of batches >= 0",
        h,
    )
    _check("loss_terms", o["loss_terms"] in LOSS_TERMS, f"one of {LOSS_TERMS}", o["loss_terms"])
    bal = o["balance"]
    _check("balance", bal is None or isinstance(bal, bool), "None, True or False", bal)
    for flag in ("train_norms", "keep_best", "shuffle", "autocast"):
        _check(flag, isinstance(o[flag], bool), "True or False", o[flag])


def resolve_init(init: str | None, allocation: str, options: dict[str, Any]) -> str:
    """The init method: ``init`` when given; else LoRAP's block with the uniform allocation (the most
    accurate start measured) and svd-llm when the ranks come from an allocation policy or a fixed
    or minimum rank (which LoRAP, allocating ranks and channels itself, does not take)."""
    if init is not None:
        return init
    if allocation == "uniform" and not {"fixed_rank", "min_rank"} & set(options):
        return "lorap"
    return "svd-llm"


def default_lr(init: str) -> float:
    """AdamW learning rate when none is given: larger after the plain SVD init, which starts
    further from the block's optimum, and after LoRAP's block (balanced attention factors, pruned
    MLP linears); ``bench/results/distill-options-smollm2.md`` has the measurements."""
    return {"lorap": 3e-3, "modular": 3e-3, "svd": 1e-3}.get(init, 3e-4)


def default_balance(init: str) -> bool:
    """Whether the factors are rebalanced when ``balance`` is None: after the lorap init."""
    return init in ("lorap", "modular")


def holdout_count(n_batches: int, holdout: int | float) -> int:
    """How many of the last batches are held out (always leaves one to train on)."""
    if n_batches <= 1:
        return 0
    if isinstance(holdout, float):
        k = max(1, round(holdout * n_batches)) if holdout > 0 else 0
    else:
        k = holdout
    return min(k, n_batches - 1)
