"""How this process runs a problem: device, data-parallel context, precision and the compile cache.

The problem packages know no run mode: a task is its losses, streams and evaluation, and a method trains
through the plain step it is handed (:attr:`hoexp.types.OuterStep.step`). This module holds what the run
configured, in one object built once (:func:`hoexp.config.build.build`) with the process group's context
handed to it, never read from the process group again:

* :meth:`Runtime.step`: the plain training step (eager, or ``torch.compile``'d with ``compile=true``; under
  autocast with ``precision=bf16|fp16``, fp16 with dynamic loss scaling);
* :meth:`Runtime.task`: the task whose losses average their derivatives over the ranks (data-parallel);
* :meth:`Runtime.streams`: the task's streams, each rank keeping its shard of every global batch;
* :meth:`Runtime.ranks`: for a method that spreads its own work over the processes instead (``spread``: ES
  particles), the ranks to share it with; then every rank draws whole batches and the task is not synced;
* :meth:`Runtime.state_dict`: fp16's loss scale (checkpointed under ``precision_state``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hoexp import tree
from hoexp.engine import distributed
from hoexp.engine.precision import Precision
from hoexp.errors import HoexpError
from hoexp.method.base import eager_step, plain_step
from hoexp.method.compiling import quiet_compile
from hoexp.optim import Optimizer
from hoexp.task.base import BatchStream, Task
from hoexp.types import Params, Stepper, noise_of

Loss = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], tuple], Tensor]


@dataclass
class Runtime:
    """The run's device, process group, precision and compile cache (see the module doc)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: distributed.Context = field(default_factory=distributed.Context)
    precision: Precision | None = None  # None: plain steps in the run's dtype
    compile: bool = False  # plain training steps through torch.compile
    spread: bool = False  # the method spreads its own work over the ranks (not data-parallel): Runtime.ranks
    compiled: dict = field(default_factory=dict, repr=False)  # (id(task), inner optimizer) → (task, compiled step)

    # ----------------------------------------------------------------------------- the plain step
    def step_loss(self, task: Task) -> Loss:
        """The training loss a plain step differentiates: ``task.train_loss``, under autocast with a precision."""
        precision = self.precision
        if precision is None or precision.dtype is None:
            return task.train_loss

        def loss(params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: tuple) -> Tensor:
            with precision.autocast():
                return task.train_loss(params, raw, batch).float()

        return loss

    def step(self) -> Stepper:
        """This run's plain training step (:class:`hoexp.types.Stepper`)."""
        if self.compile or (self.precision is not None and self.precision.dtype is not None):
            return self._configured_step
        return eager_step

    def _configured_step(
        self,
        task: Task,
        inner_opt: Optimizer,
        params: Params,
        opt_state: dict[str, Any],
        raw: Params,
        batch: tuple,
        overrides: dict[str, Any],
        norm: bool = True,
    ) -> tuple[Params, dict[str, Any], Tensor, Tensor | None]:
        """The compiled step (it computes ``‖g‖`` at every step, in its graph), or the step under autocast; fp16:
        gradients of ``scale · L``, unscaled, and a step whose gradients are not finite is skipped (the weights and
        state come back unchanged) and halves the scale (:class:`~hoexp.engine.precision.Precision`)."""
        if self.compile:
            return self.compiled_step(task, inner_opt)(params, opt_state, raw, batch, overrides)
        assert self.precision is not None
        step_loss = self.step_loss(task)
        if not self.precision.scaled:
            return eager_step(task, inner_opt, params, opt_state, raw, batch, overrides, norm, loss=step_loss)
        w = tree.detached(params, requires_grad=True)
        loss = step_loss(w, raw, batch)
        scale = self.precision.scale()
        grads = {k: g / scale for k, g in zip(w.keys(), torch.autograd.grad(loss * scale, list(w.values())))}
        finite = tree.all_finite(grads.values())
        self.precision.update(finite)
        if not finite:
            return params, opt_state, loss, None
        with torch.no_grad():
            params, opt_state = inner_opt.update(params, grads, opt_state, **overrides)
        return params, opt_state, loss, tree.norm(grads) if norm else None

    def compiled_step(self, task: Task, inner_opt: Optimizer) -> Callable[..., Any]:
        """:func:`~hoexp.method.base.plain_step` for ``(task, inner_opt)`` through ``torch.compile``, made once per
        pair (held here: the run owns its compiled code, nothing global). The first call compiles (seconds to a
        minute); a failure there is reported as one line."""
        key = (id(task), inner_opt.name, inner_opt.init, inner_opt.update)  # its functions: `defaults` is a dict
        if key in self.compiled:
            return self.compiled[key][1]
        compiled = torch.compile(functools.partial(plain_step, task, inner_opt, loss=self.step_loss(task)))
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
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); run with compile=false"
                ) from e
            first[0] = False
            return out

        self.compiled[key] = (task, fn)  # the task kept alive with its id
        return fn

    # ----------------------------------------------------------------------------- data-parallel
    @property
    def data_parallel(self) -> bool:
        """Several processes, each on its shard of every batch (unless the method spreads its own work)."""
        return self.dist.active and not self.spread

    def task(self, task: Task) -> Task:
        """``task`` as the methods see it: in a data-parallel run, its losses read ``(params, raw)`` through
        :func:`~hoexp.engine.distributed.sync` (their derivatives are the mean over the ranks)."""
        return SyncedTask(task) if self.data_parallel else task

    def ranks(self) -> distributed.Gatherer | None:
        """The ranks a method that spreads its work shares it with (:class:`~hoexp.types.Ranks`); None otherwise."""
        return distributed.Gatherer(self.dist) if self.dist.active and self.spread else None

    def streams(self, task: Task, seed: int, outer_objective: str) -> tuple[BatchStream, BatchStream]:
        """The training and outer-objective streams; in a data-parallel run every rank draws the global batches
        and keeps its shard."""
        train, val = task.train_stream(seed), task.val_stream(seed, outer_objective)
        if self.data_parallel:
            train = distributed.ShardedStream(train, task.batch_dim, task.model, self.dist)
            val = distributed.ShardedStream(val, task.batch_dim, task.model, self.dist)
        return train, val

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return self.precision.state_dict() if self.precision is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.precision is not None:  # fp16's loss scale
            self.precision.load_state_dict(state)


