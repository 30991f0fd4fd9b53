"""Built-in methods; importing this package registers them (see :mod:`factorlm.methods.base`)."""

from factorlm.methods import (  # noqa: F401  (each module registers its method)
    asvd,
    distill,
    fwsvd,
    lorap,
    modular,
    nsvd,
    svd,
    svdllm,
)
from factorlm.methods.base import (
    REGISTRY,
    Decomposition,
    MethodEntry,
    available_methods,
    config_from_dict,
    factorize,
    get_method,
    make_config,
    register,
)
from factorlm.methods.config import FactorizeConfig, MethodConfig

__all__ = [
    "REGISTRY",
    "Decomposition",
    "FactorizeConfig",
    "MethodConfig",
    "MethodEntry",
    "available_methods",
    "config_from_dict",
    "factorize",
    "get_method",
    "make_config",
    "register",
]
