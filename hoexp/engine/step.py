"""One outer step as a run takes it: the batches it draws, in which order, and the call of the method.

The loop (:func:`hoexp.engine.loop.loop`) and the tools that replay a run (``hoexp check``, ``--horizon``)
step through here, so a method sees the same batches in both: ``inner_steps`` training batches, then
``method.extra_batches`` more from the same stream (the IFT's Hessian batch), then one batch of the outer
objective (that order written once, :func:`hoexp.method.base.draw_step`). The engine draws them, so a method gets values and the streams' positions (checkpointed with the
run) are the engine's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from hoexp.engine.runtime import runtime_of
from hoexp.method.base import HyperMethod, draw_step
from hoexp.method.implicit import NoHO
from hoexp.task.base import Task
from hoexp.types import HParams, InnerState, OuterResult, OuterStep, Runnable, Stepper

PLAIN = NoHO("warmup")  # plain training: inner_steps steps, no hypergradient (the warm-up, a tool's reference run)


def draw(
    exp: Runnable,
    method: HyperMethod,
    inner: InnerState,
    raw: HParams,
    train: Iterator[tuple],
    val: Iterator[tuple],
    on_step: Callable[[], None] | None = None,
    task: Task | None = None,
    step: Stepper | None = None,
) -> OuterStep:
    """The :class:`~hoexp.types.OuterStep` ``method`` gets at ``(inner, raw)``: the next ``inner_steps +
    method.extra_batches`` batches of ``train``, then the next of ``val`` (both streams advance). ``task``,
    ``step``: the run's task and plain step, made once per run by the loop (None: the runtime's,
    :meth:`~hoexp.engine.runtime.Runtime.task` and :meth:`~hoexp.engine.runtime.Runtime.step`)."""
    runtime = runtime_of(exp)
    task = runtime.task(exp.task) if task is None else task
    step = runtime.step() if step is None else step
    inner_steps, ranks = exp.settings.inner_steps, runtime.ranks()
    return draw_step(method, task, exp.inner_opt, inner, raw, train, val, inner_steps, on_step, step, ranks)


def advance(
    exp: Runnable,
    method: HyperMethod,
    inner: InnerState,
    raw: HParams,
    train: Iterator[tuple],
    val: Iterator[tuple],
    on_step: Callable[[], None] | None = None,
    task: Task | None = None,
    step: Stepper | None = None,
) -> OuterResult:
    """One outer step of ``method`` on the batches :func:`draw` draws."""
    return method(draw(exp, method, inner, raw, train, val, on_step, task, step))
