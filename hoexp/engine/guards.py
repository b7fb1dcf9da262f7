"""What the loop does with a hypergradient it cannot trust: skip, warn, or stop.

A non-finite hypergradient skips its outer update (the hyperparameters stay where they were); after
``max_nonfinite`` in a row the run stops as diverged. A solve that is worse than ``u = 0`` gets one warning per
run: a solver that reports ``solver/diverging`` (a Neumann or fixed-point series), or any method whose
``solver/residual`` ``‖Hu − v‖/‖v‖`` exceeds 1 or is not finite (CG, your own solver).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hoexp import tree
from hoexp.engine.state import RunState
from hoexp.errors import HoexpError
from hoexp.types import Runnable


class Diverged(HoexpError):
    """A loss or hypergradient became NaN or infinite."""


def outer_update(
    exp: Runnable,
    state: RunState,
    hypergrad: Mapping[str, Tensor] | None,
    scalars: dict[str, float],
    step: int,
    progress: Any,
) -> Diverged | None:
    """Apply the outer optimizer's update to ``state.raw`` (then the family's clamp), or skip a non-finite
    hypergradient; returns the error to raise once this step is logged (``max_nonfinite`` in a row)."""
    if hypergrad is None:  # none, hd: no outer update
        return None
    abort = None
    if tree.all_finite(hypergrad.values()):
        with torch.no_grad():
            state.raw, state.outer_state = exp.outer_opt.update(state.raw, dict(hypergrad), state.outer_state)
            state.raw = exp.task.family.clamp(state.raw)
        state.hypergradients += 1
        state.nonfinite = 0
    else:  # skip this outer update; abort after max_nonfinite in a row
        state.nonfinite += 1
        scalars["hypergrad/nonfinite"] = 1.0
        progress.message(
            f"hoexp: warning: non-finite hypergradient at outer step {step} "
            f"({state.nonfinite} in a row): outer update skipped"
        )
        if state.nonfinite >= exp.settings.max_nonfinite:
            abort = Diverged(
                f"{state.nonfinite} non-finite hypergradients in a row (outer step {step}, solver "
                f"residual {scalars.get('solver/residual')}); lower method.alpha or optim.outer.lr"
            )
    residual = scalars.get("solver/residual")
    diverging = scalars.get("solver/diverging") or (residual is not None and not residual <= 1)
    if diverging and not state.warned_residual:  # any solver's, your own included: worse than u = 0
        progress.message(
            f"hoexp: warning: {exp.method.name} residual ‖Hu−v‖/‖v‖ = "
            f"{'?' if residual is None else f'{residual:.3g}'} > 1 at outer step {step}: "
            "the solve is worse than u = 0 (it diverges); for a series lower method.alpha (below 2/λ_max(H)), "
            "else raise method.damping or use method.curvature=gauss_newton"
        )
        state.warned_residual = True
    return abort


def check_train_loss(metrics: Mapping[str, float], step: int) -> None:
    """A non-finite training loss at an evaluation ends the run as diverged."""
    loss = metrics["train_loss"]
    if not math.isfinite(loss):
        raise Diverged(f"training loss became {loss} at outer step {step}; lower optim.inner.lr")
