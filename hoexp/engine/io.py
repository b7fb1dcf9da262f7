"""Everything a run writes or receives from outside: the run folder, loggers, checkpoints, ``summary.json``,
``final.pt``, signals and threads.

:class:`RunIO` with ``out_dir=None`` writes no file (a run made in Python, a test): its metrics go to the
loggers it is given. In a data-parallel run (:mod:`hoexp.engine.distributed`) rank 0 alone writes and shows
anything; the other ranks follow its decisions (start or resume) through a broadcast.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from hoexp import advice
from hoexp.engine import distributed, rundir
from hoexp.engine.guards import Diverged
from hoexp.engine.metrics import JsonlLogger, MetricLogger, MultiLogger, TensorBoardLogger, write_json_atomic
from hoexp.engine.resume import check_resume
from hoexp.engine.state import CHECKPOINT_KEYS, to_device
from hoexp.errors import HoexpError, Stopped, StopRun, received_stop

# Below this many weights a CPU run uses one thread: a Hessian-vector product on the Iris MLP
# took 42 ms with 2 threads and 4 ms with 1 (DESIGN.md §3), thread start-up dominating the work.
SMALL_MODEL_PARAMS = 1_000_000
CHECKPOINT_VERSION = 2  # 2: with the config, the first .hydra/ files and the resumes
# Top-level config keys added after checkpoints were first written, with the value that reproduces older runs.
ADDED_KEYS = {"precision": "fp32", "max_time": None}


class Preempted(Stopped):
    """SIGTERM or SIGINT during a run: the run saved a checkpoint and stops (exit code 128 + signal number)."""


class preemption_signals:
    """While active, SIGTERM and SIGINT raise :class:`Preempted` in the main thread (restored after).

    ``received``: the first signal seen, also while ignoring. Where code swallowed the exception (torch's C
    code catches every error of an import it makes), :meth:`check` raises it again. A signal the command
    received before the run (:class:`hoexp.errors.stop_on_signals`) is raised on entry, as :class:`Stopped`.
    """

    def __enter__(self) -> preemption_signals:
        self.previous = {}
        self.received: int | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._raise)
        before = received_stop(self.previous.values())
        if before:
            self.__exit__()
            raise Stopped.by_signal(before)
        return self

    def check(self) -> None:
        if self.received:
            raise Preempted.by_signal(self.received)

    def _raise(self, signum, frame):
        self.received = self.received or signum
        raise Preempted.by_signal(signum)

    def _record(self, signum, frame):
        self.received = self.received or signum

    def ignore(self) -> None:
        """Signals no longer interrupt (the final writes); they are only recorded in ``received``."""
        for sig in self.previous:
            signal.signal(sig, self._record)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def auto_threads(device: torch.device, num_params: int, available: int, load: float) -> int:
    """The intra-op threads ``threads=0`` picks for a run: 1 below :data:`SMALL_MODEL_PARAMS` weights on the CPU;
    else, on the CPU, the ``available`` threads less the cores already busy when the run starts (``load``: the
    1-minute load average), rounded, at least 1; off the CPU, ``available``.

    Why the load: an intra-op thread that another process keeps off its core stalls every parallel operation at
    its barrier, and OpenMP's waiting threads spin on the cores the others need. Measured on the PTB preset, 2 cores
    at load 8-10 (4 busy loops and other jobs), 2 threads against 1: evaluating 7,000 tokens 51-97 s against
    4.8-7.3 s, 5 training steps 35-49 s against 7.9-12 s; its 3x5-step run stopped unfinished after 1,216 s
    against 394 and 405 s to the end."""
    if device.type != "cpu":
        return available
    if num_params < SMALL_MODEL_PARAMS:
        return 1
    return max(1, min(available, math.floor(available - load + 0.5)))


def machine_load() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


@contextlib.contextmanager
def thread_policy(requested: int, device: torch.device, num_params: int) -> Iterator[int]:
    """Set torch's intra-op threads for the run (restored afterwards); 0 picks automatically (:func:`auto_threads`).
    ``threads`` is run control: it changes how fast a run goes, and results only in the last bits (a sum's order)."""
    before = torch.get_num_threads()
    threads = requested or auto_threads(device, num_params, before, machine_load())
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def outcome(e: BaseException) -> tuple[str, str]:
    """``(status, error)`` recorded in summary.json for a run that ended with ``e``."""
    if isinstance(e, Preempted):
        return "interrupted", str(e)
    if isinstance(e, Diverged):
        return "diverged", str(e)
    if isinstance(e, distributed.PeerLost):  # another rank's failure, in its words
        return "failed", str(e)
    if isinstance(e, StopRun):  # an extra logger ended the run on purpose (a pruned search trial)
        return e.status, str(e)
    if isinstance(e, SystemExit):  # from a signal handler, e.g. submitit requeueing a SLURM job on SIGUSR2
        return "interrupted", f"exit requested (code {e.code})"
    if isinstance(e, OSError):
        return "failed", f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return "failed", f"{type(e).__name__}: {e}"


def save(obj: Any, path: Path) -> None:
    """``torch.save`` through memory, then an atomic write (a full disk raises ``OSError`` and leaves no file)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    rundir.write_atomic(path, buf.getvalue())


class RunIO:
    """The run folder ``out_dir`` (None: no files) and what goes to it; the console; the run's status.

    ``config``: the composed config without Hydra's node, stored in checkpoints and compared on resume;
    ``ctx``: the process group's context (None: one process).
    """

    def __init__(
        self,
        out_dir: str | Path | None = None,
        *,
        config: dict[str, Any] | None = None,
        config_text: str = "",
        console: Console | None = None,
        loggers: Sequence[MetricLogger] | None = None,
        command: Sequence[str] | None = None,
        prefix: str = "hoexp run",
        sweep: Sequence[str] | None = None,
        ctx: distributed.Context | None = None,
    ):
        self.out_dir = None if out_dir is None else Path(out_dir)
        # The advice after a stop (hoexp.advice): ``command``, the overrides that repeat this run with ``prefix``
        # (None: not known, e.g. a run made in Python); ``sweep``, the arguments of the sweep it is a job of
        # when that sweep runs in this process (its other jobs then wait for that command).
        self.command, self.prefix, self.sweep = command, prefix, sweep
        self.config, self.config_text = config or {}, config_text
        self.ctx = ctx if ctx is not None else distributed.Context()  # the process group's, handed in
        self.main = self.ctx.is_main
        self.console = (console or Console(stderr=True)) if self.main else Console(stderr=True, quiet=True)
        self.extra_loggers = list(loggers or []) if self.main else []
        self.logger: MetricLogger = MultiLogger([])
        self.started = time.perf_counter()
        self.status: str = "created"
        self.error: str | None = None
        self.snapshot: dict[str, Any] | None = None
        self.hydra_files: dict[str, str] = {}  # .hydra/*.yaml as first written (restored on resume)
        self.resumes: list[dict] = []  # per resume with allowed changes: {"step", "changes": {key: [old, new]}}
        self.checkpointed = False  # this process wrote checkpoint.pt
        self.summary_written = False

    @property
    def writes(self) -> bool:
        return self.main and self.out_dir is not None

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True, markup=False)

    # ----------------------------------------------------------------------------- start or resume
    def decide_start(self, mode: str) -> dict | None:
        """:meth:`start_or_resume` on rank 0; in a data-parallel run its answer (the checkpoint, or the one-line
        error) is broadcast, so every rank starts or resumes alike and the others never read the folder."""
        if not self.ctx.active:
            return self.start_or_resume(mode)
        if self.main:
            try:
                ckpt = self.start_or_resume(mode)
            except HoexpError as e:
                distributed.broadcast(("error", str(e)), self.ctx)
                raise
            distributed.broadcast(("ok", ckpt), self.ctx)
            return ckpt
        kind, payload = distributed.broadcast(None, self.ctx)
        if kind == "error":
            raise distributed.PeerLost(payload, reported=True)
        return payload

    def start_or_resume(self, mode: str) -> dict | None:
        """The checkpoint to continue from, or ``None`` to start (``mode``: false, true, auto).

        A start is refused where an earlier run logged (``resume=false``) and clears what a start
        without checkpoint logged (``resume=auto``); a resume restores ``.hydra/`` as the run first
        wrote it and refuses a changed configuration (:func:`hoexp.engine.resume.check_resume`).
        """
        folder = self.out_dir
        if folder is None:
            return None
        if mode == "false":
            left = rundir.logged_files(folder)
            if left:
                raise HoexpError(
                    f"{folder} already holds a run ({', '.join(p.name for p in left[:3])}); continue it "
                    "with resume=auto, or start a new run in another folder (hydra.run.dir=<path>)"
                )
            self._keep_hydra_files()
            return None
        if not (folder / "checkpoint.pt").exists():
            if mode == "true":
                raise HoexpError(
                    f"resume=true but there is no checkpoint.pt in {folder}; pass the run's folder: "
                    "hydra.run.dir=<that folder> (or hydra.sweep.dir=<sweep folder> with -m), or use "
                    "resume=auto to start it over"
                )
            cleared = rundir.clear(folder)
            if cleared:
                self.say(
                    f"hoexp: no checkpoint in {folder}: starting over (removed {len(cleared)} files an "
                    "earlier start logged)"
                )
            self._keep_hydra_files()
            return None
        ckpt = self.load_checkpoint()
        self.hydra_files = dict(ckpt.get("hydra_files") or {})
        for name, text in self.hydra_files.items():  # Hydra has just rewritten them for this command
            path = folder / ".hydra" / name
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                rundir.write_atomic(path, text.encode("utf-8"))
        self.resumes = list(ckpt.get("resumes") or [])
        if "config" in ckpt:  # checkpoints before hoexp 0.1 (version 1) did not store it
            old = {**ADDED_KEYS, **ckpt["config"]}  # a key added since the checkpoint was written: its default
            changes = check_resume(old, self.config, folder, int(ckpt["step"]))
            if changes:
                self.resumes.append({"step": int(ckpt["step"]), "changes": {k: list(v) for k, v in changes.items()}})
                shown = ", ".join(f"{k} {a} → {b}" for k, (a, b) in changes.items())
                self.say(f"hoexp: resuming with {shown} (recorded in summary.json)")
        return ckpt

    def _keep_hydra_files(self) -> None:
        """Remember ``.hydra/*.yaml`` as Hydra wrote them for this start (restored on every resume)."""
        assert self.out_dir is not None
        folder = self.out_dir / ".hydra"
        self.hydra_files = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.yaml"))}

    # ----------------------------------------------------------------------------- loggers
    def open_loggers(self, resumed_at: int | None) -> MetricLogger:
        """TensorBoard and ``metrics.jsonl`` in the run folder (a resume cuts what was logged after the
        checkpoint), plus the extra loggers; on rank 0 only."""
        files: list[MetricLogger] = []
        if self.writes:
            assert self.out_dir is not None
            tb = TensorBoardLogger(self.out_dir, purge_step=None if resumed_at is None else resumed_at + 1)
            rundir.record_events(self.out_dir, [p.name for p in tb.files])  # what a start over may remove
            files = [tb, JsonlLogger(self.out_dir / "metrics.jsonl", summarize_histograms=False, keep_until=resumed_at)]
        self.logger = MultiLogger([*files, *self.extra_loggers] if self.main else [])
        return self.logger

    # ----------------------------------------------------------------------------- checkpoints
    def keep(self, snapshot: dict[str, Any]) -> None:
        """The latest snapshot: what a checkpoint written now (periodic, on a signal, at the end) holds."""
        self.snapshot = snapshot

    def snapshot_step(self) -> int:
        return self.snapshot["step"] if self.snapshot else 0

    def write_checkpoint(self) -> None:
        """``checkpoint.pt`` in the run folder, atomically; with the run's config and first ``.hydra/``
        files, against which a resume is checked."""
        assert self.snapshot is not None  # written only after the first snapshot
        if not self.writes:  # rank 0 alone writes
            return
        assert self.out_dir is not None
        payload = {
            **self.snapshot,
            "status": self.status,
            "version": CHECKPOINT_VERSION,
            "config": self.config,
            "hydra_files": self.hydra_files,
            "resumes": self.resumes,
        }
        save(to_device(payload, torch.device("cpu")), self.out_dir / "checkpoint.pt")
        self.checkpointed = True

    def load_checkpoint(self) -> dict:
        assert self.out_dir is not None
        path = self.out_dir / "checkpoint.pt"
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise HoexpError(
                f"cannot read {path} ({type(e).__name__}); it is damaged: delete it to start over"
            ) from None
        missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS
        if missing:
            raise HoexpError(
                f"{path} is not a hoexp checkpoint (no {', '.join(sorted(missing)[:3])}); move it away "
                "to start over in this folder"
            )
        return ckpt

    # ----------------------------------------------------------------------------- the end
    def finish(
        self, summary: dict[str, Any], final: dict[str, Any] | None, hparams: dict[str, Any], checkpoint_every: int
    ) -> BaseException | None:
        """Write the checkpoint, ``summary.json`` and ``final.pt``, close the loggers: each step is tried
        even if an earlier one fails (a full disk); returns the first failure. ``summary``: built again
        if the checkpoint fails (its status changes)."""
        failures: list[BaseException] = []

        def attempt(fn: Any) -> bool:
            try:
                fn()
                return True
            except Exception as e:  # noqa: BLE001 - reported by the caller
                failures.append(e)
                return False

        if not self.writes:  # the other ranks of a data-parallel run (and a run without folder) write nothing
            with contextlib.suppress(Exception):
                self.logger.close()
            return None
        assert self.out_dir is not None
        if self.snapshot is not None and (self.status in ("interrupted", "completed") or checkpoint_every):
            if not attempt(self.write_checkpoint) and self.status == "completed":
                self.status, self.error = outcome(failures[-1])
                summary.update(status=self.status, error=self.error)
        self.summary_written = attempt(lambda: write_json_atomic(self.out_dir / "summary.json", summary))
        if final is not None:
            attempt(lambda: save(final, self.out_dir / "final.pt"))
        with contextlib.suppress(Exception):
            self.logger.log_hparams(
                hparams, {f"final/{k}": v for k, v in summary["final"].items() if isinstance(v, float)}
            )
        attempt(self.logger.close)
        return failures[0] if failures else None

    def peer_outcome(self, error: distributed.PeerLost, signals: preemption_signals) -> BaseException:
        """What ended the job when another rank did: a signal this rank got too (torchrun passes SIGTERM to
        every rank; another may see it first), else that rank's own report (failed / interrupted) from the store."""
        ended = distributed.why_ended(stop=lambda: signals.received is not None) if self.main else None
        if signals.received is not None:
            return self.peer_cause(ended) or Preempted.by_signal(signals.received)
        if ended is None:
            if self.main and not error.reported:
                return distributed.PeerLost(
                    f"another rank of the {self.ctx.world_size}-process job ended without a "
                    f"message (killed?) after outer step {self.snapshot_step()}"
                )
            return error
        status, message = ended
        if status == "interrupted":
            return Preempted(message, 128 + signal.SIGTERM if "SIGTERM" in message else 130)
        return distributed.PeerLost(message, reported=True)

    def again(self, resume: str) -> str:
        """The command that continues (``resume``: true) or starts over (auto) this run in its folder."""
        settings = (f"resume={resume}", f"hydra.run.dir={self.out_dir}")
        if self.command is None:
            return "the same command plus: " + " ".join(settings)
        job = advice.command(self.command, *settings, prefix=self.prefix)
        if self.sweep is None:
            return job
        return f"{advice.command(self.sweep, 'resume=auto')} (the whole sweep; this job alone: {job})"

    def peer_cause(self, ended: tuple[str, str] | None = None) -> distributed.PeerLost | None:
        """On rank 0, after the launcher's SIGTERM: the other rank's end that caused it, to report instead of
        that signal: a rank that died without a word (:meth:`peer_died`), or one that failed and said so
        (``ended``, else read from the store now; it is written before that rank exits, so before the SIGTERM)."""
        if not (self.ctx.active and self.main):
            return None
        if ended is None:
            ended = distributed.why_ended(wait_s=0.0)
        if ended is not None and ended[0] == "failed":
            return distributed.PeerLost(ended[1], reported=True)
        return self.peer_died()

    def peer_died(self) -> distributed.PeerLost | None:
        """On rank 0: a rank on this host that died without a word (``kill -9``, out of memory), after which the
        launcher (torchrun) stopped the others by SIGTERM: the cause to report instead of that signal."""
        dead = distributed.dead_peers(self.ctx) if self.ctx.active and self.main else []
        if not dead:
            return None
        rank, pid = dead[0]
        return distributed.PeerLost(
            f"rank {rank} of {self.ctx.world_size} (pid {pid}) died without a message (killed? out of memory?) "
            f"after outer step {self.snapshot_step()}, and the launcher stopped the others"
        )

    def explain(self, error: BaseException) -> BaseException:
        """The exception to raise for ``error``: one line for a signal or a failed write, else ``error``."""
        step, folder = self.snapshot_step(), self.out_dir
        if not self.main or folder is None:  # rank 0 explains (what to resume, where); the others: the bare reason
            return error
        if isinstance(error, Preempted):
            if self.checkpointed:
                what = f"after outer step {step}; everything is saved; resume with: {self.again('true')}"
            else:
                what = "before its first checkpoint, so there is nothing to resume; start it over in this folder with: "
                what += self.again("auto")
            return Preempted(f"{error} {what}", error.exit_code)
        if isinstance(error, distributed.PeerLost) and not error.reported and self.checkpointed:
            return distributed.PeerLost(
                f"{error}; the run is saved after outer step {step}; resume with: {self.again('true')}"
            )
        if isinstance(error, OSError):
            where = f" ({error.filename})" if error.filename else ""
            saved = "summary.json says status 'failed'" if self.summary_written else "summary.json could not be written"
            hint = "free some space, then continue" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "then continue"
            return HoexpError(
                f"the run stopped at outer step {step}: {error.strerror or error}{where}; {saved}; "
                f"{hint} with: resume=auto hydra.run.dir={folder}"
            )
        return error


def final_state(family: Any, raw: dict, params: dict) -> dict[str, Any]:
    """``final.pt``: weights and hyperparameters (raw and constrained), loadable with ``weights_only=True``."""
    trees = {"params": params, "raw_hparams": raw, "hparams": family.view(raw)}
    return {name: {k: v.detach().cpu() for k, v in t.items()} for name, t in trees.items()}
