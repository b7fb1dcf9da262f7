"""Functional RMSprop, matching torch.optim.RMSprop."""

from __future__ import annotations

from typing import cast

import torch

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
    check_grads,
    check_nonneg,
    fast_path,
    hyper,
    is_zero,
    lerp,
    safe_sqrt,
    zeros_like_params,
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

    ``sqrt`` is :func:`safe_sqrt`. The momentum buffer exists iff ``momentum != 0``
    at construction (overriding ``momentum`` requires it). Cost: O(n) flops per
    step; n extra memory, +n centered, +n momentum. ``update`` overrides:
    ``lr``, ``weight_decay``, ``momentum``, ``alpha``, ``eps``.
    """
    check_nonneg(lr=lr, eps=eps, momentum=momentum, weight_decay=weight_decay, alpha=alpha)
    lr0, alpha0, eps0, wd0, mu0 = lr, alpha, eps, weight_decay, momentum
    use_buffer = not is_zero(momentum)

    def init(params: Params) -> OptState:
        state: OptState = {"step": 0, "square_avg": zeros_like_params(params)}
        if use_buffer:
            state["momentum_buffer"] = zeros_like_params(params)
        if centered:
            state["grad_avg"] = zeros_like_params(params)
        return state

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
        check_grads(params, grads)
        if not use_buffer and momentum is not None:
            raise ValueError(
                "rmsprop was built with momentum=0 (no momentum buffer); "
                "build it with momentum > 0 to override momentum"
            )
        values = tuple(
            d if o is None else o
            for o, d in ((lr, lr0), (weight_decay, wd0), (alpha, alpha0), (eps, eps0), (momentum, mu0))
        )
        buffers = (
            [state["square_avg"]]
            + ([state["momentum_buffer"]] if use_buffer else [])
            + ([state["grad_avg"]] if centered else [])
        )
        if fast_path((params, grads, *buffers), values):
            numbers = cast("tuple[float, ...]", values)  # fast_path: all Python numbers
            return _rmsprop_multi_tensor(params, grads, state, *numbers, centered=centered, use_buffer=use_buffer)
        return _rmsprop_per_tensor(params, grads, state, values, centered=centered, use_buffer=use_buffer)

    return Optimizer(
        "rmsprop",
        init,
        update,
        dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered),
    )


def _rmsprop_per_tensor(
    params: Params, grads: Params, state: OptState, values: tuple[Hyper, ...], *, centered: bool, use_buffer: bool
) -> tuple[Params, OptState]:
    """The reference path: :func:`_rmsprop_tensor` on each parameter, ``values`` = ``(lr, weight_decay,
    alpha, eps, momentum)`` (numbers, tensors, or per-parameter mappings)."""
    out: dict[str, Params] = {"params": {}, "square_avg": {}, "grad_avg": {}, "momentum_buffer": {}}
    for k, p in params.items():
        new = _rmsprop_tensor(
            p,
            grads[k],
            state["square_avg"][k],
            state["grad_avg"][k] if centered else None,
            state["momentum_buffer"][k] if use_buffer else None,
            *(hyper(None, v, k) for v in values),
        )
        for name, x in zip(out, new):
            if x is not None:
                out[name][k] = x
    new_state: OptState = {"step": state["step"] + 1, "square_avg": out["square_avg"]}
    if use_buffer:
        new_state["momentum_buffer"] = out["momentum_buffer"]
    if centered:
        new_state["grad_avg"] = out["grad_avg"]
    return out["params"], new_state


def _rmsprop_tensor(
    p: torch.Tensor,
    g: torch.Tensor,
    square_avg: torch.Tensor,
    grad_avg: torch.Tensor | None,
    momentum_buffer: torch.Tensor | None,
    lr: Scalar,
    wd: Scalar,
    a: Scalar,
    eps: Scalar,
    mu: Scalar,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One parameter's step: ``(p, square_avg, grad_avg, momentum_buffer)`` after it (``grad_avg`` None
    unless centered, ``momentum_buffer`` None without momentum)."""
    if not is_zero(wd):
        g = add_scaled(g, wd, p)
    sq = add_scaled_mul(square_avg * a, 1 - a, g, g)
    gavg = None
    if grad_avg is not None:
        gavg = lerp(grad_avg, g, 1 - a)
        avg = safe_sqrt(add_scaled_mul(sq, -1, gavg, gavg))
    else:
        avg = safe_sqrt(sq)
    avg = avg + eps
    if momentum_buffer is not None:
        buf = add_scaled_div(momentum_buffer * mu, 1, g, avg)
        return add_scaled(p, -lr, buf), sq, gavg, buf
    return add_scaled_div(p, -lr, g, avg), sq, gavg, None


def _rmsprop_multi_tensor(
    params: Params,
    grads: Params,
    state: OptState,
    lr: float,
    wd: float,
    a: float,
    eps: float,
    mu: float,
    *,
    centered: bool,
    use_buffer: bool,
) -> tuple[Params, OptState]:
    """The RMSprop update for all tensors at once (``torch._foreach_*``), same operations as the loop.

    The centered variance ``s − ḡ²`` is clamped at 0 before the square root, as :func:`safe_sqrt` does.
    """
    keys = list(params)
    p = [params[k] for k in keys]
    g: TensorList = [grads[k] for k in keys]
    if wd != 0:
        g = torch._foreach_add(g, p, alpha=wd)
    sq = torch._foreach_mul([state["square_avg"][k] for k in keys], a)
    torch._foreach_addcmul_(sq, g, g, value=1 - a)
    new_state: OptState = {"step": state["step"] + 1, "square_avg": dict(zip(keys, sq))}
    if centered:
        gavg = torch._foreach_lerp([state["grad_avg"][k] for k in keys], g, 1 - a)
        new_state["grad_avg"] = dict(zip(keys, gavg))
        avg = torch._foreach_addcmul(sq, gavg, gavg, value=-1)
        torch._foreach_clamp_min_(avg, 0.0)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(sq)
    torch._foreach_add_(avg, eps)
    if use_buffer:
        buf = torch._foreach_mul([state["momentum_buffer"][k] for k in keys], mu)
        torch._foreach_addcdiv_(buf, g, avg, value=1)
        new_state["momentum_buffer"] = dict(zip(keys, buf))
        new_p = torch._foreach_add(p, buf, alpha=-lr)
    else:
        new_p = torch._foreach_addcdiv(p, g, avg, value=-lr)
    return dict(zip(keys, new_p)), {
        k: new_state[k] for k in ("step", "square_avg", "momentum_buffer", "grad_avg") if k in new_state
    }
