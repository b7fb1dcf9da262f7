"""The values that travel between the engine, tasks and hypergradient methods.

Plain NamedTuples and frozen dataclasses, no behaviour: every layer imports this module and it
imports none of them (``hoexp.task``, ``hoexp.method`` and ``hoexp.engine`` stay free of cycles).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hoexp.optim import Optimizer
    from hoexp.task.base import Task

Params = dict[str, Tensor]
HParams = dict[str, Tensor]


class Batch(NamedTuple):
    """One batch: inputs, targets, and the dropout noise drawn with it (``None``: no dropout).

    The noise is drawn once, when the batch is drawn, so the training loss of a batch is a
    deterministic function of ``(params, raw)``: every HVP of a solve and every unrolled step sees
    the same function. A plain ``(x, y)`` tuple is accepted wherever a batch is read.
    """

    x: Tensor
    y: Tensor
    noise: Mapping[str, Tensor] | None = None


def noise_of(batch: tuple) -> Mapping[str, Tensor] | None:
    """The dropout noise of ``batch`` (a :class:`Batch` or a plain ``(x, y)`` tuple), or None."""
    return batch[2] if len(batch) > 2 else None


class InnerState(NamedTuple):
    """The inner problem's state: weights, inner-optimizer state, inner steps taken so far."""

    params: Params
    opt_state: dict[str, Any]
    step: int = 0


class Stepper(Protocol):
    """One plain training step as the run executes it (eager or ``torch.compile``'d, under autocast, fp16-scaled:
    :meth:`hoexp.engine.runtime.Runtime.step`; the default, :func:`hoexp.method.base.eager_step`).

    Returns the new weights and optimizer state, the loss, and ``‖∇_w L_T‖`` (None unless ``norm``, or where
    the step was skipped: an fp16 overflow leaves the weights and state as they were)."""

    def __call__(
        self,
        task: Task,
        inner_opt: Optimizer,
        params: Params,
        opt_state: dict[str, Any],
        raw: HParams,
        batch: tuple,
        overrides: dict[str, Any],
        norm: bool = True,
        /,
    ) -> tuple[Params, dict[str, Any], Tensor, Tensor | None]: ...


