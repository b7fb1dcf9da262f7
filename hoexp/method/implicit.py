"""Runner-facing IFT methods (``neumann``, ``cg``, ``fixed_point``, ``exact``) and ``none``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor

from hoexp import tree
from hoexp.method.base import InnerState, StepStats, train_inner
from hoexp.method.ift import ift_hypergradient
from hoexp.method.solvers import Solver
from hoexp.optim import Optimizer
from hoexp.problem import Batch, Problem


@dataclass
class ImplicitMethod:
    """Train ``inner_steps`` steps, then the IFT hypergradient at the reached weights.

    The Hessian and mixed term use the next training batch, the validation gradient ``val_batch``.
    Cost per outer step: ``inner_steps`` training steps + the solver's HVPs + ~3 gradients.
    """

    solver: Solver
    name: str

    def outer_step(self, problem: Problem, inner_opt: Optimizer, state: InnerState, raw: dict[str, Tensor],
                   train_batches: Iterator[Batch], val_batch: Batch, inner_steps: int,
                   on_inner_step: Callable[[], None] | None = None,
                   ) -> tuple[dict[str, Tensor], InnerState, StepStats]:
        state, loss, _ = train_inner(problem, inner_opt, state, raw, train_batches, inner_steps, on_inner_step)
        train_batch = next(train_batches)
        hg, s = ift_hypergradient(
            lambda w, lam: problem.train_loss(w, lam, train_batch),
            lambda w, lam: problem.val_loss(w, lam, val_batch),
            state.params, raw, self.solver,
        )
        stats = StepStats(
            inner_grad_norm=s.inner_grad_norm, inner_loss=s.train_loss,
            hypergrad_norm=float(tree.norm(hg)), residual=s.residual,
            solver_iterations=s.iterations, hvps=s.hvps, info=s.info,
        )
        return hg, state, stats


@dataclass
class NoHO:
    """``method=none``: train with the initial hyperparameters; never returns a hypergradient."""

    name: str = "none"

    def outer_step(self, problem: Problem, inner_opt: Optimizer, state: InnerState, raw: dict[str, Tensor],
                   train_batches: Iterator[Batch], val_batch: Batch, inner_steps: int,
                   on_inner_step: Callable[[], None] | None = None,
                   ) -> tuple[None, InnerState, StepStats]:
        state, loss, gnorm = train_inner(problem, inner_opt, state, raw, train_batches, inner_steps, on_inner_step)
        stats = StepStats(inner_grad_norm=None if gnorm is None else float(gnorm),
                          inner_loss=None if loss is None else float(loss))
        return None, state, stats
