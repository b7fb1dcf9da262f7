"""The bilevel loop: inner training, hypergradient, outer update, evaluation and logging.

One explicit loop (nanoGPT-style) on plain objects: an :class:`~hoexp.types.Experiment` (or what
:func:`hoexp.config.build.build` returns) says what to run, a :class:`~hoexp.engine.io.RunIO` where it goes.
State, guards, evaluation, files and how one outer step draws its batches and calls the method live beside it
(``state.py``, ``guards.py``, ``evaluate.py``, ``io.py``, ``step.py``); the loop only says in which order things
happen, and why.
"""

from __future__ import annotations

import math
import time
from typing import Any

from hoexp import tree
from hoexp.engine import distributed
from hoexp.engine.budget import budget_line, budget_spent, stopped_by, synced_clock
from hoexp.engine.evaluate import labels, log_step, summarize
from hoexp.engine.guards import outer_update
from hoexp.engine.io import Preempted, RunIO, final_state, outcome, preemption_signals, thread_policy
from hoexp.engine.progress import RunProgress, make_progress
from hoexp.engine.runtime import preload_lazy_imports, runtime_of
from hoexp.engine.state import RunState, reset_inner, restore, snapshot, start
from hoexp.engine.step import PLAIN, advance
from hoexp.types import COMPILE_S, Runnable, RunSettings