class Ranks(Protocol):
    """The processes a method spreads its own work over (``spreads_over_ranks``: ES particles), handed down by the
    engine: this process's ``rank`` of ``size``, and ``gather(x)``: every rank's ``x`` (the same shape on each)
    concatenated along dimension 0 in rank order, on every rank."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def gather(self, x: Tensor) -> Tensor: ...


class OuterStep(NamedTuple):
    """Everything one hypergradient step gets, as values; the engine drew the batches.

    ``train``: the ``inner_steps`` training batches; ``extra``: ``method.extra_batches`` more from the
    same stream (IFT: the batch of the Hessian and mixed term); ``val``: the outer objective's batch;
    ``step``: the run's plain training step, which ``train_inner`` takes (None: eager, in the run's dtype);
    ``ranks``: the processes a method that ``spreads_over_ranks`` shares its work with (None: one process).
    """

    task: Task
    inner_opt: Optimizer
    inner: InnerState
    raw: HParams
    train: Sequence[tuple]
    extra: Sequence[tuple]
    val: tuple
    on_step: Callable[[], None] | None = None
    step: Stepper | None = None
    ranks: Ranks | None = None

    @property
    def inner_steps(self) -> int:
        return len(self.train)


# A method's ``OuterResult.scalars`` key for the seconds it spent compiling (warm-up) within the outer step: the
# engine logs it and keeps it out of ``time/outer_step_s`` and the solver time (hoexp.engine.budget).
COMPILE_S = "time/compile_s"


class OuterResult(NamedTuple):
    """What one outer step returns: the hypergradient (``None``: no outer update, as ``none`` and
    ``hd``), the new inner state, and host scalars under their final TensorBoard tags
    (``inner/loss``, ``hypergrad/norm``, ``solver/residual``, ...)."""

    hypergrad: HParams | None
    inner: InnerState
    scalars: Mapping[str, float]


@dataclass(frozen=True)
class RunSettings:
    """The loop's settings (today's ``run`` config group, minus what :func:`hoexp.config.build.build` consumed).

    ``labels`` name the run's parts in the console and ``summary.json`` (method, hp, dataset, model);
    ``hparams`` are logged to TensorBoard's hparams table at the end.
    """

    outer_steps: int
    inner_steps: int
    seed: int = 0
    eval_every: int = 1
    histogram_every: int = 10
    log_every: int = 1  # outer steps between logged scalars; evaluations, the first and the last step always log
    reset_inner: bool = False
    warmup: int = 0  # outer steps of plain training (the method is not called) before the first hypergradient
    warmup_until_plateau: bool = False  # and then until an evaluation's validation loss is above the best before it
    outer_objective: str = "val"  # val | train
    max_nonfinite: int = 3
    checkpoint_every: int = 0
    threads: int = 0  # 0: one thread for small CPU models, torch's default otherwise
    progress: bool = False
    precision: str = "fp32"
    resume: str = "false"  # false | true | auto
    max_time: float | None = None  # seconds of solver time (time/solver_s) after which the run ends; None: no budget
    labels: Mapping[str, str] = field(default_factory=dict)
    hparams: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: Any) -> RunSettings:
        """The settings of a validated :class:`hoexp.config.Spec`."""
        run = spec.run
        labels = {
            "method": spec.method.name,
            "hp": spec.hp_name,
            "dataset": spec.dataset.name,
            "model": spec.model.name,
        }
        hparams = {
            **labels,
            "seed": run.seed,
            "inner_steps": run.inner_steps,
            "outer_steps": run.outer_steps,
            "inner_optim": spec.inner_optim.name,
            "inner_lr": getattr(spec.inner_optim, "lr", None),  # an optimizer of your own may have none
            "outer_optim": spec.outer_optim.name,
            "outer_lr": getattr(spec.outer_optim, "lr", None),
        }
        hparams = {k: v for k, v in hparams.items() if v is not None}
        return cls(
            outer_steps=run.outer_steps,
            inner_steps=run.inner_steps,
            seed=run.seed,
            eval_every=run.eval_every,
            histogram_every=run.histogram_every,
            log_every=run.log_every,
            reset_inner=run.reset_inner,
            warmup=run.warmup,
            warmup_until_plateau=run.warmup_until_plateau,
            outer_objective=run.outer_objective,
            max_nonfinite=run.max_nonfinite,
            checkpoint_every=run.checkpoint_every,
            threads=run.threads,
            progress=run.progress,
            precision=run.precision,
            resume=run.resume,
            max_time=run.max_time,
            labels=labels,
            hparams=hparams,
        )


class Runnable(Protocol):
    """What :func:`hoexp.run` reads of an experiment (:class:`Experiment`, or what :func:`hoexp.config.build.build` returns)."""

    @property
    def task(self) -> Task: ...

    @property
    def method(self) -> Any: ...

    @property
    def inner_opt(self) -> Optimizer: ...

    @property
    def outer_opt(self) -> Optimizer: ...

    @property
    def settings(self) -> RunSettings: ...

    @property
    def device(self) -> torch.device: ...


@dataclass
class Experiment:
    """Everything one run needs, as plain objects: what :func:`hoexp.run` runs.

    :func:`hoexp.config.build.build` makes one from a config (its ``Experiment`` has these attributes too);
    from Python, build the task, method and optimizers yourself.
    """

    task: Task
    method: Any  # a hypergradient method (hoexp.method.base.HypergradMethod)
    inner_opt: Optimizer
    outer_opt: Optimizer
    settings: RunSettings
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    spec: Any = None  # the config it was built from, if any (checked on resume)
    runtime: Any = None  # hoexp.engine.runtime.Runtime (precision, compile, process group); None: eager, one process