def preload_lazy_imports() -> None:
    """Import what torch imports on first use inside a step, before the run's clock starts. ``torch.func``'s
    ``grad``/``vjp`` touch ``torch._dynamo`` (through torch's lazy module attribute) at their first call: ~900
    modules, 1-5 s, which ``time/outer_step_s`` would otherwise count in outer step 1 (where nothing else, e.g.
    torchvision for MNIST, imported it already)."""
    import torch._dynamo  # noqa: F401


def runtime_of(exp: Any) -> Runtime:
    """The experiment's runtime; an experiment made in Python without one runs eagerly in one process."""
    runtime = getattr(exp, "runtime", None)
    return runtime if runtime is not None else Runtime(device=exp.device)


class SyncedTask:
    """A task whose losses read ``(params, raw)`` through one :func:`~hoexp.engine.distributed.sync` node, so every
    derivative of them is the mean over the ranks (one all-reduce per gradient or product). ``raw`` goes through
    it only where the batch's data loss reads it (dropout masks from the batch's noise); the validation loss
    reads no hyperparameter. Everything else is the task's own."""

    def __init__(self, task: Task):
        self.base = task

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def _synced(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: tuple | None) -> tuple:
        reads_raw = batch is not None and noise_of(batch) is not None and hasattr(self.base.family, "masks")
        w, r = distributed.sync(params, raw if reads_raw else {})
        return w, (r if reads_raw else raw)

    def train_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: tuple) -> Tensor:
        w, r = self._synced(params, raw, batch)
        return self.base.train_loss(w, r, batch)

    def val_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: tuple) -> Tensor:
        return self.base.val_loss(self._synced(params, raw, None)[0], raw, batch)

    def train_parts(self, batch: tuple) -> tuple[Callable, Callable, Callable]:
        outputs, output_loss, penalty = self.base.train_parts(batch)

        def synced_outputs(w: Mapping[str, Tensor], raw: Mapping[str, Tensor]) -> Tensor:
            return outputs(*self._synced(w, raw, batch))

        return synced_outputs, output_loss, penalty

    def mean_across_ranks(self, x: Tensor) -> Tensor:
        """The mean of ``x`` over the ranks (differentiable): what a method averages itself (PES's particle losses)."""
        return distributed.mean_across_ranks(x)
