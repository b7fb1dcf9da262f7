"""Solver time and the run's time budget (``max_time``).

Solver time (``time/solver_s``) is the wall time of the outer steps alone: inner training, the hypergradient and
the outer update, each step timed between two device synchronizations (CUDA runs asynchronously: without them a
step's kernels would be charged to whatever synchronizes next, an evaluation). Evaluation, logging, histograms and
checkpoints are not counted, so two runs that evaluate at different rates spend the same solver time on the same
work; this is what benchmarks compare (benchopt's time axis excludes its objective evaluations too). A method's
compile warm-up (``method.compile=true`` of soba/saba: ``time/compile_s``, the first call of its compiled function)
is not counted either, but logged apart and summed in ``summary.json``'s ``compile_time_s``, as benchopt runs its
JAX solvers' jit warm-up before the clock starts.

``max_time`` is a budget of solver time: the run ends after the first outer step at which the budget is spent,
evaluated, checkpointed and summarized as a completed run (``summary.json``: ``stopped_by: max_time``, exit 0).
Wall time is solver time plus evaluation and saving; a hard wall-clock limit is the scheduler's (SIGTERM: the run
checkpoints and resumes).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hoexp.engine import distributed
from hoexp.types import RunSettings


def synced_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done (a CUDA synchronization; free on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def budget_spent(s: RunSettings, solver_s: float, step: int, ctx: Any = None) -> bool:
    """Whether outer step ``step`` is the run's last because ``max_time`` seconds of solver time are spent (before
    ``outer_steps``). In a data-parallel run every rank decides alike: spent when any rank's clock says so."""
    if s.max_time is None or step >= s.outer_steps:
        return False
    spent = solver_s >= s.max_time
    if ctx is not None and ctx.active:  # ranks' clocks differ slightly; all must stop at the same step
        spent = distributed.mean_floats([float(spent)], ctx)[0] > 0
    return spent


def stopped_by(s: RunSettings, step: int, status: str) -> str | None:
    """``"max_time"`` for a run that completed before ``outer_steps``: only its budget ends a run early and cleanly."""
    return "max_time" if status == "completed" and step < s.outer_steps else None


def budget_line(s: RunSettings, solver_s: float, step: int) -> str:
    return (
        f"hoexp: max_time={s.max_time:g}s of solver time spent ({solver_s:.1f}s) at outer step {step} of "
        f"{s.outer_steps}: the run ends here, evaluated and saved (to continue: raise max_time and resume)"
    )