def run(
    exp: Runnable, io: RunIO | None = None, progress: RunProgress | None = None, *, resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run ``exp`` from its start (or from the checkpoint ``resume``) to ``exp.settings.outer_steps``; returns the
    summary (also written to ``summary.json`` when ``io`` has a folder). Raises what ended the run early
    (:class:`~hoexp.engine.guards.Diverged`, :class:`~hoexp.engine.io.Preempted`, ...) after writing it down."""
    runtime = runtime_of(exp)
    io = io if io is not None else RunIO(ctx=runtime.dist)
    s, state, error, failed_write = exp.settings, None, None, None
    weights = tree.numel(dict(exp.task.model.named_parameters()))
    with thread_policy(s.threads, exp.device, weights) as threads, preemption_signals() as signals:
        io.open_loggers(None if resume is None else int(resume["step"]))
        try:
            io.status = "running"
            preload_lazy_imports()  # not in outer step 1's solver time
            state = restore(exp, resume) if resume is not None else start(exp)
            state.started = io.started  # wall time counts from the command's start (folder, build included)
            io.say(headline(exp, state, io, threads, resumed=resume is not None))
            if resume is None:  # step 0: the config and the untrained model's numbers
                if io.config_text:
                    io.logger.log_text("config", io.config_text)
                log_step(exp, state, io.logger, 0, {}, force_hist=True)
            io.keep(snapshot(exp, state))
            signals.check()  # a signal whose exception some library swallowed stops the run here
            bars = progress or make_progress(
                s.outer_steps, s.inner_steps, console=io.console, enabled=s.progress and io.main
            )
            loop(exp, state, io, bars, signals.check)
            io.status = "completed"
        except BaseException as e:
            error = e
            io.status, io.error = outcome(e)
        finally:
            signals.ignore()  # a second signal must not interrupt the writing below
            if isinstance(error, distributed.PeerLost):
                error = io.peer_outcome(error, signals)
                io.status, io.error = outcome(error)
            elif isinstance(error, Preempted) and io.ctx.active:  # torchrun's SIGTERM after a rank failed or died
                error = io.peer_cause() or error
                io.status, io.error = outcome(error)
            summary = run_summary(exp, state, io)
            final = final_state(exp.task.family, state.raw, state.inner.params) if state and state.raw else None
            failed_write = io.finish(summary, final, dict(s.hparams), s.checkpoint_every)
    failure = error if error is not None else failed_write
    if failure is not None:
        raise io.explain(failure)
    return summary


def warming_up(s: RunSettings, evals: list[dict[str, float]], step: int) -> bool:
    """Whether outer step ``step`` is plain training: within the first ``warmup`` steps or, with
    ``warmup_until_plateau``, before any evaluation found the validation loss above the best one before it
    (read from the checkpointed evaluations, so a resumed run decides the same)."""
    if step <= s.warmup:
        return True
    if not s.warmup_until_plateau:
        return False
    best = math.inf
    for e in evals:
        if e.get("step", 0) > 0:  # step 0's loss is the untrained model's
            if e["val_loss"] > best:
                return False
            best = min(best, e["val_loss"])
    return True


def loop(exp: Runnable, state: RunState, io: RunIO, progress: RunProgress, check: Any = None) -> None:
    """Outer steps ``state.step + 1 .. outer_steps``, each: train, hypergradient, outer update, log, checkpoint;
    ``check()`` after each (raises for a signal whose exception was swallowed)."""
    s, runtime = exp.settings, runtime_of(exp)
    task, plain_step = runtime.task(exp.task), runtime.step()  # the losses as this run computes them, its step
    with progress:
        for step in range(state.step + 1, s.outer_steps + 1):
            progress.start_outer(step)
            t0 = synced_clock(exp.device)
            if s.reset_inner and step > 1:  # every outer step trains from the same initialization (meta-training)
                state.inner = reset_inner(exp, state)
            method = PLAIN if warming_up(s, state.evals, step) else exp.method
            res = advance(
                exp, method, state.inner, state.raw, state.train, state.val, progress.advance_inner, task, plain_step
            )
            state.inner, scalars = res.inner, dict(res.scalars)
            if io.ctx.active and "inner/loss" in scalars:  # each rank's is its shard's: log the global mean
                scalars["inner/loss"] = distributed.mean_floats([scalars["inner/loss"]], io.ctx)[0]
            # A non-finite hypergradient skips the update; too many in a row end the run, once this step is logged.
            abort = outer_update(exp, state, res.hypergrad, scalars, step, progress)
            compile_s = scalars.get(COMPILE_S, 0.0)  # a method's compile warm-up: not solver time (as benchopt's jit)
            scalars["time/outer_step_s"] = synced_clock(exp.device) - t0 - compile_s
            state.solver_s += scalars["time/outer_step_s"]
            state.compile_s += compile_s
            last = budget_spent(s, state.solver_s, step, io.ctx)  # then evaluated, saved and summarized as the end
            fields = log_step(exp, state, io.logger, step, scalars, last=last)
            if abort is not None:
                raise abort
            state.step = step
            io.keep(snapshot(exp, state))  # references only: what a checkpoint written on a signal holds
            if s.checkpoint_every and step % s.checkpoint_every == 0 and not last:  # the last: written at the end
                io.write_checkpoint()
            progress.end_outer(step, fields)
            if check is not None:
                check()
            if last:
                break
    if state.step < s.outer_steps:  # the loop ended early: only the budget does that (after the bars are gone)
        io.say(budget_line(s, state.solver_s, state.step))


def headline(exp: Runnable, state: RunState, io: RunIO, threads: int, resumed: bool) -> str:
    """The run's first console line: what runs, how big, where."""
    s, n_w, n_h = exp.settings, tree.numel(state.inner.params), tree.numel(state.raw)
    names = labels(exp)
    return (
        f"hoexp: {names['dataset']} / {names['model']} ({n_w:,} weights) / hp={names['hp']} "
        f"({n_h:,} hyperparameter{'s' if n_h != 1 else ''}) / method={exp.method.name} / "
        f"device={exp.device} threads={threads}"
        + (f" processes={io.ctx.world_size}" if io.ctx.active else "")
        + (f" precision={s.precision}" if s.precision != "fp32" else "")
        + (f" → {io.out_dir}" if io.out_dir is not None else "")
        + (f" (resumed after outer step {state.step})" if resumed else "")
    )


def run_summary(exp: Runnable, state: RunState | None, io: RunIO) -> dict[str, Any]:
    """``summary.json`` of the run as it stands (status and error from ``io``)."""
    elapsed = state.elapsed() if state is not None else time.perf_counter() - io.started
    out = summarize(exp, state, io.status, elapsed, world_size=io.ctx.world_size, precision=exp.settings.precision)
    if state is not None:
        out["solver_time_s"] = state.solver_s
        if state.compile_s:
            out["compile_time_s"] = state.compile_s  # outside solver_time_s (a method's torch.compile warm-up)
        if exp.settings.max_time is not None:
            out["max_time_s"] = exp.settings.max_time
        if why := stopped_by(exp.settings, state.step, io.status):
            out["stopped_by"] = why
    if io.resumes:
        out["resumes"] = io.resumes
    if io.error:
        out["error"] = io.error
    return out
