"""Functional SGD (plain, heavy-ball momentum, Nesterov), matching torch.optim.SGD."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import torch
from torch import Tensor

from hoexp.bounds import NonNegFloat, PositiveFloat, Probability, Range
from hoexp.optim.base import (
    Hyper,
    Optimizer,
    OptState,
    Params,
    Scalar,
    TensorList,
    add_scaled,
    apply,
    check_nonneg,
    init_state,
    is_zero,
    resolve,
)

__all__ = ["momentum", "nesterov", "sgd"]


def sgd(
    lr: PositiveFloat,
    momentum: Probability = 0.0,
    dampening: Annotated[float, Range(ge=0, le=1)] = 0.0,
    weight_decay: NonNegFloat = 0.0,
    nesterov: bool = False,
    *,
    name: str = "sgd",
) -> Optimizer:
    """SGD with optional momentum, exactly as ``torch.optim.SGD``.

    Per parameter ``p`` with gradient ``g``::

        d   = g + wd * p                       (coupled weight decay)
        buf = d                    at step 1   (if momentum buffer enabled)
        buf = mu * buf + (1 - dampening) * d   afterwards
        d   = d + mu * buf  (nesterov)  or  d = buf
        p   = p - lr * d

    The momentum buffer (``state["momentum_buffer"]``) exists iff ``momentum != 0`` at construction; overriding
    ``momentum`` in ``update`` requires it. Cost: O(n) flops per step; memory O(n) extra for the buffer (none without
    momentum). ``update(params, grads, state, lr=None, momentum=None, dampening=None, weight_decay=None)`` accepts
    per-call overrides (number, 0-d tensor, or per-parameter dict).
    """
    check_nonneg(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    use_buffer = not is_zero(momentum)
    kept = {"momentum_buffer": use_buffer}
    one, many = partial(_sgd_one, nesterov=nesterov), partial(_sgd_many, nesterov=nesterov)

    def update(
        params: Params,
        grads: Params,
        state: OptState,
        lr: Hyper | None = None,
        momentum: Hyper | None = None,
        dampening: Hyper | None = None,
        weight_decay: Hyper | None = None,
    ) -> tuple[Params, OptState]:
        if not use_buffer and (momentum is not None or dampening is not None):
            raise ValueError(
                f"optimizer '{name}' was built with momentum=0 (no momentum buffer); "
                "build it with momentum > 0 to override momentum/dampening"
            )
        values = resolve(defaults, lr=lr, weight_decay=weight_decay, t=state["step"] + 1)
        if use_buffer:
            values.update(resolve(defaults, momentum=momentum, dampening=dampening))
        if values["t"] == 1:  # the buffer is not read at step 1 (it starts as a copy of d): params stand in for it
            state = {**state, "momentum_buffer": params}
        return apply(one, many, params, grads, state, kept, values)

    return Optimizer(name, partial(init_state, kept=kept), update, dict(defaults))


def _sgd_one(
    p: Tensor,
    d: Tensor,
    buf: Tensor | None,
    *,
    lr: Scalar,
    weight_decay: Scalar,
    t: int,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    nesterov: bool,
) -> tuple[Tensor, Tensor | None]:
    """The reference path, one parameter: ``(p, momentum_buffer)`` after the step (None without momentum)."""
    if not is_zero(weight_decay):
        d = add_scaled(d, weight_decay, p)
    if buf is not None:
        buf = d.clone() if t == 1 else add_scaled(buf * momentum, 1 - dampening, d)
        d = add_scaled(d, momentum, buf) if nesterov else buf
    return add_scaled(p, -lr, d), buf


def _sgd_many(
    p: TensorList,
    d: TensorList,
    buf: TensorList | None,
    *,
    lr: float,
    weight_decay: float,
    t: int,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool,
) -> tuple[TensorList, TensorList | None]:
    """:func:`_sgd_one` for all tensors at once (``torch._foreach_*``), the same operations."""
    if weight_decay != 0:
        d = torch._foreach_add(d, p, alpha=weight_decay)
    if buf is not None:
        if t == 1:
            buf = [x.clone() for x in d]
        else:
            buf = torch._foreach_mul(buf, momentum)
            torch._foreach_add_(buf, d, alpha=1 - dampening)
        d = torch._foreach_add(d, buf, alpha=momentum) if nesterov else buf
    return torch._foreach_add(p, d, alpha=-lr), buf


def momentum(lr: float, momentum: float = 0.9, dampening: float = 0.0, weight_decay: float = 0.0) -> Optimizer:
    """Heavy-ball momentum SGD preset: ``sgd(lr, momentum, dampening, weight_decay)``."""
    return sgd(lr, momentum, dampening, weight_decay, nesterov=False, name="momentum")


def nesterov(lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> Optimizer:
    """Nesterov momentum SGD preset: ``sgd(lr, momentum, 0, weight_decay, nesterov=True)``."""
    return sgd(lr, momentum, 0.0, weight_decay, nesterov=True, name="nesterov")
