"""The run's state between outer steps: start, reset, snapshot and restore.

Everything a resumed run needs is in :class:`RunState` (plus the method's and the precision's own
state, :class:`~hoexp.method.base.CarriesState`); a snapshot holds references, never copies, because
tensors are replaced between steps, never mutated in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hoexp import tree
from hoexp.engine.runtime import runtime_of
from hoexp.method.base import CarriesState
from hoexp.task.base import BatchStream
from hoexp.types import HParams, InnerState, Params, Runnable

# Top-level checkpoint keys every checkpoint has (older ones may lack method_state / precision_state).
CHECKPOINT_KEYS = frozenset(
    "step params opt_state inner_step raw outer_state train_stream val_stream evals hypergradients nonfinite "
    "elapsed_s raw0 torch_rng".split()
)


@dataclass
class RunState:
    """The state after outer step ``step`` (0: before the first)."""

    step: int
    inner: InnerState
    raw: HParams  # the outer optimizer's variables (unconstrained hyperparameters)
    outer_state: dict[str, Any]
    train: BatchStream
    val: BatchStream
    initial: Params  # the weights every outer step restarts from with reset_inner
    raw0: Tensor  # the initial constrained hyperparameters, flat (for hp/moved_fraction)
    evals: list[dict[str, float]] = field(default_factory=list)
    hypergradients: int = 0  # outer updates applied
    nonfinite: int = 0  # non-finite hypergradients in a row
    warned_residual: bool = False
    elapsed_before: float = 0.0  # wall time of earlier runs of this run (resumes)
    solver_s: float = 0.0  # time in training and hypergradients so far, resumes included (hoexp.engine.budget)
    compile_s: float = 0.0  # a method's compile warm-up so far (time/compile_s), kept out of solver_s
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def hp_view(task: Any, raw: HParams) -> Tensor:
    """All constrained hyperparameter values as one flat vector."""
    view = task.family.view(raw)
    return tree.flatten(view.values()) if view else torch.zeros(0)


def hp_in_use(exp: Runnable, state: RunState) -> Tensor:
    """The hyperparameters in use as one flat vector: the family's view of ``state.raw``, unless the method adapts
    them itself and says so with ``method.hp_values(inner_state)`` (HD's learning rate never enters ``raw``; ``None``
    before the method has started them)."""
    own = getattr(exp.method, "hp_values", None)
    values = own(state.inner) if own is not None else None
    return hp_view(exp.task, state.raw) if values is None else values.detach().reshape(-1)


def start(exp: Runnable) -> RunState:
    """The state before the first outer step: the model's weights (cloned), the family's initial
    hyperparameters, fresh optimizer states and the task's streams (in a data-parallel run, this
    rank's shards of the global batches)."""
    task, s = exp.task, exp.settings
    params = {k: v.detach().clone() for k, v in task.model.named_parameters()}
    raw = task.family.init(params)
    raw0 = hp_view(task, raw).detach().clone()
    initial = {k: v.clone() for k, v in params.items()}
    inner, outer_state = InnerState(params, exp.inner_opt.init(params)), exp.outer_opt.init(raw)
    train, val = runtime_of(exp).streams(task, s.seed, s.outer_objective)
    return RunState(0, inner, raw, outer_state, train, val, initial, raw0)


def reset_inner(exp: Runnable, state: RunState) -> InnerState:
    """Fresh weights (the initial ones) and optimizer state; a method's carried state is dropped too,
    since it belongs to the old weights."""
    fresh = {k: v.clone() for k, v in state.initial.items()}
    if isinstance(exp.method, CarriesState):
        exp.method.load_state_dict({})
    return InnerState(fresh, exp.inner_opt.init(fresh), state.inner.step)


def snapshot(exp: Runnable, state: RunState) -> dict[str, Any]:
    """References to everything a checkpoint holds after ``state.step`` (no copies)."""
    return {
        "step": state.step,
        "params": state.inner.params,
        "opt_state": state.inner.opt_state,
        "inner_step": state.inner.step,
        "raw": state.raw,
        "outer_state": state.outer_state,
        "train_stream": state.train.state_dict(),
        "val_stream": state.val.state_dict(),
        "evals": list(state.evals),
        "hypergradients": state.hypergradients,
        "nonfinite": state.nonfinite,
        "elapsed_s": state.elapsed(),
        "solver_s": state.solver_s,
        "compile_s": state.compile_s,
        "raw0": state.raw0,
        "torch_rng": torch.get_rng_state(),
        "method_state": exp.method.state_dict() if isinstance(exp.method, CarriesState) else {},
        "precision_state": runtime_of(exp).state_dict(),
    }


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors of a nested dict / list / tuple moved to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def restore(exp: Runnable, ckpt: dict[str, Any]) -> RunState:
    """The state a checkpoint saved: :func:`start`'s, with every saved value put back (streams positioned,
    torch's RNG, the method's carried state and fp16's loss scale)."""
    state, dev = start(exp), exp.device
    state.step = int(ckpt["step"])
    state.inner = InnerState(to_device(ckpt["params"], dev), to_device(ckpt["opt_state"], dev), int(ckpt["inner_step"]))
    state.raw, state.raw0 = to_device(ckpt["raw"], dev), to_device(ckpt["raw0"], dev)
    state.outer_state = to_device(ckpt["outer_state"], dev)
    state.train.load_state_dict(ckpt["train_stream"])
    state.val.load_state_dict(ckpt["val_stream"])
    state.evals = list(ckpt["evals"])
    state.hypergradients, state.nonfinite = int(ckpt["hypergradients"]), int(ckpt["nonfinite"])
    state.elapsed_before = float(ckpt["elapsed_s"])
    state.solver_s = float(ckpt.get("solver_s", 0.0))  # checkpoints before it counted from 0
    state.compile_s = float(ckpt.get("compile_s", 0.0))
    torch.set_rng_state(ckpt["torch_rng"])
    if isinstance(exp.method, CarriesState):
        exp.method.load_state_dict(to_device(ckpt.get("method_state", {}), dev))
    runtime_of(exp).load_state_dict(ckpt.get("precision_state", {}))  # fp16's loss scale
    return state
