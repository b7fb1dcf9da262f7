"""Functional RMSprop, matching torch.optim.RMSprop."""

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

__all__ = ["rmsprop"]


def rmsprop(
    lr: PositiveFloat = 1e-2,
    alpha: Probability = 0.99,
    eps: NonNegFloat = 1e-8,
    weight_decay: NonNegFloat = 0.0,
    momentum: Probability = 0.0,
    centered: bool = False,
) -> Optimizer:
    """RMSprop, exactly as ``torch.optim.RMSprop``.

    Per parameter::

        g   = g + wd * p
        s   = alpha * s + (1 - alpha) * g^2
        avg = sqrt(s - gbar^2) + eps,  gbar = lerp(gbar, g, 1 - alpha)   (centered)
        avg = sqrt(s) + eps                                              (otherwise)
        buf = mu * buf + g / avg;  p = p - lr * buf    (momentum buffer enabled)
        p   = p - lr * g / avg                          (otherwise)

    ``sqrt`` is :func:`safe_sqrt`. The momentum buffer exists iff ``momentum != 0`` at construction (overriding
    ``momentum`` requires it). Cost: O(n) flops per step; n extra memory, +n centered, +n momentum. ``update``
    overrides: ``lr``, ``weight_decay``, ``momentum``, ``alpha``, ``eps``.
    """
    check_nonneg(lr=lr, eps=eps, momentum=momentum, weight_decay=weight_decay, alpha=alpha)
    defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered)
    use_buffer = not is_zero(momentum)
    kept = {"square_avg": True, "momentum_buffer": use_buffer, "grad_avg": centered}

    def update(
        params: Params,
        grads: Params,
        state: OptState,
        lr: Hyper | None = None,
        weight_decay: Hyper | None = None,
        momentum: Hyper | None = None,
        alpha: Hyper | None = None,
        eps: Hyper | None = None,
    ) -> tuple[Params, OptState]:
        if not use_buffer and momentum is not None:
            raise ValueError(
                "rmsprop was built with momentum=0 (no momentum buffer); "
                "build it with momentum > 0 to override momentum"
            )
        values = resolve(defaults, lr=lr, weight_decay=weight_decay, alpha=alpha, eps=eps, momentum=momentum)
        return apply(_rmsprop_one, _rmsprop_many, params, grads, state, kept, values)

    return Optimizer("rmsprop", partial(init_state, kept=kept), update, dict(defaults))


def _rmsprop_one(
    p: Tensor,
    g: Tensor,
    sq: Tensor,
    buf: Tensor | None,
    gavg: Tensor | None,
    *,
    lr: Scalar,
    weight_decay: Scalar,
    alpha: Scalar,
    eps: Scalar,
    momentum: Scalar,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The reference path, one parameter at a time: ``(p, square_avg, momentum_buffer, grad_avg)`` after the
    step (``momentum_buffer`` None without momentum, ``grad_avg`` None unless centered)."""
    if not is_zero(weight_decay):
        g = add_scaled(g, weight_decay, p)
    sq = add_scaled_mul(sq * alpha, 1 - alpha, g, g)
    if gavg is not None:
        gavg = lerp(gavg, g, 1 - alpha)
        avg = safe_sqrt(add_scaled_mul(sq, -1, gavg, gavg)) + eps
    else:
        avg = safe_sqrt(sq) + eps
    if buf is None:
        return add_scaled_div(p, -lr, g, avg), sq, None, gavg
    buf = add_scaled_div(buf * momentum, 1, g, avg)
    return add_scaled(p, -lr, buf), sq, buf, gavg


def _rmsprop_many(
    p: TensorList,
    g: TensorList,
    sq: TensorList,
    buf: TensorList | None,
    gavg: TensorList | None,
    *,
    lr: float,
    weight_decay: float,
    alpha: float,
    eps: float,
    momentum: float,
) -> tuple[TensorList, TensorList, TensorList | None, TensorList | None]:
    """:func:`_rmsprop_one` for all tensors at once (``torch._foreach_*``), the same operations; the centered
    variance ``s − ḡ²`` is clamped at 0 before the square root, as :func:`safe_sqrt` does."""
    if weight_decay != 0:
        g = torch._foreach_add(g, p, alpha=weight_decay)
    sq = torch._foreach_mul(sq, alpha)
    torch._foreach_addcmul_(sq, g, g, value=1 - alpha)
    if gavg is not None:
        gavg = torch._foreach_lerp(gavg, g, 1 - alpha)
        avg = torch._foreach_addcmul(sq, gavg, gavg, value=-1)
        torch._foreach_clamp_min_(avg, 0.0)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(sq)
    torch._foreach_add_(avg, eps)
    if buf is None:
        return torch._foreach_addcdiv(p, g, avg, value=-lr), sq, None, gavg
    buf = torch._foreach_mul(buf, momentum)
    torch._foreach_addcdiv_(buf, g, avg, value=1)
    return torch._foreach_add(p, buf, alpha=-lr), sq, buf, gavg
