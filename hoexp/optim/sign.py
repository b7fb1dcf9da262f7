"""Sign descent with momentum on the signs: an outer optimizer for heavy-tailed hypergradients."""

from __future__ import annotations

from typing import Annotated

import torch

from hoexp.bounds import PositiveFloat, Range
from hoexp.optim.base import Hyper, Optimizer, OptState, Params, check_grads, hyper, zeros_like_params

__all__ = ["sign_sgd"]


def sign_sgd(
    lr: PositiveFloat, momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9, *, name: str = "sign_sgd"
) -> Optimizer:
    """``m ← μ·m + (1 − μ)·sign(g)``, ``p ← p − lr·m / (1 − μᵗ)`` (``m₀ = 0``, step ``t`` from 1; μ = 0 is
    signSGD, Bernstein et al. 2018, with the momentum taken over the signs rather than the gradients).

    Each coordinate moves at most ``lr`` per step, at the rate its recent gradients agree in sign, so a rare
    huge gradient moves it no further than a typical one. That is what a noisy, heavy-tailed hypergradient
    needs: one differentiated through Adam steps of an LSTM has spikes ~100× its median, and one spike sets
    Adam's moments (and so the direction) for tens of outer steps. Cost: O(n) flops and n extra memory per
    step. ``update`` overrides: ``lr``, ``momentum``.
    """
    lr0, mu0 = lr, momentum

    def init(params: Params) -> OptState:
        return {"step": 0, "sign_avg": zeros_like_params(params)}

    def update(
        params: Params, grads: Params, state: OptState, lr: Hyper | None = None, momentum: Hyper | None = None
    ) -> tuple[Params, OptState]:
        check_grads(params, grads)
        t = state["step"] + 1
        new_params: Params = {}
        new_avg: Params = {}
        for k, p in params.items():
            mu = hyper(momentum, mu0, k)
            m = state["sign_avg"][k] * mu + (1 - mu) * torch.sign(grads[k])
            new_avg[k] = m
            new_params[k] = p - hyper(lr, lr0, k) * m / (1 - mu**t)
        return new_params, {"step": t, "sign_avg": new_avg}

    return Optimizer(name, init, update, dict(lr=lr, momentum=momentum))
