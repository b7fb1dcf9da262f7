"""The hypergradient-method protocol and the plain inner training loop it builds on.

A method is a callable on one :class:`~hoexp.types.OuterStep`: it advances the inner problem over
the ``inner_steps`` batches the engine drew (``s.train``) and returns an
:class:`~hoexp.types.OuterResult`: a hypergradient for the raw hyperparameters (or ``None``), the
new inner state and its scalars under their final TensorBoard tags. IFT methods train plainly and
differentiate at the end; others (unrolled, forward, reversible) differentiate through the steps.

Capabilities are attributes, never names: ``extra_batches`` (training batches drawn beyond
``inner_steps``: the IFT's Hessian batch), ``needs_stationary_point`` (implicit differentiation:
only families that move the inner optimum), ``differentiates_steps`` (no compiled or mixed-precision
plain steps), and optionally ``needs_pathwise_hp`` (the hypergradient differentiates the training loss
in λ, so a family whose ``pathwise`` is false, hard dropout masks, is refused; a method that does not
say is taken to need it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.func import grad_and_value

from hoexp import tree
from hoexp.errors import HoexpError
from hoexp.method.compiling import quiet_compile
from hoexp.optim import Optimizer
from hoexp.task.base import Task
from hoexp.types import InnerState, OuterResult, OuterStep


class HyperMethod(Protocol):
    """A hypergradient method (see the module doc)."""

    name: str

    @property
    def extra_batches(self) -> int: ...  # training batches drawn after the inner steps' (IFT, fd: 1)

    @property
    def needs_stationary_point(self) -> bool: ...  # implicit differentiation: the family must move w*

    @property
    def differentiates_steps(self) -> bool: ...  # through the inner steps (no compiled or mixed-precision steps)

    def __call__(self, s: OuterStep, /) -> OuterResult: ...


HypergradMethod = HyperMethod


def take(stream: Iterator[tuple], n: int) -> list[tuple]:
    """The next ``n`` batches of ``stream``."""
    return [next(stream) for _ in range(n)]


def outer_step(
    method: HyperMethod,
    task: Task,
    inner_opt: Optimizer,
    inner: InnerState,
    raw: dict[str, Tensor],
    stream: Iterator[tuple],
    val: tuple,
    inner_steps: int,
    on_step: Callable[[], None] | None = None,
) -> OuterResult:
    """One outer step of ``method`` on the next ``inner_steps + method.extra_batches`` batches of ``stream``
    (what the engine does; for scripts and tests that hold a stream)."""
    train = take(stream, inner_steps)
    extra = take(stream, method.extra_batches)
    return method(OuterStep(task, inner_opt, inner, raw, train, extra, val, on_step))


def scalars(**tagged: Any) -> dict[str, float]:
    """Host floats under their tags, the ``None`` ones left out (``scalars(**{"inner/loss": 0.3})``)."""
    return {k: float(v) for k, v in tagged.items() if v is not None}


def inner_scalars(loss: Tensor | float | None, gnorm: Tensor | float | None) -> dict[str, float]:
    """``inner/grad_norm`` and ``inner/loss`` of the last training step (two host reads where present)."""
    return scalars(**{"inner/grad_norm": gnorm, "inner/loss": loss})


def with_extra(base: Mapping[str, float], extra: Mapping[str, float]) -> dict[str, float]:
    return {**base, **{k: float(v) for k, v in extra.items()}}


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


def plain_step(
    problem: Task,
    inner_opt: Optimizer,
    params: dict[str, Tensor],
    opt_state: dict[str, Any],
    raw: dict[str, Tensor],
    batch: tuple,
    overrides: dict[str, Any],
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
    key = (inner_opt.name, inner_opt.init, inner_opt.update)  # its functions: `defaults` is a dict
    fn = problem.compiled.get(key)
    if fn is None:
        compiled = torch.compile(functools.partial(plain_step, problem, inner_opt))
        first = [True]

        def fn(*args: Any) -> Any:
            if not first[0]:
                return compiled(*args)
            try:
                with quiet_compile():  # tracing and kernels happen here: without their known-harmless messages
                    out = compiled(*args)
            except Exception as e:  # a missing C++ compiler, an unsupported operation, ...
                raise HoexpError(
                    f"compile=true: torch.compile failed ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); run with "
                    "compile=false"
                ) from e
            first[0] = False
            return out

        problem.compiled[key] = fn
    return fn


def step_from_gradient(
    problem: Task, inner_opt: Optimizer, state: InnerState, raw: dict[str, Tensor], grad: Tensor, t: int
) -> InnerState:
    """One training step (inner step ``t`` of the outer step) from a gradient already computed at
    ``state.params``: ``grad`` is ``∂L_T/∂w`` flat (a fused IFT's ``create_graph`` gradient). No pass."""
    grads = tree.unflatten(grad.detach(), state.params)
    overrides = problem.family.optimizer_overrides(tree.detached(raw), t)
    with torch.no_grad():
        params, opt_state = inner_opt.update(state.params, grads, state.opt_state, **overrides)
    return InnerState(params, opt_state, state.step + 1)


def train_inner(
    problem: Task,
    inner_opt: Optimizer,
    state: InnerState,
    raw: dict[str, Tensor],
    batches: Iterable[tuple],
    steps: int | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[InnerState, Tensor | None, Tensor | None]:
    """``steps`` plain (non-differentiable) training steps at fixed hyperparameters, on the next batches of
    ``batches`` (a stream, or a sequence: ``steps`` None takes all of it).

    Returns the new state and the last step's training loss and gradient norm (0-d tensors,
    not synced to the host). Cost: one forward and backward pass per step. With
    ``problem.compile`` each step is :func:`plain_step` compiled by ``torch.compile``.
    """
    if steps is None:
        batches = list(batches)
        steps = len(batches)
    it = iter(batches)
    raw = tree.detached(raw)
    params, opt_state = state.params, state.opt_state
    step_fn = compiled_step(problem, inner_opt) if problem.compile else None
    scaler = problem.precision if problem.precision is not None and problem.precision.scaled else None
    loss = gnorm = None
    for t in range(steps):
        batch = next(it)
        overrides = problem.family.optimizer_overrides(raw, t)
        if step_fn is not None:
            params, opt_state, loss, gnorm = step_fn(params, opt_state, raw, batch, overrides)
        else:
            w = tree.detached(params, requires_grad=True)
            loss = problem.step_loss(w, raw, batch)
            if scaler is not None:  # fp16: gradients of scale·L, unscaled; an overflowing step is skipped
                scale = scaler.scale()
                grads = {k: g / scale for k, g in zip(w.keys(), torch.autograd.grad(loss * scale, list(w.values())))}
                finite = tree.all_finite(grads.values())
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
