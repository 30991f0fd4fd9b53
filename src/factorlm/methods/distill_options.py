"""The config of low-rank feature distillation (:mod:`factorlm.methods.distill`): its options with
their defaults, their validation, and the choices made when an option is left to None (the
measurements behind them are in ``bench/results/``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from factorlm.errors import ConfigError
from factorlm.methods.config import ALLOCATIONS, MethodConfig, is_int, is_number

LOSS_TERMS = ("joint", "teacher", "student")
#: inits that are whole block compressors rather than per-matrix factorizations (distill.BLOCK_INITS)
BLOCK_INIT_NAMES = ("lorap", "modular")


@dataclass(frozen=True, kw_only=True)
class DistillConfig(MethodConfig):
    """Low-rank feature distillation: a training-free (or LoRAP) init of each block, then its
    factors trained against the dense block. Options not listed here are the init method's
    (``init_options``, checked by that method's config)."""

    method: ClassVar[str] = "distill"
    # the version of modular's defaults a modular init means: 2 its attn_ratio rule, 3 its
    # loss_gamma rule
    version: ClassVar[int] = 3
    allocations: ClassVar[tuple[str, ...]] = ALLOCATIONS  # the init method's config decides

    #: None: "lorap" with the uniform allocation (the most accurate start: LoRAP's block, low-rank
    #: attention + pruned MLP, both trained), "modular" with allocation "loss", "svd-llm" when
    #: ranks come from elsewhere (allocation "global" / "bottom-first", a fixed rank, min_rank),
    #: see :func:`resolve_init`; a built config holds the resolved name
    init: str | None = None
    #: AdamW learning rate; None: :func:`default_lr` of the init. The paper's 8.6e-5 is tuned for
    #: 13 M tokens (~1600 steps of 8 x 1024 tokens); with the default calibration (64 x 512
    #: tokens) it barely moves the factors
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0  # decay would pull the factors towards 0, not towards the init
    epochs: int = 1  # 0: no block-local training (the init, then the end-to-end stage if any)
    steps: int | None = None  # optimizer steps per block; overrides epochs (cycles over batches)
    micro_batch: int | None = 2  # sequences per optimizer step (None: one calibration batch)
    holdout: int | float = 0.1  # fraction (float < 1) or number (int) of the last batches kept out
    loss_terms: str = "joint"
    train_norms: bool = False  # the blocks' norms train too (block pass and end-to-end stage)
    #: rebalance each factorization's rank-one components before training (same product, both
    #: factors with the same entry size: :func:`factorlm.methods.linalg.balance_factors`);
    #: None: on after the lorap/modular inits, off otherwise (:func:`default_balance`)
    balance: bool | None = None
    #: restore the init when training ends with a higher held-out block loss than it started;
    #: the end-to-end stage is undone when it raises both the held-out KL and next-token
    #: cross-entropy
    keep_best: bool = True
    shuffle: bool = False  # shuffle the (micro-)batches each epoch with the per-block generator
    #: bf16 autocast of the training's forward passes on CUDA and on CPUs with native bf16 matmuls
    #: (AMX / AVX512-BF16: about 1.7x faster steps); the end-to-end stage's logits stay in the
    #: head's dtype; other CPUs train in the weights' dtype
    autocast: bool = True
    #: epochs of end-to-end refinement after the block pass (:mod:`factorlm.methods.distill_e2e`):
    #: every targeted linear trained against the dense model's next-token distributions
    e2e_epochs: int = 0
    e2e_lr: float = 1e-4  # AdamW, cosine decay to 0 over the stage
    e2e_micro_batch: int = 1  # sequences per optimizer step
    #: where the stage's optimizer state (fp32 masters, AdamW moments) lives on a GPU: "off" the
    #: device, "on" the host (the step runs on the host's cores; the device keeps the weights,
    #: the gradients and the activations), "auto" the host when the device's free memory would
    #: not hold it
    e2e_offload: str = "auto"
    #: options of the init method (e.g. ``alpha`` for asvd, ``a`` for lorap, ``min_rank``)
    init_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(
        cls,
        ratio: float = 0.2,
        allocation: str | None = None,
        rank: int | None = None,
        **options: Any,
    ) -> DistillConfig:
        """Distillation options by name; every other option goes to the init method."""
        own = set(cls.option_names()) - {"init_options"}
        init_options = dict(options.pop("init_options", None) or {})
        init_options.update({k: options.pop(k) for k in list(options) if k not in own})
        return cls(
            ratio=ratio, allocation=allocation, rank=rank, init_options=init_options, **options
        )

    @classmethod
    def migrate(cls, data: dict) -> dict:
        """A modular init's options migrate as modular's own config of the same version does."""
        options = dict(data.get("options") or {})
        if data["version"] < cls.version and options.get("init") == "modular":
            from factorlm.methods.modular import ModularConfig

            init = ModularConfig.migrate(
                {"version": data["version"], "options": options.get("init_options")}
            )
            data = {**data, "options": {**options, "init_options": init["options"]}}
        return data

    def validate(self) -> None:
        from factorlm.methods.base import decomposition_methods

        inits = sorted([*decomposition_methods(), *BLOCK_INIT_NAMES])
        if self.init is not None and self.init not in inits:
            self.fail("init", "one of " + ", ".join(inits))
        self.check_number("lr", 0, low_open=True, none=True)
        b = self.betas
        if not (
            isinstance(b, (tuple, list))
            and len(b) == 2
            and all(is_number(x) and 0 <= x < 1 for x in b)
        ):
            self.fail("betas", "two numbers in [0, 1)")
        self._set("betas", tuple(float(x) for x in b))
        self.check_number("weight_decay", 0)
        self.check_int("epochs", 0)
        self.check_int("e2e_epochs", 0)
        self.check_number("e2e_lr", 0, low_open=True)
        self.check_int("e2e_micro_batch")
        self.check_choice("e2e_offload", ("auto", "on", "off"))
        self.check_int("steps", 0, none=True)
        self.check_int("micro_batch", none=True)
        h = self.holdout
        if not ((is_int(h) and h >= 0) or (isinstance(h, float) and 0 <= h < 1)):
            self.fail("holdout", "a fraction in [0, 1) or a number of batches >= 0")
        self.check_choice("loss_terms", LOSS_TERMS)
        self.check_bool("balance", none=True)
        for flag in ("train_norms", "keep_best", "shuffle", "autocast"):
            self.check_bool(flag)
        if not isinstance(self.init_options, dict):
            self.fail("init_options", "an object of the init method's options")
        self._set("init", resolve_init(self.init, self.allocation, self.rank, self.init_options))
        self.init_config()  # the init method checks its own options

    def init_config(self) -> MethodConfig:
        """The config of the init method (same ratio, allocation and rank)."""
        from factorlm.methods.base import get_method

        try:
            return get_method(self.init).config.from_options(
                ratio=self.ratio, allocation=self.allocation, rank=self.rank, **self.init_options
            )
        except ConfigError as e:
            raise ConfigError(f"method 'distill' (init {self.init!r}): {e}") from e

    def distill_options(self) -> dict[str, Any]:
        """The options of the distillation itself (without the init method's)."""
        out = self.options()
        out.pop("init_options")
        return out

    def changed_options(self) -> dict[str, Any]:
        out = super().changed_options()
        out.pop("init_options", None)
        return {**out, "init": self.init, **self.init_options}


def resolve_init(
    init: str | None, allocation: str, rank: int | None, init_options: dict[str, Any]
) -> str:
    """The init method: ``init`` when given; else LoRAP's block with the uniform allocation (the most
    accurate start measured) and svd-llm when the ranks come from an allocation policy or a fixed
    or minimum rank (which LoRAP, allocating ranks and channels itself, does not take); modular
    with the loss-aware allocation (its own)."""
    if init is not None:
        return init
    if allocation == "loss":
        return "modular"
    if allocation == "uniform" and rank is None and init_options.get("min_rank") is None:
        return "lorap"
    return "svd-llm"


def default_lr(init: str) -> float:
    """AdamW learning rate when none is given: larger after the plain SVD init, which starts
    further from the block's optimum, and after LoRAP's block (balanced attention factors, pruned
    MLP linears); ``modular``'s block starts close to the block's optimum (refits, compensate),
    where 3e-3 overshoots; ``bench/results/distill-options-smollm2.md`` has the measurements."""
    return {"lorap": 3e-3, "svd": 1e-3}.get(init, 3e-4)


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
