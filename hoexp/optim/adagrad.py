"""Functional Adagrad, matching torch.optim.Adagrad (dense gradients)."""

from __future__ import annotations

from typing import cast

import torch

from hoexp.bounds import NonNegFloat, PositiveFloat
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
    check_nonneg(
        lr=lr,
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        initial_accumulator_value=initial_accumulator_value,
        eps=eps,
    )
    lr0, decay0, wd0, init_acc, eps0 = lr, lr_decay, weight_decay, initial_accumulator_value, eps

    def init(params: Params) -> OptState:
        return {"step": 0, "sum": {k: torch.full_like(p, init_acc) for k, p in params.items()}}

    def update(
        params: Params,
        grads: Params,
        state: OptState,
        lr: Hyper | None = None,
        weight_decay: Hyper | None = None,
        lr_decay: Hyper | None = None,
        eps: Hyper | None = None,
    ) -> tuple[Params, OptState]:
        check_grads(params, grads)
        step = state["step"] + 1
        values = tuple(
            d if o is None else o for o, d in ((lr, lr0), (weight_decay, wd0), (lr_decay, decay0), (eps, eps0))
        )
        if fast_path((params, grads, state["sum"]), values):
            numbers = cast("tuple[float, ...]", values)  # fast_path: all Python numbers
            return _adagrad_multi_tensor(params, grads, state, step, *numbers)
        new_params: Params = {}
        new_sum: Params = {}
        for k, p in params.items():
            g = grads[k]
            wd = hyper(weight_decay, wd0, k)
            if not is_zero(wd):
                g = add_scaled(g, wd, p)
            clr = hyper(lr, lr0, k) / (1 + (step - 1) * hyper(lr_decay, decay0, k))
            s = add_scaled_mul(state["sum"][k], 1, g, g)
            new_sum[k] = s
            std = safe_sqrt(s) + hyper(eps, eps0, k)
            new_params[k] = add_scaled_div(p, -clr, g, std)
        return new_params, {"step": step, "sum": new_sum}

    return Optimizer(
        "adagrad",
        init,
        update,
        dict(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
        ),
    )


def _adagrad_multi_tensor(
    params: Params, grads: Params, state: OptState, step: int, lr: float, wd: float, lr_decay: float, eps: float
) -> tuple[Params, OptState]:
    """The Adagrad update for all tensors at once (``torch._foreach_*``), same operations as the loop."""
    keys = list(params)
    p = [params[k] for k in keys]
    g: TensorList = [grads[k] for k in keys]
    if wd != 0:
        g = torch._foreach_add(g, p, alpha=wd)
    s = torch._foreach_addcmul([state["sum"][k] for k in keys], g, g, value=1)
    std = torch._foreach_sqrt(s)
    torch._foreach_add_(std, eps)
    clr = lr / (1 + (step - 1) * lr_decay)
    return dict(zip(keys, torch._foreach_addcdiv(p, g, std, value=-clr))), {"step": step, "sum": dict(zip(keys, s))}
