"""Differentiable, out-of-place optimizers (optax-style ``init``/``update`` pairs).

    opt = build_optimizer("adam", lr=1e-3)
    state = opt.init(params)
    params, state = opt.update(params, grads, state, lr=lr_tensor)

See :mod:`hoexp.optim.base` for the override conventions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hoexp.optim.adagrad import adagrad
from hoexp.optim.adam import adam, adamw
from hoexp.optim.base import Hyper, Optimizer, OptState, Params, hyper, reference_paths, safe_sqrt, set_fast_paths
from hoexp.optim.rmsprop import rmsprop
from hoexp.optim.sgd import momentum, nesterov, sgd
from hoexp.optim.sign import sign_sgd

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    f.__name__: f for f in (sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad, sign_sgd)
}


def build_optimizer(name: str, **kwargs: Any) -> Optimizer:
    """Build a registered optimizer by name, e.g. ``build_optimizer("sgd", lr=0.1)``."""
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer '{name}'; valid: {', '.join(sorted(OPTIMIZERS))}") from None
    return factory(**kwargs)


__all__ = [
    "OPTIMIZERS",
    "Hyper",
    "OptState",
    "Optimizer",
    "Params",
    "adagrad",
    "adam",
    "adamw",
    "build_optimizer",
    "hyper",
    "momentum",
    "nesterov",
    "reference_paths",
    "rmsprop",
    "safe_sqrt",
    "set_fast_paths",
    "sgd",
    "sign_sgd",
]
