"""The bilevel loop: inner training, hypergradient, outer update, evaluation and logging.

One explicit, readable loop (nanoGPT-style). Everything it needs is built from a validated
:class:`~hoexp.config.Spec` by :func:`hoexp.build.build`; everything it measures goes to the
metric loggers (TensorBoard events and ``metrics.jsonl`` in the run directory) and, at the end or
on any failure, to ``summary.json``, so a run never loses what it already logged.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from hoexp import distributed, rundir, tree
from hoexp.build import Experiment, build
from hoexp.config import Spec
from hoexp.errors import HoexpError, StopRun
from hoexp.method.base import CarriesState, take
from hoexp.metrics import (
    JsonlLogger,
    MetricLogger,
    MultiLogger,
    TensorBoardLogger,
    read_json,
    tensor_stats,
    write_json_atomic,
)
from hoexp.progress import make_progress
from hoexp.resume import check_resume
from hoexp.types import InnerState, OuterStep

# Below this many weights a CPU run uses one thread: a Hessian-vector product on the Iris MLP
# took 42 ms with 2 threads and 4 ms with 1 (DESIGN.md §3), thread start-up dominating the work.
SMALL_MODEL_PARAMS = 1_000_000
CHECKPOINT_VERSION = 2  # 2: with the config, the first .hydra/ files and the resumes
# Top-level keys added after checkpoints were first written, with the value that reproduces older runs.
ADDED_KEYS = {"precision": "fp32"}
CHECKPOINT_KEYS = frozenset({"step", "params", "opt_state", "inner_step", "raw", "outer_state", "train_stream",
                             "val_stream", "evals", "hypergradients", "nonfinite", "elapsed_s", "raw0", "torch_rng"})


class Diverged(HoexpError):
    """A loss or hypergradient became NaN or infinite."""


class Preempted(HoexpError):
    """SIGTERM or SIGINT: the run saved a checkpoint and stops (exit code 128 + signal number)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class preemption_signals:
    """While active, SIGTERM and SIGINT raise :class:`Preempted` in the main thread (restored after)."""

    def __enter__(self) -> preemption_signals:
        self.previous = {}
        self.received: int | None = None  # the first signal seen, also while ignoring
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._raise)
        return self

    def _raise(self, signum, frame):
        self.received = self.received or signum
        raise Preempted(f"stopped by {signal.Signals(signum).name}", 128 + signum)

    def _record(self, signum, frame):
        self.received = self.received or signum

    def ignore(self) -> None:
        """Signals no longer interrupt (the final writes); they are only recorded in ``received``."""
        for sig in self.previous:
            signal.signal(sig, self._record)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _to_cpu(x: Any) -> Any:
    return _to(x, torch.device("cpu"))


@contextlib.contextmanager
def thread_policy(requested: int, device: torch.device, num_params: int) -> Iterator[int]:
    """Set torch's intra-op threads for the run (restored afterwards); 0 picks automatically."""
    before = torch.get_num_threads()
    threads = requested or (1 if device.type == "cpu" and num_params < SMALL_MODEL_PARAMS else before)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def hp_view(exp: Experiment, raw: Mapping[str, Tensor]) -> Tensor:
    """All constrained hyperparameter values as one flat vector."""
    view = exp.problem.family.view(raw)
    return tree.flatten(view.values()) if view else torch.zeros(0)


def evaluate(exp: Experiment, params: Mapping[str, Tensor]) -> dict[str, float]:
    """Data loss and accuracy on every split (plus what the task derives from them), one host sync."""
    values = exp.problem.evaluate_all(params)
    out = dict(zip(values, torch.stack(list(values.values())).tolist()))
    return {**out, **exp.problem.derived_metrics(out)}


def _outcome(e: BaseException) -> tuple[str, str]:
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


def _task_config(spec: Spec) -> dict[str, Any]:
    """The run's composed config without Hydra's own node: what a resume must match."""
    return {k: v for k, v in spec.raw.items() if k != "hydra"}


