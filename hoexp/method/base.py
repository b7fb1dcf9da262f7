"""The hypergradient-method protocol and the plain inner training loop it builds on.

A method owns one outer step: it advances the inner problem by ``inner_steps`` training steps
and returns a hypergradient for the raw hyperparameters (or ``None`` for ``method=none``).
IFT methods train plainly and differentiate at the end; methods added later (unrolled, forward,
reversible) differentiate through the steps themselves, hence the shape of the protocol.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.func import grad_and_value

from hoexp import tree
from hoexp.errors import HoexpError
from hoexp.optim import Optimizer
from hoexp.precision import all_finite
from hoexp.task.base import Task
from hoexp.types import InnerState


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

    def outer_step(self, problem: Task, inner_opt: Optimizer, state: InnerState, raw: dict[str, Tensor],
                   train_batches: Iterator[tuple], val_batch: tuple, inner_steps: int,
                   on_inner_step: Callable[[], None] | None = None,
                   ) -> tuple[dict[str, Tensor] | None, InnerState, StepStats]: ...


@runtime_checkable
class CarriesState(Protocol):
    """A method that carries state from one outer step to the next (a warm-started solver's vector,
    forward-mode tangents kept since step 0). The runner checkpoints it with the run and restores it
    on resume; ``load_state_dict({})`` resets it (``reset_inner``). ``state_dict`` returns tensors the
    method will replace, never mutate in place (the runner keeps references, not copies).
    ``carries`` (optional, default true) says whether this configuration carries anything: when false,
    an outer step depends only on its inputs (diagnostics then need not replay earlier steps)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def plain_step(problem: Task, inner_opt: Optimizer, params: dict[str, Tensor], opt_state: dict[str, Any],
               raw: dict[str, Tensor], batch: tuple, overrides: dict[str, Any],
               ) -> tuple[dict[str, Tensor], dict[str, Any], Tensor, Tensor]:
    """One training step as a pure function: ``g = ∇_w L_T(w, λ; batch)``, ``w, s ← update(w, g, s)``.

    Returns the new weights and optimizer state, the loss and ``‖g‖``. This is what ``run.compile``
    hands to ``torch.compile`` (``torch.func.grad_and_value``: no autograd state crosses the call).
    """
    grads, loss = grad_and_value(lambda w: problem.step_loss(w, raw, batch))(params)
    new_params, new_state = inner_opt.update(params, grads, opt_state, **overrides)
    return new_params, new_state, loss, tree.norm(grads)


def compiled_step(problem: Task, inner_opt: Optimizer) -> Callable[..., Any]:
    """:func:`plain_step` for ``(problem, inner_opt)`` through ``torch.compile``, made once per pair
    (``problem.compiled`` holds it: the problem owns its compiled code, nothing global).

    The first call compiles (seconds to a minute); a failure there is reported as one line.
    """
    key = inner_opt
    fn = problem.compiled.get(key)
    if fn is None:
        compiled = torch.compile(functools.partial(plain_step, problem, inner_opt))
        first = [True]

        def fn(*args: Any) -> Any:
            if not first[0]:
                return compiled(*args)
            try:
                out = compiled(*args)
            except Exception as e:  # a missing C++ compiler, an unsupported operation, ...
                raise HoexpError(f"compile=true: torch.compile failed ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); run with "
                                 "compile=false") from e
            first[0] = False
            return out

        problem.compiled[key] = fn
    return fn


def train_inner(problem: Task, inner_opt: Optimizer, state: InnerState, raw: dict[str, Tensor],
                batches: Iterator[tuple], steps: int, on_step: Callable[[], None] | None = None,
                ) -> tuple[InnerState, Tensor | None, Tensor | None]:
    """``steps`` plain (non-differentiable) training steps at fixed hyperparameters.

    Returns the new state and the last step's training loss and gradient norm (0-d tensors,
    not synced to the host). Cost: one forward and backward pass per step. With
    ``problem.compile`` each step is :func:`plain_step` compiled by ``torch.compile``.
    """
    raw = tree.detached(raw)
    params, opt_state = state.params, state.opt_state
    step_fn = compiled_step(problem, inner_opt) if problem.compile else None
    scaler = problem.precision if problem.precision is not None and problem.precision.scaled else None
    loss = gnorm = None
    for t in range(steps):
        batch = next(batches)
        overrides = problem.family.optimizer_overrides(raw, t)
        if step_fn is not None:
            params, opt_state, loss, gnorm = step_fn(params, opt_state, raw, batch, overrides)
        else:
            w = tree.detached(params, requires_grad=True)
            loss = problem.step_loss(w, raw, batch)
            if scaler is not None:  # fp16: gradients of scale·L, unscaled; an overflowing step is skipped
                scale = scaler.scale()
                grads = {k: g / scale for k, g in zip(w.keys(), torch.autograd.grad(loss * scale, list(w.values())))}
                finite = all_finite(grads)
                scaler.update(finite)
                if not finite:
                    if on_step is not None:
                        on_step()
                    continue
            else:
                grads = dict(zip(w.keys(), torch.autograd.grad(loss, list(w.values()))))
            with torch.no_grad():
                params, opt_state = inner_opt.update(params, grads, opt_state, **overrides)
            if t == steps - 1:  # only the last step's norm is returned
                gnorm = tree.norm(grads)
        if on_step is not None:
            on_step()
    return InnerState(params, opt_state, state.step + steps), (None if loss is None else loss.detach()), gnorm
