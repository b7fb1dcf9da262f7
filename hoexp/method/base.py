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

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.func import grad_and_value

from hoexp import tree
from hoexp.optim import Optimizer
from hoexp.task.base import Task
from hoexp.types import InnerState, OuterResult, OuterStep, Ranks, Stepper


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
    step: Stepper | None = None,
    ranks: Ranks | None = None,
) -> OuterResult:
    """One outer step of ``method`` on the next ``inner_steps + method.extra_batches`` batches of ``stream``
    (what the engine does; for scripts and tests that hold a stream). ``step``: the plain training step
    (:attr:`OuterStep.step`; None: eager); ``ranks``: :attr:`OuterStep.ranks`."""
    val_stream = iter((val,))
    return method(draw_step(method, task, inner_opt, inner, raw, stream, val_stream, inner_steps, on_step, step, ranks))


def draw_step(
    method: HyperMethod,
    task: Task,
    inner_opt: Optimizer,
    inner: InnerState,
    raw: dict[str, Tensor],
    stream: Iterator[tuple],
    val: Iterator[tuple],
    inner_steps: int,
    on_step: Callable[[], None] | None = None,
    step: Stepper | None = None,
    ranks: Ranks | None = None,
) -> OuterStep:
    """The :class:`OuterStep` ``method`` gets: the next ``inner_steps`` batches of ``stream`` to train on, then
    ``method.extra_batches`` more (the IFT's Hessian batch), then the next of ``val``, in that order (the one
    place that order is written: the engine's loop, its tools and :func:`outer_step` draw through here)."""
    train = take(stream, inner_steps)
    extra = take(stream, method.extra_batches)
    return OuterStep(task, inner_opt, inner, raw, train, extra, next(val), on_step, step, ranks)


def scalars(**tagged: Any) -> dict[str, float]:
    """Host floats under their tags, the ``None`` ones left out (``scalars(**{"inner/loss": 0.3})``)."""
    return {k: float(v) for k, v in tagged.items() if v is not None}


def inner_scalars(loss: Tensor | float | None, gnorm: Tensor | float | None) -> dict[str, float]:
    """``inner/grad_norm`` and ``inner/loss`` of the last training step (two host reads where present)."""
    return scalars(**{"inner/grad_norm": gnorm, "inner/loss": loss})


def gradients(outputs: Tensor | Sequence[Tensor], inputs: list[Tensor], cotangents: Sequence[Tensor] | None = None,
              create_graph: bool = False, retain_graph: bool | None = None) -> list[Tensor]:  # fmt: skip
    """``Σ_i cotangent_iᵀ ∂output_i/∂input`` for each input (zeros for inputs the outputs do not read)."""
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    keep = [i for i, o in enumerate(outs) if o.requires_grad]
    if not keep:
        return [torch.zeros_like(x) for x in inputs]
    cots = None if cotangents is None else [c for i, c in enumerate(cotangents) if i in keep]
    got = torch.autograd.grad(
        [outs[i] for i in keep], inputs, cots, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    return tree.fill_none(got, inputs)


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
    *,
    loss: Callable[..., Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any], Tensor, Tensor]:
    """One training step as a pure function: ``g = ∇_w L_T(w, λ; batch)``, ``w, s ← update(w, g, s)``.

    Returns the new weights and optimizer state, the loss and ``‖g‖``. This is what ``run.compile``
    hands to ``torch.compile`` (``torch.func.grad_and_value``: no autograd state crosses the call).
    ``loss``: the training loss to differentiate (default ``problem.train_loss``; the run's under autocast).
    """
    loss_fn = problem.train_loss if loss is None else loss
    grads, value = grad_and_value(lambda w: loss_fn(w, raw, batch))(params)
    new_params, new_state = inner_opt.update(params, grads, opt_state, **overrides)
    return new_params, new_state, value, tree.norm(grads)


def eager_step(
    problem: Task,
    inner_opt: Optimizer,
    params: dict[str, Tensor],
    opt_state: dict[str, Any],
    raw: dict[str, Tensor],
    batch: tuple,
    overrides: dict[str, Any],
    norm: bool = True,
    *,
    loss: Callable[..., Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any], Tensor, Tensor | None]:
    """The default :class:`~hoexp.types.Stepper`: one plain training step, eager (one forward and backward pass).
    Returns the new weights and optimizer state, the loss and ``‖g‖`` (None unless ``norm``)."""
    w = tree.detached(params, requires_grad=True)
    value = (problem.train_loss if loss is None else loss)(w, raw, batch)
    grads = dict(zip(w.keys(), torch.autograd.grad(value, list(w.values()))))
    with torch.no_grad():
        params, opt_state = inner_opt.update(params, grads, opt_state, **overrides)
    return params, opt_state, value, (tree.norm(grads) if norm else None)


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
    step: Stepper | None = None,
) -> tuple[InnerState, Tensor | None, Tensor | None]:
    """``steps`` plain (non-differentiable) training steps at fixed hyperparameters, on the next batches of
    ``batches`` (a stream, or a sequence: ``steps`` None takes all of it).

    Returns the new state and the last step's training loss and gradient norm (0-d tensors,
    not synced to the host). Cost: one forward and backward pass per step. ``step``: the run's plain
    step (``OuterStep.step``: compiled, mixed precision); None: :func:`eager_step`.
    """
    if steps is None:
        batches = list(batches)
        steps = len(batches)
    it = iter(batches)
    raw = tree.detached(raw)
    params, opt_state = state.params, state.opt_state
    step_fn = eager_step if step is None else step
    loss = gnorm = None
    for t in range(steps):
        overrides = problem.family.optimizer_overrides(raw, t)
        last = t == steps - 1  # only the last step's norm is returned
        params, opt_state, loss, norm = step_fn(problem, inner_opt, params, opt_state, raw, next(it), overrides, last)
        if last:
            gnorm = norm
        if on_step is not None:
            on_step()
    return InnerState(params, opt_state, state.step + steps), (None if loss is None else loss.detach()), gnorm
