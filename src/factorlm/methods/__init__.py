"""Built-in methods; importing this package registers them."""

from factorlm.methods import (  # noqa: F401
    asvd,
    distill,
    fwsvd,
    lorap,
    modular,
    nsvd,
    svd,
    svdllm,
    trainingfree,  # noqa: F401  (registers the block compressors)
)
from factorlm.methods.base import (
    METHODS,
    Decomposition,
    MethodSpec,
    factorize,
    get_method,
    register,
)

__all__ = ["METHODS", "Decomposition", "MethodSpec", "factorize", "get_method", "register"]
