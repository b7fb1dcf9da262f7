"""``hydra/launcher=parallel``: a sweep's jobs in local worker processes, ``n_jobs`` at a time.

Each job runs in a process of its own (``python -m hoexp.config.launcher``), started with its Hydra job
pickled to a file, writing everything it prints to ``<job folder>/job.log`` (plain progress lines:
workers never draw bars over each other or over the launcher's lines). The launcher prints one line
when a job starts and one when it ends, and:

* a worker that dies (``kill -9``, out of memory) loses only its own job: the others go on, and
  the launcher reports the lost job and ends with one line listing what did not finish and the
  command that finishes it (the lost job continues from its checkpoint: ``resume=auto``);
* SIGTERM or SIGINT to the launcher is passed to the running workers (each saves a checkpoint and
  a summary), jobs not started yet are not started, and the launcher ends with one line; a worker
  whose launcher dies without a word gets SIGTERM from the kernel (Linux: ``PR_SET_PDEATHSIG``).

Hydra only instantiates launchers from the ``hydra_plugins`` package, so the plugin class lives in
``hydra_plugins/hoexp_launcher``; everything it does is here.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLL_S = 0.05
STOP_GRACE_S = 120  # after SIGTERM, how long workers get to save before they are killed


@dataclass
class Job:
    """One job of the sweep and its worker."""

    num: int
    overrides: list[str]
    folder: Path
    proc: subprocess.Popen | None = None
    result: Path = field(default_factory=Path)
    outcome: str = ""  # done | failed (exit n): <last line> | lost (killed by SIGKILL) | interrupted | not started
    ret: Any = None  # the worker's JobReturn


def workers(n_jobs: int, jobs: int) -> int:
    """joblib's convention: ``n_jobs > 0`` processes, ``-1`` one per CPU core, ``-2`` all but one, ..."""
    n = n_jobs if n_jobs > 0 else (os.cpu_count() or 1) + 1 + n_jobs
    return max(1, min(n, jobs))


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """Run the jobs (see the module doc); the ``JobReturn`` of each, in order. A sweep where a job
    failed, was lost or was stopped ends with one line and a non-zero exit code instead."""
    from hydra.core.utils import JobReturn, JobStatus, setup_globals
    from omegaconf import OmegaConf

    setup_globals()
    config, context = launcher.config, launcher.hydra_context
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, overrides in enumerate(job_overrides):
        cfg = _job_config(context, config, list(overrides), initial_job_idx + i)
        jobs.append(
            Job(initial_job_idx + i, list(overrides), sweep_dir / str(OmegaConf.select(cfg, "hydra.sweep.subdir")))
        )
    n = workers(int(launcher.n_jobs), len(jobs))
    _say(f"launching {len(jobs)} jobs, {n} at a time, in {sweep_dir} (each job's output: <job folder>/job.log)")
    stop = _Stop()
    with tempfile.TemporaryDirectory(prefix="hoexp-launch-") as tmp, stop:
        pending: list[Job] = list(jobs)
        running: list[Job] = []
        while (pending and not stop.signum) or running:
            while pending and len(running) < n and not stop.signum:
                job = pending.pop(0)
                _start(job, Path(tmp), (job.num, job.overrides, context, config, launcher.task_function))
                running.append(job)
            time.sleep(POLL_S)
            if stop.signum and not stop.forwarded:
                stop.forward(running)
            for job in [j for j in running if j.proc is not None and j.proc.poll() is not None]:
                running.remove(job)
                _finish(job)
            stop.kill_late(running)
    for job in pending:
        job.outcome = "not started"
    returns = [
        job.ret
        if job.outcome == "done"
        else JobReturn(overrides=job.overrides, status=JobStatus.COMPLETED, _return_value=float("inf"))
        for job in jobs
    ]
    unfinished = [j for j in jobs if j.outcome != "done"]
    if stop.signum or unfinished:
        _end(jobs, unfinished, sweep_dir, stop.signum)
    return returns


def _job_config(context: Any, config: Any, overrides: list[str], num: int) -> Any:
    """The job's config as Hydra's launchers make it (``hydra.job.num`` set: it names the job's folder), its
    options' labels filled in (the folder's name is read here, outside a Hydra job)."""
    from omegaconf import open_dict

    from hoexp.config.compose import fill_labels

    cfg = context.config_loader.load_sweep_config(config, overrides)
    fill_labels(cfg)
    with open_dict(cfg):
        cfg.hydra.job.id = f"{cfg.hydra.job.name}_{num}"
        cfg.hydra.job.num = num
    return cfg


def _say(text: str) -> None:
    print(f"hoexp: {text}", file=sys.stderr, flush=True)


