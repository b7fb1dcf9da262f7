"""Evaluation and the numbers logged after each outer step; the run's summary.

One host sync per evaluation: the task returns its metrics as 0-d tensors, named ``<split>_<what>``, read
together. The engine needs only ``train_loss`` (divergence) and ``val_loss`` (the best step); everything else
(a classifier's accuracies, a test split) is logged as the task names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hoexp import tree
from hoexp.engine.guards import check_train_loss
from hoexp.engine.metrics import MetricLogger, tensor_stats
from hoexp.engine.state import RunState, hp_in_use
from hoexp.types import Runnable


def evaluate(task: Any, params: Mapping[str, Tensor], raw: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """The task's metrics on its splits, its metrics of the hyperparameters ``raw`` where it has ``hp_metrics``
    (per-example weights: the F1 of the flagged noisy labels), and what it derives from them (perplexity), one
    host sync."""
    values = task.evaluate_all(params)
    if raw is not None and hasattr(task, "hp_metrics"):
        values = {**values, **task.hp_metrics(raw)}
    out = dict(zip(values, torch.stack(list(values.values())).tolist()))
    return {**out, **task.derived_metrics(out)}


def moved_fraction(values: Tensor, raw0: Tensor | None) -> float:
    """Fraction of hyperparameters more than 1% away from their initial value."""
    if raw0 is None or raw0.numel() != values.numel():
        return 0.0
    rel = (values - raw0).abs() / raw0.abs().clamp_min(1e-30)
    return float((rel > 0.01).to(torch.float64).mean())


def log_step(
    exp: Runnable,
    state: RunState,
    logger: MetricLogger,
    step: int,
    scalars: dict[str, float],
    force_hist: bool = False,
    last: bool = False,
) -> dict[str, float]:
    """Evaluate (every ``eval_every`` steps, and at the first and last: ``outer_steps``, or ``last`` where the time
    budget ends the run), add the hyperparameters' statistics and histograms, log everything for ``step`` (where it
    evaluates, or every ``log_every`` steps); returns the fields the progress display shows."""
    s = exp.settings
    fields: dict[str, float] = {}
    last = last or step == s.outer_steps
    evaluates = step == 0 or step % s.eval_every == 0 or last
    if not (evaluates or force_hist or step % s.log_every == 0 or step % s.histogram_every == 0):  # nothing to write
        return {"hg_norm": scalars["hypergrad/norm"]} if "hypergrad/norm" in scalars else fields
    if evaluates:
        metrics = evaluate(exp.task, state.inner.params, state.raw)
        check_train_loss(metrics, step)
        state.evals.append({"step": step, **metrics})
        for k, v in metrics.items():
            split, _, what = k.partition("_")  # val_loss → loss/val; a name without a split stays as it is
            scalars[f"{what}/{split}" if what else k] = v
        fields = {k: metrics[k] for k in ("val_loss", "val_acc") if k in metrics}
    values = hp_in_use(exp, state)
    if values.numel():
        scalars.update(tensor_stats("hp", values))
        scalars["hp/moved_fraction"] = moved_fraction(values, state.raw0)
        if force_hist or step % s.histogram_every == 0 or last:
            logger.log_histograms(step, {"hp/values": values, "hp/log10_values": torch.log10(values)})
    if "hypergrad/norm" in scalars:
        fields["hg_norm"] = scalars["hypergrad/norm"]
    scalars["time/elapsed_s"] = state.elapsed()
    scalars["time/solver_s"] = state.solver_s  # training and hypergradients only (hoexp.engine.budget)
    logger.log_scalars(step, scalars)
    logger.flush()
    return fields


def labels(exp: Runnable) -> dict[str, str]:
    """What runs, in words: ``settings.labels`` (a configured run: its option names), else the objects' names."""
    task = exp.task
    named = {
        "method": getattr(exp.method, "name", type(exp.method).__name__),
        "hp": getattr(task.family, "name", type(task.family).__name__),
        "dataset": type(task).__name__,
        "model": type(task.model).__name__,
    }
    return {**named, **exp.settings.labels}


def summarize(exp: Runnable, state: RunState | None, status: str, elapsed: float, **more: Any) -> dict[str, Any]:
    """``summary.json``: the final and best evaluations, counts, labels, the final hyperparameters' statistics."""
    evals = state.evals if state is not None else []
    final = dict(evals[-1]) if evals else {}
    best = dict(min(evals, key=lambda e: e["val_loss"] if math.isfinite(e["val_loss"]) else math.inf)) if evals else {}
    s, names = exp.settings, labels(exp)
    out: dict[str, Any] = {
        "status": status,
        "final": final,
        "best": best,
        "wall_time_s": elapsed,
        "hypergradients": state.hypergradients if state is not None else 0,
        "num_hparams": tree.numel(state.raw) if state is not None and state.raw else 0,
        "num_params": tree.numel(state.inner.params) if state is not None else 0,
        **{k: names.get(k) for k in ("method", "hp", "dataset", "model")},
        "seed": s.seed,
        "outer_steps": s.outer_steps,
        "inner_steps": s.inner_steps,
        "device": str(exp.device),
        **more,
    }
    if state is not None and state.raw:
        values = hp_in_use(exp, state)
        stats = tensor_stats("hp", values) if values.numel() else {}
        out["hp_final"] = {k.split("/")[-1]: v for k, v in stats.items()}
        out["hp_final"]["moved_fraction"] = moved_fraction(values, state.raw0)
    return out
