"""``run_experiment(spec, out_dir)``: one configured run into its folder, through the engine (:mod:`hoexp.engine`).

The folder is claimed and locked (:mod:`hoexp.engine.rundir`), a checkpoint there is resumed or refused
(:mod:`hoexp.engine.resume`), the experiment is built from the validated :class:`~hoexp.config.Spec`
(:func:`hoexp.config.build.build`), and :func:`hoexp.engine.run` runs it: everything it measures goes to the
metric loggers (TensorBoard events and ``metrics.jsonl`` in the run directory) and, at the end or on
any failure, to ``summary.json``, so a run never loses what it already logged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from hoexp.config import Spec
from hoexp.config.build import Experiment, Prebuilt, build
from hoexp.engine import distributed, rundir
from hoexp.engine.guards import Diverged
from hoexp.engine.io import Preempted, RunIO, preemption_signals, thread_policy
from hoexp.engine.loop import run, run_summary
from hoexp.engine.metrics import MetricLogger, read_json, write_json_atomic
from hoexp.engine.state import restore
from hoexp.errors import HoexpError

FINAL = ("val_loss", "test_loss", "test_acc")  # the final numbers the run's last line shows, where the task has them
__all__ = ["Diverged", "Preempted", "Run", "preemption_signals", "run_experiment", "thread_policy"]


def task_config(spec: Spec) -> dict[str, Any]:
    """The run's composed config without Hydra's own node: what a resume must match."""
    return {k: v for k, v in spec.raw.items() if k != "hydra"}


class Run:
    """One configured run into ``out_dir``: :meth:`execute` claims the folder, builds and runs (``exp``: what ran).

    ``command``, ``prefix``, ``sweep``: what the advice after a stop says to run (:class:`RunIO`); ``dist``: the
    process group's context, handed down once (None: one process); ``prebuilt``: what preflight built for ``spec``."""

    def __init__(
        self,
        spec: Spec,
        out_dir: str | Path,
        *,
        config_text: str = "",
        console: Console | None = None,
        loggers: list[MetricLogger] | None = None,
        command: Sequence[str] | None = None,
        prefix: str = "hoexp run",
        sweep: Sequence[str] | None = None,
        dist: distributed.Context | None = None,
        prebuilt: Prebuilt | None = None,
    ):
        self.spec, self.out_dir = spec, Path(out_dir)
        self.dist = dist if dist is not None else distributed.Context()
        self.prebuilt = prebuilt  # what preflight built for this spec (None: build builds everything)
        self.io = RunIO(
            self.out_dir,
            config=task_config(spec),
            config_text=config_text,
            console=console,
            loggers=loggers,
            command=command,
            prefix=prefix,
            sweep=sweep,
            ctx=self.dist,
        )
        self.exp: Experiment | None = None

    def execute(self) -> dict[str, Any]:
        if not self.io.main:  # rank 0 owns the folder (made, locked, cleared or resumed) and broadcasts its decisions
            return self._execute()
        made = not self.out_dir.exists()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HoexpError(
                f"cannot create the run folder {self.out_dir} ({e.strerror}); "
                "choose a writable one with hydra.run.dir=..."
            ) from None
        with rundir.RunLock(self.out_dir):  # one writer per folder
            rundir.adopt(self.out_dir, hydra_written=True, made=made)  # only a folder it owns (else one line)
            try:
                return self._execute()
            except BaseException:
                if self.io.status == "created":  # nothing logged (the data did not load, a signal while building)
                    rundir.discard(self.out_dir)
                raise

    def _execute(self) -> dict[str, Any]:
        io, spec = self.io, self.spec
        ckpt = io.decide_start(spec.run.resume)
        done = finished(ckpt, spec)
        if ckpt is not None and done is not None:
            io.say(f"hoexp: {self.out_dir} already {done}; nothing to resume")
            return distributed.broadcast(self._completed_summary(ckpt) if io.main else None, io.ctx)
        self.exp = build(spec, self.dist, self.prebuilt)
        summary = run(self.exp, io, resume=ckpt)
        if io.ctx.active:  # every rank returns rank 0's summary (the others computed theirs but wrote nothing)
            summary = distributed.broadcast(summary, io.ctx)
        f, b = summary["final"], summary["best"]
        final = " ".join(f"{k}={f[k]:{'.3f' if k.endswith('_acc') else '.4f'}}" for k in FINAL if k in f)
        io.say(
            f"hoexp: done in {summary['wall_time_s']:.1f}s: final {final}; best val_loss={b['val_loss']:.4f} "
            f"at step {b['step']} → {self.out_dir / 'summary.json'}"
        )
        return summary

    def _completed_summary(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """``summary.json`` of the completed run in the folder; written again from its checkpoint where it is
        missing or damaged (a single-process run: a data-parallel one would rebuild on every rank)."""
        path = self.out_dir / "summary.json"
        try:
            return dict(read_json(path))
        except (OSError, ValueError, TypeError) as e:
            why = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({type(e).__name__})"
        if self.io.ctx.active:
            raise HoexpError(
                f"{path} is {why}; write it again from checkpoint.pt with one process: the same command "
                f"without torchrun (resume=true hydra.run.dir={self.out_dir})"
            )
        self.exp = build(self.spec, self.dist, self.prebuilt)
        state = restore(self.exp, ckpt)
        state.started = time.perf_counter()  # elapsed: the checkpoint's, not this command's
        self.io.status, self.io.resumes = "completed", list(ckpt.get("resumes") or [])
        summary = run_summary(self.exp, state, self.io)
        write_json_atomic(path, summary)
        self.io.say(f"hoexp: its {path.name} was {why}: written again from checkpoint.pt")
        return summary


def finished(ckpt: dict[str, Any] | None, spec: Spec) -> str | None:
    """How the completed run in ``ckpt`` ended, where resuming it with ``spec`` would run nothing: its outer steps
    all done, or its time budget ``max_time`` spent (a larger one continues it); ``None``: resume (or start)."""
    if ckpt is None or ckpt.get("status") != "completed":
        return None
    if spec.run.outer_steps <= int(ckpt["step"]):
        return "completed"
    spent, budget = float(ckpt.get("solver_s", 0.0)), spec.run.max_time
    if budget is not None and spent >= budget:
        return f"stopped by max_time={budget:g}s ({spent:.1f}s of solver time spent): raise max_time to continue it"
    return None


def run_experiment(spec: Spec, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run one experiment into ``out_dir``; returns the summary also written to ``summary.json``."""
    return Run(spec, Path(out_dir), **kwargs).execute()
