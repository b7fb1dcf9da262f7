"""Functional Adagrad, matching torch.optim.Adagrad (dense gradients)."""

from __future__ import annotations

import torch
from torch import Tensor

from hoexp.bounds import NonNegFloat, PositiveFloat
from hoexp.optim.base import (
    Hyper,
    Optimizer,
    OptState,
    Params,
    Scalar,
    TensorList,
    add_scaled,
    add_scaled_div,
    add_scaled_mul,
    apply,
    check_nonneg,
    is_zero,
    resolve,
    safe_sqrt,
)

__all__ = ["adagrad"]


def adagrad(
    lr: PositiveFloat = 1e-2,
    lr_decay: NonNegFloat = 0.0,
    weight_decay: NonNegFloat = 0.0,
    initial_accumulator_value: NonNegFloat = 0.0,
    eps: NonNegFloat = 1e-10,
) -> Optimizer:
    """Adagrad, exactly as ``torch.optim.Adagrad``.

    At step t (1-based), per parameter::

        g   = g + wd * p
        clr = lr / (1 + (t - 1) * lr_decay)
        s   = s + g^2                       (s starts at initial_accumulator_value)
        p   = p - clr * g / (sqrt(s) + eps)

    ``sqrt`` is :func:`safe_sqrt`. Cost: O(n) flops per step, n extra memory.
    ``update`` overrides: ``lr``, ``weight_decay``, ``lr_decay``, ``eps``.
    """
    defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay)
    defaults.update(initial_accumulator_value=initial_accumulator_value, eps=eps)
    check_nonneg(**defaults)

    def init(params: Params) -> OptState:
        return {"step": 0, "sum": {k: torch.full_like(p, initial_accumulator_value) for k, p in params.items()}}

    def update(
        params: Params,
        grads: Params,
        state: OptState,
        lr: Hyper | None = None,
        weight_decay: Hyper | None = None,
        lr_decay: Hyper | None = None,
        eps: Hyper | None = None,
    ) -> tuple[Params, OptState]:
        values = resolve(defaults, lr=lr, weight_decay=weight_decay, lr_decay=lr_decay, eps=eps, t=state["step"] + 1)
        return apply(_adagrad_one, _adagrad_many, params, grads, state, {"sum": True}, values)

    return Optimizer("adagrad", init, update, dict(defaults))


def _adagrad_one(
    p: Tensor, g: Tensor, s: Tensor, *, lr: Scalar, weight_decay: Scalar, lr_decay: Scalar, eps: Scalar, t: int
) -> tuple[Tensor, Tensor]:
    """The reference path, one parameter at a time: ``(p, sum)`` after the step."""
    if not is_zero(weight_decay):
        g = add_scaled(g, weight_decay, p)
    clr = lr / (1 + (t - 1) * lr_decay)
    s = add_scaled_mul(s, 1, g, g)
    return add_scaled_div(p, -clr, g, safe_sqrt(s) + eps), s


def _adagrad_many(
    p: TensorList, g: TensorList, s: TensorList, *, lr: float, weight_decay: float, lr_decay: float, eps: float, t: int
) -> tuple[TensorList, TensorList]:
    """:func:`_adagrad_one` for all tensors at once (``torch._foreach_*``), the same operations."""
    if weight_decay != 0:
        g = torch._foreach_add(g, p, alpha=weight_decay)
    s = torch._foreach_addcmul(s, g, g, value=1)
    std = torch._foreach_sqrt(s)
    torch._foreach_add_(std, eps)
    return torch._foreach_addcdiv(p, g, std, value=-(lr / (1 + (t - 1) * lr_decay))), s
