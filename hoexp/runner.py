"""``run_experiment(spec, out_dir)``: one configured run into its folder, through the engine (:mod:`hoexp.engine`).

The folder is claimed and locked (:mod:`hoexp.rundir`), a checkpoint there is resumed or refused
(:mod:`hoexp.resume`), the experiment is built from the validated :class:`~hoexp.config.Spec`
(:func:`hoexp.build.build`), and :func:`hoexp.engine.run` runs it: everything it measures goes to the
metric loggers (TensorBoard events and ``metrics.jsonl`` in the run directory) and, at the end or on
any failure, to ``summary.json``, so a run never loses what it already logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from hoexp import distributed, rundir
from hoexp.build import Experiment, build
from hoexp.config import Spec
from hoexp.engine.guards import Diverged
from hoexp.engine.io import Preempted, RunIO, preemption_signals, thread_policy
from hoexp.engine.runner import run
from hoexp.errors import HoexpError
from hoexp.metrics import MetricLogger, read_json

__all__ = ["Diverged", "Preempted", "Run", "preemption_signals", "run_experiment", "thread_policy"]


def task_config(spec: Spec) -> dict[str, Any]:
    """The run's composed config without Hydra's own node: what a resume must match."""
    return {k: v for k, v in spec.raw.items() if k != "hydra"}


class Run:
    """One configured run into ``out_dir``: :meth:`execute` claims the folder, builds and runs (``exp``: what ran)."""

    def __init__(
        self,
        spec: Spec,
        out_dir: str | Path,
        *,
        config_text: str = "",
        console: Console | None = None,
        loggers: list[MetricLogger] | None = None,
    ):
        self.spec, self.out_dir = spec, Path(out_dir)
        self.io = RunIO(
            self.out_dir, config=task_config(spec), config_text=config_text, console=console, loggers=loggers
        )
        self.exp: Experiment | None = None

    def execute(self) -> dict[str, Any]:
        if (
            not self.io.main
        ):  # rank 0 owns the folder (created, locked, cleared or resumed) and broadcasts its decisions
            return self._execute()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HoexpError(
                f"cannot create the run folder {self.out_dir} ({e.strerror}); "
                "choose a writable one with hydra.run.dir=..."
            ) from None
        with rundir.RunLock(self.out_dir):  # one writer per folder
            return self._execute()

    def _execute(self) -> dict[str, Any]:
        io, spec = self.io, self.spec
        ckpt = io.decide_start(spec.run.resume)
        if ckpt is not None and ckpt.get("status") == "completed" and spec.run.outer_steps <= int(ckpt["step"]):
            io.say(f"hoexp: {self.out_dir} already completed; nothing to resume")
            return distributed.broadcast(read_json(self.out_dir / "summary.json") if io.main else None, io.ctx)
        self.exp = build(spec)
        summary = run(self.exp, io, resume=ckpt)
        if io.ctx.active:  # every rank returns rank 0's summary (the others computed theirs but wrote nothing)
            summary = distributed.broadcast(summary, io.ctx)
        f, b = summary["final"], summary["best"]
        io.say(
            f"hoexp: done in {summary['wall_time_s']:.1f}s: final val_loss={f['val_loss']:.4f} "
            f"test_loss={f['test_loss']:.4f} test_acc={f['test_acc']:.3f}; best val_loss={b['val_loss']:.4f} "
            f"at step {b['step']} → {self.out_dir / 'summary.json'}"
        )
        return summary


def run_experiment(spec: Spec, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run one experiment into ``out_dir``; returns the summary also written to ``summary.json``."""
    return Run(spec, Path(out_dir), **kwargs).execute()
