"""The bilevel loop: inner training, hypergradient, outer update, evaluation and logging.

One explicit, readable loop (nanoGPT-style). Everything it needs is built from a validated
:class:`~hoexp.config.Spec` by :func:`hoexp.build.build`; everything it measures goes to the
metric loggers (TensorBoard events and ``metrics.jsonl`` in the run directory) and, at the end or
on any failure, to ``summary.json``, so a run never loses what it already logged.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from hoexp import tree
from hoexp.build import Experiment, build
from hoexp.config import Spec
from hoexp.errors import HoexpError
from hoexp.metrics import JsonlLogger, MetricLogger, MultiLogger, TensorBoardLogger, tensor_stats, write_json_atomic
from hoexp.method.base import InnerState, StepStats
from hoexp.problem import training_batches, validation_batches
from hoexp.progress import make_progress

# Below this many weights a CPU run uses one thread: a Hessian-vector product on the Iris MLP
# took 42 ms with 2 threads and 4 ms with 1 (DESIGN.md §3), thread start-up dominating the work.
SMALL_MODEL_PARAMS = 1_000_000


class Diverged(HoexpError):
    """A loss or hypergradient became NaN or infinite."""


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
    """Data loss and accuracy on every split, one host sync for all six numbers."""
    values = []
    for split in (exp.data.train, exp.data.val, exp.data.test):
        values.extend(exp.problem.evaluate(params, split))
    host = torch.stack(values).tolist()
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
    out = dict(zip(keys, host))
    if exp.problem.task == "language_model":  # perplexity = exp(mean NLL per token)
        for split in ("train", "val", "test"):
            out[f"{split}_ppl"] = math.exp(min(out[f"{split}_loss"], 700.0))
    return out


def _stats_scalars(stats: StepStats) -> dict[str, float]:
    out = {
        "inner/grad_norm": stats.inner_grad_norm,
        "inner/loss": stats.inner_loss,
        "hypergrad/norm": stats.hypergrad_norm,
        "solver/residual": stats.residual,
        "solver/iterations": stats.solver_iterations,
        "solver/hvps": stats.hvps,
    }
    out.update(stats.extra)
    return {k: float(v) for k, v in out.items() if v is not None}


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


class Run:
    """State and bookkeeping of one run; :meth:`execute` is the loop."""

    def __init__(self, spec: Spec, out_dir: Path, *, config_text: str = "",
                 console: Console | None = None, loggers: Sequence[MetricLogger] | None = None):
        self.spec = spec
        self.out_dir = Path(out_dir)
        self.config_text = config_text
        self.console = console or Console(stderr=True)
        self.extra_loggers = list(loggers or [])
        self.evals: list[dict[str, float]] = []
        self.hypergradients = 0
        self.status = "created"
        self.error: str | None = None
        self.started = time.perf_counter()
        self.exp: Experiment | None = None
        self.raw0: Tensor | None = None
        self.raw: dict[str, Tensor] = {}
        self.state: InnerState | None = None

    # ----------------------------------------------------------------------------- the loop
    def execute(self) -> dict[str, Any]:
        spec = self.spec
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.exp = exp = build(spec)
        params = {k: v.detach().clone() for k, v in exp.model.named_parameters()}
        with thread_policy(spec.run.threads, exp.device, tree.numel(params)) as threads:
            logger = MultiLogger([TensorBoardLogger(self.out_dir), JsonlLogger(self.out_dir / "metrics.jsonl", summarize_histograms=False),
                                  *self.extra_loggers])
            try:
                self.status = "running"
                self._loop(exp, params, logger, threads)
                self.status = "completed"
            except KeyboardInterrupt:
                self.status = "interrupted"
                raise
            except Diverged as e:
                self.status, self.error = "diverged", str(e)
                raise
            except BaseException as e:
                self.status, self.error = "failed", f"{type(e).__name__}: {e}"
                raise
            finally:
                summary = self.summary()
                write_json_atomic(self.out_dir / "summary.json", summary)
                self._save_state()
                with contextlib.suppress(Exception):
                    logger.log_hparams(self._hparams(), {f"final/{k}": v for k, v in summary["final"].items()
                                                         if isinstance(v, float)})
                logger.close()
        f, b = summary["final"], summary["best"]
        self.console.print(
            f"hoexp: done in {summary['wall_time_s']:.1f}s: final val_loss={f['val_loss']:.4f} "
            f"test_loss={f['test_loss']:.4f} test_acc={f['test_acc']:.3f}; best val_loss={b['val_loss']:.4f} "
            f"at step {b['step']} → {self.out_dir / 'summary.json'}", soft_wrap=True, highlight=False, markup=False)
        return summary

    def _loop(self, exp: Experiment, params: dict[str, Tensor], logger: MetricLogger, threads: int) -> None:
        spec, problem = self.spec, exp.problem
        family = problem.family
        self.raw = family.init(params)
        self.raw0 = hp_view(exp, self.raw).detach().clone()
        initial = {k: v.clone() for k, v in params.items()}
        self.state = InnerState(params, exp.inner_opt.init(params))
        outer_state = exp.outer_opt.init(self.raw)
        train_batches = training_batches(problem, exp.data.train, spec.run.seed, spec.dataset.batch_size)
        outer_split = exp.data.train if spec.run.outer_objective == "train" else \
            getattr(exp.data, "val_train_layout", exp.data.val)
        val_stream = validation_batches(problem, outer_split, spec.run.seed, spec.dataset.val_batch_size)
        if self.config_text:
            logger.log_text("config", self.config_text)
        self.console.print(
            f"hoexp: {spec.dataset.name} / {spec.model.name} ({tree.numel(params):,} weights) / "
            f"hp={spec.hp_name} ({tree.numel(self.raw):,} hyperparameters) / method={exp.method.name} / "
            f"device={exp.device} threads={threads} → {self.out_dir}", soft_wrap=True, highlight=False, markup=False
        )
        self._log_eval(exp, logger, 0, {}, force_hist=True)
        progress = make_progress(spec.run.outer_steps, spec.run.inner_steps, console=self.console,
                                 enabled=spec.run.progress)
        with progress:
            for step in range(1, spec.run.outer_steps + 1):
                progress.start_outer(step)
                t0 = time.perf_counter()
                if spec.run.reset_inner and step > 1:  # every outer step trains from the same initialization
                    fresh = {k: v.clone() for k, v in initial.items()}
                    self.state = InnerState(fresh, exp.inner_opt.init(fresh), self.state.step)
                hg, self.state, stats = exp.method.outer_step(
                    problem, exp.inner_opt, self.state, self.raw, train_batches, next(val_stream),
                    spec.run.inner_steps, progress.advance_inner)
                scalars = _stats_scalars(stats)
                if hg is not None:
                    if not _all_finite(list(hg.values())):
                        raise Diverged(
                            f"non-finite hypergradient at outer step {step} (solver residual "
                            f"{stats.residual}); lower method.alpha or optim.outer.lr")
                    with torch.no_grad():
                        self.raw, outer_state = exp.outer_opt.update(self.raw, hg, outer_state)
                        self.raw = family.clamp(self.raw)
                    self.hypergradients += 1
                scalars["time/outer_step_s"] = time.perf_counter() - t0
                fields = self._log_eval(exp, logger, step, scalars)
                progress.end_outer(step, fields)

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
        scalars["time/elapsed_s"] = time.perf_counter() - self.started
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
            "wall_time_s": time.perf_counter() - self.started,
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
        }
        if self.raw and exp is not None:
            values = hp_view(exp, self.raw).detach()
            stats = tensor_stats("hp", values) if values.numel() else {}
            out["hp_final"] = {k.split("/")[-1]: v for k, v in stats.items()}
            out["hp_final"]["moved_fraction"] = self._moved_fraction(values)
        if self.error:
            out["error"] = self.error
        return out

    def _save_state(self) -> None:
        """Final weights and hyperparameters (raw and constrained), loadable with ``weights_only=True``."""
        if not self.raw or self.state is None or self.exp is None:
            return
        torch.save({
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