def _save(obj: Any, path: Path) -> None:
    """``torch.save`` through memory, then an atomic write (a full disk raises ``OSError`` and leaves no file)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    rundir.write_atomic(path, buf.getvalue())


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


class Run:
    """State and bookkeeping of one run; :meth:`execute` is the loop."""

    def __init__(self, spec: Spec, out_dir: Path, *, config_text: str = "",
                 console: Console | None = None, loggers: Sequence[MetricLogger] | None = None):
        self.spec = spec
        self.out_dir = Path(out_dir)
        self.config_text = config_text
        # A data-parallel run (hoexp.distributed): rank 0 writes and shows everything, the other ranks nothing.
        self.ctx = distributed.current()
        self.main = self.ctx.is_main
        self.console = (console or Console(stderr=True)) if self.main else Console(stderr=True, quiet=True)
        self.extra_loggers = list(loggers or []) if self.main else []
        self.evals: list[dict[str, float]] = []
        self.hypergradients = 0
        self.status = "created"
        self.error: str | None = None
        self.started = time.perf_counter()
        self.exp: Experiment | None = None
        self.raw0: Tensor | None = None
        self.raw: dict[str, Tensor] = {}
        self.state: InnerState | None = None
        self.snapshot: dict | None = None
        self.nonfinite = 0
        self.warned_residual = False
        self.elapsed_before = 0.0
        self.hydra_files: dict[str, str] = {}  # .hydra/*.yaml as first written (restored on resume)
        self.resumes: list[dict] = []  # per resume with allowed changes: {"step", "changes": {key: [old, new]}}
        self.checkpointed = False  # this process wrote checkpoint.pt
        self.summary_written = False
        self.summary_data: dict[str, Any] = {}

    # ----------------------------------------------------------------------------- the loop
    def execute(self) -> dict[str, Any]:
        if not self.main:  # rank 0 owns the folder (created, locked, cleared or resumed) and broadcasts its decisions
            return self._execute()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HoexpError(f"cannot create the run folder {self.out_dir} ({e.strerror}); "
                             "choose a writable one with hydra.run.dir=...") from None
        with rundir.RunLock(self.out_dir):  # one writer per folder
            return self._execute()

    def _execute(self) -> dict[str, Any]:
        spec = self.spec
        ckpt = self._decide_start()
        if ckpt is not None and ckpt.get("status") == "completed" and spec.run.outer_steps <= int(ckpt["step"]):
            self.console.print(f"hoexp: {self.out_dir} already completed; nothing to resume", highlight=False,
                               soft_wrap=True)
            return distributed.broadcast(read_json(self.out_dir / "summary.json") if self.main else None, self.ctx)
        self.exp = exp = build(spec)
        params = {k: v.detach().clone() for k, v in exp.model.named_parameters()}
        start = 0 if ckpt is None else int(ckpt["step"])
        error: BaseException | None = None
        with thread_policy(spec.run.threads, exp.device, tree.numel(params)) as threads, \
                preemption_signals() as signals:
            logger = MultiLogger([
                TensorBoardLogger(self.out_dir, purge_step=None if ckpt is None else start + 1),
                JsonlLogger(self.out_dir / "metrics.jsonl", summarize_histograms=False,
                            keep_until=None if ckpt is None else start),
                *self.extra_loggers] if self.main else [])
            try:
                self.status = "running"
                self._loop(exp, params, logger, threads, ckpt)
                self.status = "completed"
            except BaseException as e:
                error = e
                self.status, self.error = _outcome(e)
            finally:
                signals.ignore()  # a second signal must not interrupt the writing below
                if isinstance(error, distributed.PeerLost):
                    error = self._peer_outcome(error, signals)
                    self.status, self.error = _outcome(error)
                failed_write = self._finish(logger)
        if error is not None:
            raise self._explain(error)
        if failed_write is not None:
            raise self._explain(failed_write)
        summary = self.summary_data
        if self.ctx.active:  # every rank returns rank 0's summary (the others computed theirs but wrote nothing)
            summary = distributed.broadcast(summary, self.ctx)
        f, b = summary["final"], summary["best"]
        self.console.print(
            f"hoexp: done in {summary['wall_time_s']:.1f}s: final val_loss={f['val_loss']:.4f} "
            f"test_loss={f['test_loss']:.4f} test_acc={f['test_acc']:.3f}; best val_loss={b['val_loss']:.4f} "
            f"at step {b['step']} → {self.out_dir / 'summary.json'}", soft_wrap=True, highlight=False, markup=False)
        return summary

    def _decide_start(self) -> dict | None:
        """:meth:`_start_or_resume` on rank 0; in a data-parallel run its answer (the checkpoint, or the one-line
        error) is broadcast, so every rank starts or resumes alike and the others never read the folder."""
        if not self.ctx.active:
            return self._start_or_resume()
        if self.main:
            try:
                ckpt = self._start_or_resume()
            except HoexpError as e:
                distributed.broadcast(("error", str(e)), self.ctx)
                raise
            distributed.broadcast(("ok", ckpt), self.ctx)
            return ckpt
        kind, payload = distributed.broadcast(None, self.ctx)
        if kind == "error":
            raise distributed.PeerLost(payload, reported=True)
        return payload

    def _peer_outcome(self, error: distributed.PeerLost, signals: preemption_signals) -> BaseException:
        """What ended the job when another rank did: a signal this rank got too (torchrun passes SIGTERM to
        every rank; another may see it first), else that rank's own report (failed / interrupted) from the store."""
        ended = distributed.why_ended(stop=lambda: signals.received is not None) if self.main else None
        if signals.received is not None:
            name = signal.Signals(signals.received).name
            return Preempted(f"stopped by {name}", 128 + signals.received)
        if ended is None:
            if self.main and not error.reported:
                return distributed.PeerLost(f"another rank of the {self.ctx.world_size}-process job ended without a "
                                            f"message (killed?) after outer step {self._snapshot_step()}", )
            return error
        status, message = ended
        if status == "interrupted":
            return Preempted(message, 128 + signal.SIGTERM if "SIGTERM" in message else 130)
        return distributed.PeerLost(message, reported=True)

    def _start_or_resume(self) -> dict | None:
        """The checkpoint to continue from, or ``None`` to start (``spec.run.resume``: false, true, auto).

        A start is refused where an earlier run logged (``resume=false``) and clears what a start
        without checkpoint logged (``resume=auto``); a resume restores ``.hydra/`` as the run first
        wrote it and refuses a changed configuration (:func:`hoexp.resume.check_resume`).
        """
        mode, folder = self.spec.run.resume, self.out_dir
        if mode == "false":
            left = rundir.logged_files(folder)
            if left:
                raise HoexpError(f"{folder} already holds a run ({', '.join(p.name for p in left[:3])}); continue it "
                                 "with resume=auto, or start a new run in another folder (hydra.run.dir=<path>)")
            self._keep_hydra_files()
            return None
        if not (folder / "checkpoint.pt").exists():
            if mode == "true":
                raise HoexpError(f"resume=true but there is no checkpoint.pt in {folder}; pass the run's folder: "
                                 "hydra.run.dir=<that folder> (or hydra.sweep.dir=<sweep folder> with -m), or use "
                                 "resume=auto to start it over")
            cleared = rundir.clear(folder)
            if cleared:
                self.console.print(f"hoexp: no checkpoint in {folder}: starting over (removed {len(cleared)} files an "
                                   "earlier start logged)", highlight=False, soft_wrap=True, markup=False)
            self._keep_hydra_files()
            return None
        ckpt = self._load_checkpoint()
        self.hydra_files = dict(ckpt.get("hydra_files") or {})
        for name, text in self.hydra_files.items():  # Hydra has just rewritten them for this command
            path = folder / ".hydra" / name
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                rundir.write_atomic(path, text.encode("utf-8"))
        self.resumes = list(ckpt.get("resumes") or [])
        if "config" in ckpt:  # checkpoints before hoexp 0.1 (version 1) did not store it
            old = {**ADDED_KEYS, **ckpt["config"]}  # a key added since the checkpoint was written: its default
            changes = check_resume(old, _task_config(self.spec), folder, int(ckpt["step"]))
            if changes:
                self.resumes.append({"step": int(ckpt["step"]), "changes": {k: list(v) for k, v in changes.items()}})
                shown = ", ".join(f"{k} {a} → {b}" for k, (a, b) in changes.items())
                self.console.print(f"hoexp: resuming with {shown} (recorded in summary.json)", highlight=False,
                                   soft_wrap=True, markup=False)
        return ckpt

    def _keep_hydra_files(self) -> None:
        """Remember ``.hydra/*.yaml`` as Hydra wrote them for this start (restored on every resume)."""
        folder = self.out_dir / ".hydra"
        self.hydra_files = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.yaml"))}

    def _finish(self, logger: MetricLogger) -> BaseException | None:
        """Write the checkpoint, ``summary.json`` and ``final.pt``, close the loggers: each step is tried
        even if an earlier one fails (a full disk); returns the first failure."""
        failures: list[BaseException] = []

        def attempt(fn: Any) -> bool:
            try:
                fn()
                return True
            except Exception as e:  # noqa: BLE001 - reported by the caller
                failures.append(e)
                return False

        if not self.main:  # the other ranks of a data-parallel run write nothing
            self.summary_data = self.summary()
            return None
        if self.snapshot is not None and (self.status in ("interrupted", "completed") or self.spec.run.checkpoint_every):
            if not attempt(self._write_checkpoint) and self.status == "completed":
                self.status, self.error = _outcome(failures[-1])
        self.summary_data = self.summary()
        self.summary_written = attempt(lambda: write_json_atomic(self.out_dir / "summary.json", self.summary_data))
        attempt(self._save_state)
        with contextlib.suppress(Exception):
            logger.log_hparams(self._hparams(), {f"final/{k}": v for k, v in self.summary_data["final"].items()
                                                 if isinstance(v, float)})
        attempt(logger.close)
        return failures[0] if failures else None

    def _explain(self, error: BaseException) -> BaseException:
        """The exception to raise for ``error``: one line for a signal or a failed write, else ``error``."""
        step, folder = self._snapshot_step(), self.out_dir
        if not self.main:  # rank 0 explains (what to resume, where); the others report the bare reason
            return error
        if isinstance(error, Preempted):
            if self.checkpointed:
                return Preempted(f"{error} at outer step {step}; checkpoint saved. Resume with the same command plus: "
                                 f"resume=true hydra.run.dir={folder}", error.exit_code)
            return Preempted(f"{error} before the first checkpoint, nothing to resume; to start it over in this folder "
                             f"run the same command plus: resume=auto hydra.run.dir={folder}", error.exit_code)
        if isinstance(error, OSError):
            where = f" ({error.filename})" if error.filename else ""
            saved = "summary.json says status 'failed'" if self.summary_written else "summary.json could not be written"
            hint = ("free some space, then continue" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "then continue")
            return HoexpError(f"the run stopped at outer step {step}: {error.strerror or error}{where}; {saved}; "
                              f"{hint} with: resume=auto hydra.run.dir={folder}")
        return error

    def _loop(self, exp: Experiment, params: dict[str, Tensor], logger: MetricLogger, threads: int,
              ckpt: dict | None) -> None:
        spec, problem = self.spec, exp.problem
        family = problem.family
        self.raw = family.init(params)
        self.raw0 = hp_view(exp, self.raw).detach().clone()
        initial = {k: v.clone() for k, v in params.items()}
        self.state = InnerState(params, exp.inner_opt.init(params))
        outer_state = exp.outer_opt.init(self.raw)
        self.train_batches = problem.train_stream(spec.run.seed)
        self.val_stream = problem.val_stream(spec.run.seed, spec.run.outer_objective)
        if self.ctx.active:  # every rank draws the global batches and keeps its shard
            self.train_batches = distributed.ShardedStream(self.train_batches, problem.batch_dim, problem.model,
                                                           self.ctx)
            self.val_stream = distributed.ShardedStream(self.val_stream, problem.batch_dim, problem.model, self.ctx)
        start = 0
        if ckpt is not None:
            start, outer_state = self._restore(ckpt, exp)
        self.console.print(
            f"hoexp: {spec.dataset.name} / {spec.model.name} ({tree.numel(params):,} weights) / "
            f"hp={spec.hp_name} ({tree.numel(self.raw):,} hyperparameters) / method={exp.method.name} / "
            f"device={exp.device} threads={threads}"
            + (f" processes={self.ctx.world_size}" if self.ctx.active else "")
            + (f" precision={spec.run.precision}" if spec.run.precision != "fp32" else "") + f" → {self.out_dir}"
            + (f" (resumed after outer step {start})" if ckpt is not None else ""),
            soft_wrap=True, highlight=False, markup=False)
        if ckpt is None:
            if self.config_text:
                logger.log_text("config", self.config_text)
            self._log_eval(exp, logger, 0, {}, force_hist=True)
        self._take_snapshot(start, outer_state)
        progress = make_progress(spec.run.outer_steps, spec.run.inner_steps, console=self.console,
                                 enabled=spec.run.progress and self.main)
        with progress:
            for step in range(start + 1, spec.run.outer_steps + 1):
                progress.start_outer(step)
                t0 = time.perf_counter()
                if spec.run.reset_inner and step > 1:  # every outer step trains from the same initialization
                    fresh = {k: v.clone() for k, v in initial.items()}
                    self.state = InnerState(fresh, exp.inner_opt.init(fresh), self.state.step)
                    if isinstance(exp.method, CarriesState):  # what it carried belongs to the old weights
                        exp.method.load_state_dict({})
                # the runner draws the batches: inner_steps for training, extra_batches more (IFT's Hessian batch)
                res = exp.method(OuterStep(problem, exp.inner_opt, self.state, self.raw,
                                           take(self.train_batches, spec.run.inner_steps),
                                           take(self.train_batches, exp.method.extra_batches),
                                           next(self.val_stream), progress.advance_inner))
                hg, self.state, scalars = res.hypergrad, res.inner, dict(res.scalars)
                if self.ctx.active and "inner/loss" in scalars:  # each rank's is its shard's: log the global mean
                    scalars["inner/loss"] = distributed.mean_floats([scalars["inner/loss"]], self.ctx)[0]
                abort = None
                if hg is not None:
                    if _all_finite(list(hg.values())):
                        with torch.no_grad():
                            self.raw, outer_state = exp.outer_opt.update(self.raw, hg, outer_state)
                            self.raw = family.clamp(self.raw)
                        self.hypergradients += 1
                        self.nonfinite = 0
                    else:  # skip this outer update; abort after max_nonfinite in a row
                        self.nonfinite += 1
                        scalars["hypergrad/nonfinite"] = 1.0
                        progress.message(f"hoexp: warning: non-finite hypergradient at outer step {step} "
                                         f"({self.nonfinite} in a row): outer update skipped")
                        if self.nonfinite >= spec.run.max_nonfinite:  # raised once this step is logged
                            abort = Diverged(
                                f"{self.nonfinite} non-finite hypergradients in a row (outer step {step}, solver "
                                f"residual {scalars.get('solver/residual')}); lower method.alpha or optim.outer.lr")
                    if scalars.get("solver/diverging") and not self.warned_residual:  # the solver says so
                        progress.message(
                            f"hoexp: warning: {exp.method.name} residual ‖Hu−v‖/‖v‖ = {scalars['solver/residual']:.3g} "
                            f"> 1 at outer step {step}: the series diverges; lower method.alpha (it must stay below "
                            "2/λ_max(H))")
                        self.warned_residual = True
                scalars["time/outer_step_s"] = time.perf_counter() - t0
                fields = self._log_eval(exp, logger, step, scalars)
                if abort is not None:
                    raise abort
                self._take_snapshot(step, outer_state)
                if spec.run.checkpoint_every and step % spec.run.checkpoint_every == 0:
                    self._write_checkpoint()
                progress.end_outer(step, fields)

    # --------------------------------------------------------------------------- checkpoints
    def _take_snapshot(self, step: int, outer_state: dict) -> None:
        """References to the state after ``step`` (tensors are replaced, never mutated: no copies)."""
        assert self.state is not None and self.exp is not None  # set by execute and _loop before any snapshot
        self.snapshot = {
            "step": step, "params": self.state.params, "opt_state": self.state.opt_state,
            "inner_step": self.state.step, "raw": self.raw, "outer_state": outer_state,
            "train_stream": self.train_batches.state_dict(), "val_stream": self.val_stream.state_dict(),
            "evals": list(self.evals), "hypergradients": self.hypergradients, "nonfinite": self.nonfinite,
            "elapsed_s": self.elapsed(), "raw0": self.raw0, "torch_rng": torch.get_rng_state(),
            "method_state": self.exp.method.state_dict() if isinstance(self.exp.method, CarriesState) else {},
            "precision_state": self.exp.problem.precision.state_dict() if self.exp.problem.precision else {},
        }

    def _snapshot_step(self) -> int:
        return self.snapshot["step"] if self.snapshot else 0

    def _write_checkpoint(self) -> None:
        """``checkpoint.pt`` in the run folder, atomically; with the run's config and first ``.hydra/``
        files, against which a resume is checked."""
        assert self.snapshot is not None  # written only after _loop's first snapshot
        if not self.main:  # rank 0 alone writes
            return
        payload = {**self.snapshot, "status": self.status, "version": CHECKPOINT_VERSION,
                   "config": _task_config(self.spec), "hydra_files": self.hydra_files, "resumes": self.resumes}
        _save(_to_cpu(payload), self.out_dir / "checkpoint.pt")
        self.checkpointed = True

    def _load_checkpoint(self) -> dict:
        path = self.out_dir / "checkpoint.pt"
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise HoexpError(f"cannot read {path} ({type(e).__name__}); it is damaged: delete it to start over") from None
        missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS
        if missing:
            raise HoexpError(f"{path} is not a hoexp checkpoint (no {', '.join(sorted(missing)[:3])}); move it away "
                             "to start over in this folder")
        return ckpt

    def _restore(self, ckpt: dict, exp: Experiment) -> tuple[int, dict]:
        dev = exp.device
        self.state = InnerState(_to(ckpt["params"], dev), _to(ckpt["opt_state"], dev), int(ckpt["inner_step"]))
        self.raw = _to(ckpt["raw"], dev)
        self.raw0 = _to(ckpt["raw0"], dev)
        self.train_batches.load_state_dict(ckpt["train_stream"])
        self.val_stream.load_state_dict(ckpt["val_stream"])
        self.evals = list(ckpt["evals"])
        self.hypergradients = int(ckpt["hypergradients"])
        self.nonfinite = int(ckpt["nonfinite"])
        self.elapsed_before = float(ckpt["elapsed_s"])
        torch.set_rng_state(ckpt["torch_rng"])
        if isinstance(exp.method, CarriesState):
            exp.method.load_state_dict(_to(ckpt.get("method_state", {}), dev))
        if exp.problem.precision is not None:  # fp16's loss scale
            exp.problem.precision.load_state_dict(ckpt.get("precision_state", {}))
        return int(ckpt["step"]), _to(ckpt["outer_state"], dev)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    # ------------------------------------------------------------------------- bookkeeping
    def _log_eval(self, exp: Experiment, logger: MetricLogger, step: int, scalars: dict[str, float],
                  force_hist: bool = False) -> dict[str, float]:
        run = self.spec.run
        evaluate_now = step == 0 or step % run.eval_every == 0 or step == run.outer_steps
        fields: dict[str, float] = {}
        if evaluate_now:
            metrics = evaluate(exp, self.state.params if self.state else {})
            if not math.isfinite(metrics["train_loss"]):
                raise Diverged(f"training loss became {metrics['train_loss']} at outer step {step}; "
                               "lower optim.inner.lr")
            self.evals.append({"step": step, **metrics})
            for k, v in metrics.items():
                split, what = k.split("_")
                scalars[f"{what}/{split}"] = v
            fields = {"val_loss": metrics["val_loss"], "val_acc": metrics["val_acc"]}
        values = hp_view(exp, self.raw).detach()
        if values.numel():
            scalars.update(tensor_stats("hp", values))
            scalars["hp/moved_fraction"] = self._moved_fraction(values)
            if force_hist or step % run.histogram_every == 0 or step == run.outer_steps:
                logger.log_histograms(step, {"hp/values": values, "hp/log10_values": torch.log10(values)})
        if "hypergrad/norm" in scalars:
            fields["hg_norm"] = scalars["hypergrad/norm"]
        scalars["time/elapsed_s"] = self.elapsed()
        logger.log_scalars(step, scalars)
        logger.flush()
        return fields

    def _moved_fraction(self, values: Tensor) -> float:
        """Fraction of hyperparameters more than 1% away from their initial value."""
        if self.raw0 is None or self.raw0.numel() != values.numel():
            return 0.0
        rel = (values - self.raw0).abs() / self.raw0.abs().clamp_min(1e-30)
        return float((rel > 0.01).to(torch.float64).mean())

    def summary(self) -> dict[str, Any]:
        exp = self.exp
        final = dict(self.evals[-1]) if self.evals else {}
        best = dict(min(self.evals, key=lambda e: e["val_loss"] if math.isfinite(e["val_loss"]) else math.inf)) \
            if self.evals else {}
        out: dict[str, Any] = {
            "status": self.status,
            "final": final,
            "best": best,
            "wall_time_s": self.elapsed(),
            "hypergradients": self.hypergradients,
            "num_hparams": tree.numel(self.raw) if self.raw else 0,
            "num_params": tree.numel(self.state.params) if self.state else 0,
            "method": self.spec.method.name,
            "hp": self.spec.hp_name,
            "dataset": self.spec.dataset.name,
            "model": self.spec.model.name,
            "seed": self.spec.run.seed,
            "outer_steps": self.spec.run.outer_steps,
            "inner_steps": self.spec.run.inner_steps,
            "device": str(exp.device) if exp else None,
            "world_size": self.ctx.world_size,
            "precision": self.spec.run.precision,
        }
        if self.raw and exp is not None:
            values = hp_view(exp, self.raw).detach()
            stats = tensor_stats("hp", values) if values.numel() else {}
            out["hp_final"] = {k.split("/")[-1]: v for k, v in stats.items()}
            out["hp_final"]["moved_fraction"] = self._moved_fraction(values)
        if self.resumes:
            out["resumes"] = self.resumes
        if self.error:
            out["error"] = self.error
        return out

    def _save_state(self) -> None:
        """Final weights and hyperparameters (raw and constrained), loadable with ``weights_only=True``."""
        if not self.raw or self.state is None or self.exp is None:
            return
        _save({
            "params": {k: v.detach().cpu() for k, v in self.state.params.items()},
            "raw_hparams": {k: v.detach().cpu() for k, v in self.raw.items()},
            "hparams": {k: v.detach().cpu() for k, v in self.exp.problem.family.view(self.raw).items()},
        }, self.out_dir / "final.pt")

    def _hparams(self) -> dict[str, Any]:
        s = self.spec
        return {"method": s.method.name, "hp": s.hp_name, "dataset": s.dataset.name, "model": s.model.name,
                "seed": s.run.seed, "inner_steps": s.run.inner_steps, "outer_steps": s.run.outer_steps,
                "inner_optim": s.inner_optim.name, "inner_lr": s.inner_optim.lr,
                "outer_optim": s.outer_optim.name, "outer_lr": s.outer_optim.lr}


def run_experiment(spec: Spec, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run one experiment into ``out_dir``; returns the summary also written to ``summary.json``."""
    return Run(spec, Path(out_dir), **kwargs).execute()
