"""The hypergradient-method protocol and the plain inner training loop it builds on.

A method owns one outer step: it advances the inner problem by ``inner_steps`` training steps
and returns a hypergradient for the raw hyperparameters (or ``None`` for ``method=none``).
IFT methods train plainly and differentiate at the end; methods added later (unrolled, forward,
reversible) differentiate through the steps themselves, hence the shape of the protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from hoexp import tree
from hoexp.optim import Optimizer
from hoexp.problem import Batch, Problem


@dataclass
class InnerState:
    params: dict[str, Tensor]
    opt_state: dict[str, Any]
    step: int = 0  # inner steps taken so far


@dataclass
class StepStats:
    """What one outer step measured, for logging (host floats; None when not applicable)."""

    inner_grad_norm: float | None = None
    inner_loss: float | None = None
    hypergrad_norm: float | None = None
    residual: float | None = None
    solver_iterations: int | None = None
    hvps: int | None = None
    info: str = ""
    extra: dict[str, float] = field(default_factory=dict)


class HyperMethod(Protocol):
    name: str

    def outer_step(self, problem: Problem, inner_opt: Optimizer, state: InnerState, raw: dict[str, Tensor],
                   train_batches: Iterator[Batch], val_batch: Batch, inner_steps: int,
                   on_inner_step: Callable[[], None] | None = None,
                   ) -> tuple[dict[str, Tensor] | None, InnerState, StepStats]: ...


def train_inner(problem: Problem, inner_opt: Optimizer, state: InnerState, raw: dict[str, Tensor],
                batches: Iterator[Batch], steps: int, on_step: Callable[[], None] | None = None,
                ) -> tuple[InnerState, Tensor | None, Tensor | None]:
    """``steps`` plain (non-differentiable) training steps at fixed hyperparameters.

    Returns the new state and the last step's training loss and gradient norm (0-d tensors,
    not synced to the host). Cost: one forward and backward pass per step.
    """
    raw = tree.detached(raw)
    params, opt_state = state.params, state.opt_state
    loss = gnorm = None
    for t in range(steps):
        batch = next(batches)
        w = tree.detached(params, requires_grad=True)
        loss = problem.train_loss(w, raw, batch)
        grads = torch.autograd.grad(loss, list(w.values()))
        with torch.no_grad():
            params, opt_state = inner_opt.update(params, dict(zip(w.keys(), grads)), opt_state,
                                                 **problem.family.optimizer_overrides(raw, t))
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if on_step is not None:
            on_step()
    return InnerState(params, opt_state, state.step + steps), (None if loss is None else loss.detach()), gnorm
