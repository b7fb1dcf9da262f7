"""Functional SGD (plain, heavy-ball momentum, Nesterov), matching torch.optim.SGD."""

from __future__ import annotations

from typing import Annotated, cast

import torch

from hoexp.bounds import NonNegFloat, PositiveFloat, Probability, Range
from hoexp.optim.base import (
    Hyper,
    Optimizer,
    OptState,
    Params,
    TensorList,
    add_scaled,
    check_grads,
    check_nonneg,
    fast_path,
    hyper,
    is_zero,
    zeros_like_params,
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

    The momentum buffer (``state["momentum_buffer"]``) exists iff ``momentum != 0``
    at construction; overriding ``momentum`` in ``update`` requires it.
    Cost: O(n) flops per step; memory O(n) extra for the buffer (none without
    momentum).

    ``update(params, grads, state, lr=None, momentum=None, dampening=None,
    weight_decay=None)`` accepts per-call overrides (number, 0-d tensor, or
    per-parameter dict).
    """
    check_nonneg(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    lr0, mu0, damp0, wd0 = lr, momentum, dampening, weight_decay
    use_buffer = not is_zero(momentum)

    def init(params: Params) -> OptState:
        state: OptState = {"step": 0}
        if use_buffer:
            state["momentum_buffer"] = zeros_like_params(params)
        return state

    def update(
        params: Params,
        grads: Params,
        state: OptState,
        lr: Hyper | None = None,
        momentum: Hyper | None = None,
        dampening: Hyper | None = None,
        weight_decay: Hyper | None = None,
    ) -> tuple[Params, OptState]:
        check_grads(params, grads)
        if not use_buffer and (momentum is not None or dampening is not None):
            raise ValueError(
                f"optimizer '{name}' was built with momentum=0 (no momentum buffer); "
                "build it with momentum > 0 to override momentum/dampening"
            )
        first = state["step"] == 0
        values: tuple[Hyper, ...] = (lr0 if lr is None else lr, wd0 if weight_decay is None else weight_decay)
        if use_buffer:
            values += (mu0 if momentum is None else momentum, damp0 if dampening is None else dampening)
        buffers = () if not use_buffer or first else (state["momentum_buffer"],)
        if fast_path((params, grads, *buffers), values):
            numbers = cast("tuple[float, ...]", values)  # fast_path: all Python numbers
            return _sgd_multi_tensor(params, grads, state, *numbers, nesterov=nesterov, use_buffer=use_buffer)
        return _sgd_per_tensor(params, grads, state, values, nesterov=nesterov, use_buffer=use_buffer)

    return Optimizer(
        name,
        init,
        update,
        dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov),
    )


def _sgd_per_tensor(
    params: Params, grads: Params, state: OptState, values: tuple[Hyper, ...], *, nesterov: bool, use_buffer: bool
) -> tuple[Params, OptState]:
    """The reference path, one parameter at a time; ``values`` = ``(lr, weight_decay)`` plus ``(momentum,
    dampening)`` with a momentum buffer (numbers, tensors, or per-parameter mappings)."""
    first = state["step"] == 0
    new_params: Params = {}
    new_buf: Params = {}
    for k, p in params.items():
        d = grads[k]
        wd = hyper(None, values[1], k)
        if not is_zero(wd):
            d = add_scaled(d, wd, p)
        if use_buffer:
            mu = hyper(None, values[2], k)
            if first:
                buf = d.clone()
            else:
                buf = add_scaled(state["momentum_buffer"][k] * mu, 1 - hyper(None, values[3], k), d)
            new_buf[k] = buf
            d = add_scaled(d, mu, buf) if nesterov else buf
        new_params[k] = add_scaled(p, -hyper(None, values[0], k), d)
    new_state: OptState = {"step": state["step"] + 1}
    if use_buffer:
        new_state["momentum_buffer"] = new_buf
    return new_params, new_state


def _sgd_multi_tensor(
    params: Params,
    grads: Params,
    state: OptState,
    lr: float,
    wd: float,
    mu: float = 0.0,
    damp: float = 0.0,
    *,
    nesterov: bool,
    use_buffer: bool,
) -> tuple[Params, OptState]:
    """The SGD update for all tensors at once (``torch._foreach_*``), same operations as the loop above."""
    keys = list(params)
    p = [params[k] for k in keys]
    d: TensorList = [grads[k] for k in keys]
    if wd != 0:
        d = torch._foreach_add(d, p, alpha=wd)
    new_state: OptState = {"step": state["step"] + 1}
    if use_buffer:
        if state["step"] == 0:
            buf: TensorList = [x.clone() for x in d]
        else:
            buf = torch._foreach_mul([state["momentum_buffer"][k] for k in keys], mu)
            torch._foreach_add_(buf, d, alpha=1 - damp)
        new_state["momentum_buffer"] = dict(zip(keys, buf))
        d = torch._foreach_add(d, buf, alpha=mu) if nesterov else buf
    return dict(zip(keys, torch._foreach_add(p, d, alpha=-lr))), new_state


def momentum(lr: float, momentum: float = 0.9, dampening: float = 0.0, weight_decay: float = 0.0) -> Optimizer:
    """Heavy-ball momentum SGD preset: ``sgd(lr, momentum, dampening, weight_decay)``."""
    return sgd(lr, momentum, dampening, weight_decay, nesterov=False, name="momentum")


def nesterov(lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> Optimizer:
    """Nesterov momentum SGD preset: ``sgd(lr, momentum, 0, weight_decay, nesterov=True)``."""
    return sgd(lr, momentum, 0.0, weight_decay, nesterov=True, name="nesterov")
