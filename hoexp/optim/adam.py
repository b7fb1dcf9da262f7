"""Functional Adam / AdamW, matching torch.optim.Adam and torch.optim.AdamW."""

from __future__ import annotations

from typing import cast

import torch

from hoexp.bounds import NonNegFloat, PositiveFloat, Probability
from hoexp.optim.base import (
    Hyper,
    Optimizer,
    OptState,
    Params,
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

__all__ = ["adam", "adamw"]


def _adam_like(
    name: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, amsgrad: bool, decoupled: bool
) -> Optimizer:
    check_nonneg(lr=lr, eps=eps, weight_decay=weight_decay)
    for i, beta in enumerate(betas):
        if isinstance(beta, (int, float)) and not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    lr0, (b10, b20), eps0, wd0 = lr, betas, eps, weight_decay

    def init(params: Params) -> OptState:
        state: OptState = {"step": 0, "exp_avg": zeros_like_params(params), "exp_avg_sq": zeros_like_params(params)}
        if amsgrad:
            state["max_exp_avg_sq"] = zeros_like_params(params)
        return state

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
        check_grads(params, grads)
        step = state["step"] + 1
        values = tuple(
            d if o is None else o for o, d in ((lr, lr0), (weight_decay, wd0), (beta1, b10), (beta2, b20), (eps, eps0))
        )
        buffers = [state["exp_avg"], state["exp_avg_sq"]] + ([state["max_exp_avg_sq"]] if amsgrad else [])
        if fast_path((params, grads, *buffers), values):
            numbers = cast("tuple[float, ...]", values)  # fast_path: all Python numbers
            return _adam_multi_tensor(params, grads, state, step, *numbers, amsgrad=amsgrad, decoupled=decoupled)
        new_params: Params = {}
        new_m: Params = {}
        new_v: Params = {}
        new_vmax: Params = {}
        for k, p in params.items():
            g = grads[k]
            lr_k = hyper(lr, lr0, k)
            wd = hyper(weight_decay, wd0, k)
            b1 = hyper(beta1, b10, k)
            b2 = hyper(beta2, b20, k)
            if not is_zero(wd):
                if decoupled:
                    p = p * (1 - lr_k * wd)
                else:
                    g = add_scaled(g, wd, p)
            m = lerp(state["exp_avg"][k], g, 1 - b1)
            v = add_scaled_mul(state["exp_avg_sq"][k] * b2, 1 - b2, g, g)
            new_m[k], new_v[k] = m, v
            if amsgrad:
                v = torch.maximum(state["max_exp_avg_sq"][k], v)
                new_vmax[k] = v
            bias_correction1 = 1 - b1**step
            bias_correction2 = 1 - b2**step
            step_size = lr_k / bias_correction1
            denom = safe_sqrt(v) / bias_correction2**0.5 + hyper(eps, eps0, k)
            new_params[k] = add_scaled_div(p, -step_size, m, denom)
        new_state: OptState = {"step": step, "exp_avg": new_m, "exp_avg_sq": new_v}
        if amsgrad:
            new_state["max_exp_avg_sq"] = new_vmax
        return new_params, new_state

    return Optimizer(
        name, init, update, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
    )


def _adam_multi_tensor(
    params: Params,
    grads: Params,
    state: OptState,
    step: int,
    lr: float,
    wd: float,
    b1: float,
    b2: float,
    eps: float,
    *,
    amsgrad: bool,
    decoupled: bool,
) -> tuple[Params, OptState]:
    """The Adam/AdamW update for all tensors at once (``torch._foreach_*``), same operations as the loop.

    ``√v`` is a plain square root here: ``v`` is a sum of squares, never negative.
    """
    keys = list(params)
    p: TensorList = [params[k] for k in keys]
    g: TensorList = [grads[k] for k in keys]
    if wd != 0:
        if decoupled:
            p = torch._foreach_mul(p, 1 - lr * wd)
        else:
            g = torch._foreach_add(g, p, alpha=wd)
    m = torch._foreach_lerp([state["exp_avg"][k] for k in keys], g, 1 - b1)
    v = torch._foreach_mul([state["exp_avg_sq"][k] for k in keys], b2)
    torch._foreach_addcmul_(v, g, g, value=1 - b2)
    new_state: OptState = {"step": step, "exp_avg": dict(zip(keys, m)), "exp_avg_sq": dict(zip(keys, v))}
    if amsgrad:
        v = torch._foreach_maximum([state["max_exp_avg_sq"][k] for k in keys], v)
        new_state["max_exp_avg_sq"] = dict(zip(keys, v))
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, (1 - b2**step) ** 0.5)
    torch._foreach_add_(denom, eps)
    new_p = torch._foreach_addcdiv(p, m, denom, value=-(lr / (1 - b1**step)))
    return dict(zip(keys, new_p)), new_state


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

    ``sqrt`` is :func:`safe_sqrt` (zero derivative at 0). Cost: O(n) flops per
    step, 2n (3n with amsgrad) extra memory. ``update`` overrides: ``lr``,
    ``weight_decay``, ``beta1``, ``beta2``, ``eps``.
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

    Same as :func:`adam` except the decay is applied to the parameter before the
    Adam step, ``p = p * (1 - lr * wd)``, and not added to the gradient.
    Cost: O(n) flops per step, 2n (3n with amsgrad) extra memory.
    """
    return _adam_like("adamw", lr, betas, eps, weight_decay, amsgrad, decoupled=True)