def _start(job: Job, tmp: Path, payload: tuple) -> None:
    """The job's worker: ``python -m hoexp.config.launcher <payload> <result>``, output to ``job.log``."""
    job.folder.mkdir(parents=True, exist_ok=True)
    data, job.result = tmp / f"{job.num}.job", tmp / f"{job.num}.ret"
    data.write_bytes(pickle.dumps(payload))
    with open(job.folder / "job.log", "ab") as log:
        # Own session: a Ctrl-C on the terminal reaches the launcher only, which passes it on once.
        job.proc = subprocess.Popen(
            [sys.executable, "-m", "hoexp.config.launcher", str(data), str(job.result)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _say(f"job #{job.num} ({' '.join(job.overrides)}) started → {job.folder}")


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("hoexp: error:")]
    return (errors or lines or [""])[-1].strip()


def _finish(job: Job) -> None:
    assert job.proc is not None
    code = job.proc.returncode
    last = _last_line(job.folder / "job.log").removeprefix("hoexp: ")
    # A worker whose result is written finished its job, whatever ended its process after (a late signal).
    job.ret = _load(job.result)
    failed = job.ret is not None and str(getattr(job.ret.status, "name", "")) == "FAILED"
    if job.ret is not None and not failed:
        job.outcome = "done"
    elif failed:
        job.outcome = f"failed: {type(job.ret._return_value).__name__}: {job.ret._return_value}"
    elif code < 0:
        job.outcome = f"lost (worker killed by {signal.Signals(-code).name})"
    elif code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        job.outcome = f"interrupted: {last}"
    else:
        job.outcome = f"failed (exit {code}): {last}"
    done = last if last.startswith("done") else f"done: {last}"
    _say(f"job #{job.num} {done if job.outcome == 'done' else job.outcome}")


def _load(path: Path) -> Any:
    try:
        return pickle.loads(path.read_bytes())
    except Exception:  # noqa: BLE001 - no result (the worker died before writing it) or an unreadable one
        return None


def _end(jobs: list[Job], unfinished: list[Job], sweep_dir: Path, signum: int) -> None:
    """One line for a sweep that did not finish every job, and its exit code (128 + signal, or 1)."""
    from hoexp import advice

    what = "; ".join(f"#{j.num} {j.outcome}" for j in unfinished[:6]) + (" ..." if len(unfinished) > 6 else "")
    why = f"stopped by {signal.Signals(signum).name}: " if signum else ""
    args = advice.command_line()
    again = (
        advice.command(args, f"hydra.sweep.dir={sweep_dir}", "resume=auto")
        if args is not None
        else f"the same command plus hydra.sweep.dir={sweep_dir}"
    )
    _say(
        f"error: {why}{len(unfinished)} of {len(jobs)} jobs did not finish ({what}); finish them with: "
        f"{again} (each job continues from its checkpoint)"
    )
    sys.exit(128 + signum if signum else 1)


class _Stop:
    """SIGTERM / SIGINT to the launcher: remember it, pass it to the running workers once, and kill
    the workers that have not stopped ``STOP_GRACE_S`` later."""

    def __init__(self) -> None:
        self.signum = 0
        self.forwarded = 0.0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def forward(self, running: list[Job]) -> None:
        for job in running:
            if job.proc is not None and job.proc.poll() is None:
                job.proc.send_signal(self.signum)
        self.forwarded = time.monotonic()

    def kill_late(self, running: list[Job]) -> None:
        if self.forwarded and time.monotonic() - self.forwarded > STOP_GRACE_S:
            for job in running:
                if job.proc is not None and job.proc.poll() is None:
                    job.proc.kill()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------ the worker
def _die_with_parent() -> None:
    """Linux: SIGTERM when the launcher dies (even by SIGKILL), so no worker outlives its sweep."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(payload: str, result: str) -> None:
    """Run one job as Hydra's launchers do; its ``JobReturn`` is pickled to ``result``."""
    _die_with_parent()
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job, setup_globals

    num, overrides, context, config, task_function = pickle.loads(Path(payload).read_bytes())
    setup_globals()  # Hydra's resolvers; hoexp registers nothing else in Hydra's singletons
    cfg = _job_config(context, config, overrides, num)
    HydraConfig.instance().set_config(cfg)
    ret = run_job(
        hydra_context=context,
        config=cfg,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    try:
        data = pickle.dumps(ret)
    except Exception:  # noqa: BLE001 - an exception object that does not pickle: keep its text
        ret.return_value = RuntimeError(str(ret._return_value))
        data = pickle.dumps(ret)
    tmp = Path(result + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, result)
    # The job is done: a stop arriving now has nothing to stop, and would kill the exiting interpreter (which
    # puts back the default handlers) so that the launcher could not tell the done job from a lost one.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def worker_main(payload: str, result: str) -> None:
    """The worker's entry point: a signal while it starts (before the run's own handler) is one line in its
    job.log and exit code 128 + signal, which the launcher reports as an interrupted job, not a lost one."""
    from hoexp.errors import stop_on_signals

    with stop_on_signals():
        try:
            run_worker(payload, result)
        except KeyboardInterrupt as e:
            signum = int(getattr(e, "signum", signal.SIGINT))
            _say(f"error: stopped by {signal.Signals(signum).name} while the job was starting, before any outer step")
            sys.exit(128 + signum)


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
