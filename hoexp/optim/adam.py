"""Functional Adam / AdamW, matching torch.optim.Adam and torch.optim.AdamW."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from hoexp.bounds import NonNegFloat, PositiveFloat, Probability
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
    init_state,
    is_zero,
    lerp,
    resolve,
    safe_sqrt,
)

__all__ = ["adam", "adamw"]


def _adam_like(
    name: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, amsgrad: bool, decoupled: bool
) -> Optimizer:
    check_nonneg(lr=lr, eps=eps, weight_decay=weight_decay)
    for i, beta in enumerate(betas):
        if isinstance(beta, (int, float)) and not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
    factory = dict(defaults, beta1=betas[0], beta2=betas[1])
    kept = {"exp_avg": True, "exp_avg_sq": True, "max_exp_avg_sq": amsgrad}
    one, many = partial(_adam_one, decoupled=decoupled), partial(_adam_many, decoupled=decoupled)

    def update(
        params: Params,
        grads: Params,
        state: OptState,
        lr: Hyper | None = None,
        weight_decay: Hyper | None = None,
        beta1: Hyper | None = None,
        beta2: Hyper | None = None,
        eps: Hyper | None = None,
    ) -> tuple[Params, OptState]:
        values = resolve(
            factory, lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, t=state["step"] + 1
        )
        return apply(one, many, params, grads, state, kept, values)

    return Optimizer(name, partial(init_state, kept=kept), update, defaults)


def _adam_one(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    *,
    lr: Scalar,
    weight_decay: Scalar,
    beta1: Scalar,
    beta2: Scalar,
    eps: Scalar,
    t: int,
    decoupled: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The reference path, one parameter at a time: ``(p, exp_avg, exp_avg_sq, max_exp_avg_sq)`` after the step."""
    if not is_zero(weight_decay):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = add_scaled(g, weight_decay, p)
    m = lerp(m, g, 1 - beta1)
    v = add_scaled_mul(v * beta2, 1 - beta2, g, g)
    vmax = None if vmax is None else torch.maximum(vmax, v)
    denom = safe_sqrt(v if vmax is None else vmax) / (1 - beta2**t) ** 0.5 + eps
    return add_scaled_div(p, -(lr / (1 - beta1**t)), m, denom), m, v, vmax


def _adam_many(
    p: TensorList,
    g: TensorList,
    m: TensorList,
    v: TensorList,
    vmax: TensorList | None,
    *,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    t: int,
    decoupled: bool,
) -> tuple[TensorList, TensorList, TensorList, TensorList | None]:
    """:func:`_adam_one` for all tensors at once (``torch._foreach_*``), the same operations; ``√v`` is a plain square
    root here: ``v`` is a sum of squares, never negative."""
    if weight_decay != 0:
        if decoupled:
            p = torch._foreach_mul(p, 1 - lr * weight_decay)
        else:
            g = torch._foreach_add(g, p, alpha=weight_decay)
    m = torch._foreach_lerp(m, g, 1 - beta1)
    v = torch._foreach_mul(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    vmax = None if vmax is None else torch._foreach_maximum(vmax, v)
    denom = torch._foreach_sqrt(v if vmax is None else vmax)
    torch._foreach_div_(denom, (1 - beta2**t) ** 0.5)
    torch._foreach_add_(denom, eps)
    return torch._foreach_addcdiv(p, m, denom, value=-(lr / (1 - beta1**t))), m, v, vmax


def adam(
    lr: PositiveFloat = 1e-3,
    betas: tuple[Probability, Probability] = (0.9, 0.999),
    eps: PositiveFloat = 1e-8,
    weight_decay: NonNegFloat = 0.0,
    amsgrad: bool = False,
) -> Optimizer:
    """Adam, exactly as ``torch.optim.Adam`` (coupled L2 weight decay).

    At step t (1-based), per parameter::

        g = g + wd * p
        m = lerp(m, g, 1 - b1);   v = b2 * v + (1 - b2) * g^2
        vhat = max(vhat, v)  (amsgrad) else v
        denom = sqrt(vhat) / sqrt(1 - b2^t) + eps
        p = p - (lr / (1 - b1^t)) * m / denom

    ``sqrt`` is :func:`safe_sqrt` (zero derivative at 0). Cost: O(n) flops per step, 2n (3n with amsgrad) extra
    memory. ``update`` overrides: ``lr``, ``weight_decay``, ``beta1``, ``beta2``, ``eps``.
    """
    return _adam_like("adam", lr, betas, eps, weight_decay, amsgrad, decoupled=False)


def adamw(
    lr: PositiveFloat = 1e-3,
    betas: tuple[Probability, Probability] = (0.9, 0.999),
    eps: PositiveFloat = 1e-8,
    weight_decay: NonNegFloat = 1e-2,
    amsgrad: bool = False,
) -> Optimizer:
    """AdamW, exactly as ``torch.optim.AdamW`` (decoupled weight decay).

    Same as :func:`adam` except the decay is applied to the parameter before the Adam step, ``p = p * (1 - lr * wd)``,
    and not added to the gradient. Cost: O(n) flops per step, 2n (3n with amsgrad) extra memory.
    """
    return _adam_like("adamw", lr, betas, eps, weight_decay, amsgrad, decoupled=True)
