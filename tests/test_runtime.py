"""The run's runtime (device, process group, precision, compile: ``hoexp.engine.runtime``) is the engine's, not the
task's; the generic engine runs a task that is not a classifier; one ``hoexp run`` composes, validates and builds
its job once."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from rich.console import Console
from torch import nn
from torch.func import functional_call

import hoexp
from hoexp.engine import RunIO
from hoexp.engine.metrics import MemoryLogger
from hoexp.engine.runtime import Runtime
from hoexp.hp.weight_decay import WeightDecay
from hoexp.method.base import eager_step
from hoexp.method.implicit import ImplicitMethod
from hoexp.method.solvers import Neumann
from hoexp.optim import build_optimizer
from hoexp.task.streams import FullBatch
from tests.counting import BUILT, count_composes_and_builds

D = torch.float64


@dataclass
class LinearRegression:
    """``L_T(w, λ) = mean (Xw − y)² + penalty_λ(w)``, ``L_V(w) = mean (X_val w − y_val)²``: a task of its own
    (no :class:`~hoexp.task.Classification`), whose evaluation has losses and no accuracy."""

    model: nn.Module
    family: WeightDecay
    train: SimpleNamespace
    val: SimpleNamespace
    batch_dim: int = 0

    def _mse(self, params, batch):
        return ((functional_call(self.model, dict(params), (batch[0],)).squeeze(-1) - batch[1]) ** 2).mean()

    def train_loss(self, params, raw, batch):
        return self._mse(params, batch) + self.family.penalty(params, raw)

    def val_loss(self, params, raw, batch):
        return self._mse(params, batch)

    def train_stream(self, seed):
        return FullBatch(self.train)

    def val_stream(self, seed, outer_objective="val"):
        return FullBatch(self.train if outer_objective == "train" else self.val)

    @torch.no_grad()
    def evaluate_all(self, params):
        return {
            "train_loss": self._mse(params, (self.train.x, self.train.y)),
            "val_mse": self.val_loss(params, {}, (self.val.x, self.val.y)),
            "val_loss": self.val_loss(params, {}, (self.val.x, self.val.y)),
        }

    def derived_metrics(self, metrics):
        return {}


def _regression(seed: int = 0) -> LinearRegression:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, generator=g, dtype=D)
    x_train, x_val = torch.randn(20, 6, generator=g, dtype=D), torch.randn(40, 6, generator=g, dtype=D)
    y_train = x_train @ w + 0.5 * torch.randn(20, generator=g, dtype=D)
    y_val = x_val @ w + 0.5 * torch.randn(40, generator=g, dtype=D)
    torch.manual_seed(seed)
    model = nn.Linear(6, 1).to(D)
    family = WeightDecay("per_weight", init_value=0.1)
    return LinearRegression(model, family, SimpleNamespace(x=x_train, y=y_train), SimpleNamespace(x=x_val, y=y_val))


def test_a_regression_task_without_accuracy_runs_through_the_engine(tmp_path):
    exp = hoexp.Experiment(
        task=_regression(),
        method=ImplicitMethod(Neumann(10, 0.05), "neumann"),
        inner_opt=build_optimizer("sgd", lr=0.05),
        outer_opt=build_optimizer("adam", lr=0.05),
        settings=hoexp.RunSettings(outer_steps=3, inner_steps=20, eval_every=1),
    )
    mem = MemoryLogger()
    summary = hoexp.run(exp, RunIO(tmp_path, console=Console(file=io.StringIO()), loggers=[mem]))
    assert summary["status"] == "completed" and summary["hypergradients"] == 3
    assert set(summary["final"]) == {"step", "train_loss", "val_mse", "val_loss"}  # what the task measures, no more
    assert summary["best"]["val_loss"] <= summary["final"]["val_loss"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    losses = [v for _, v in mem.series("loss/val")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))  # steps 0..3
    assert [v for _, v in mem.series("mse/val")] == losses
    assert all(v > 0 for _, v in mem.series("hypergrad/norm")) and summary["hp_final"]["moved_fraction"] > 0


def test_the_task_is_left_as_its_factory_made_it():
    """``build`` puts the run modes in ``exp.runtime``; the task keeps only its own fields."""
    from hoexp.config.build import build
    from hoexp.config.compose import compose_spec

    exp = build(compose_spec(["model.width=4", "precision=bf16"])[0])
    assert not {"compile", "compiled", "precision", "sync"} & set(vars(exp.problem))
    assert exp.runtime.precision is not None and exp.runtime.precision.name == "bf16"
    assert exp.runtime.task(exp.problem) is exp.problem  # one process: the losses as they are
    assert Runtime().step() is eager_step


def test_one_run_composes_validates_and_builds_its_job_once(tmp_path, monkeypatch):
    import hoexp.cli

    counts = count_composes_and_builds(monkeypatch)
    overrides = ["model.width=4", "outer_steps=1", "inner_steps=1", "progress=false", f"hydra.run.dir={tmp_path}"]
    hoexp.cli.main(["run", *overrides])
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    # Hydra's own compose inside hydra.main (its run folder, .hydra/) is not one of these: the job's config is not
    # composed, validated or built again after the checks before launch.
    assert counts == Counter({"compose": 1, "validate": 1, **{f"build {k}": 1 for k in BUILT}}), counts


def test_each_job_of_a_sweep_in_this_process_is_composed_validated_and_built_once(tmp_path, monkeypatch):
    import hoexp.cli

    counts = count_composes_and_builds(monkeypatch)
    overrides = ["model.width=4", "outer_steps=1", "inner_steps=1", "progress=false", f"hydra.sweep.dir={tmp_path}"]
    hoexp.cli.main(["run", "-m", "seed=0,1", "method=none,cg", *overrides])
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")]
    assert len(summaries) == 4 and {s["status"] for s in summaries} == {"completed"}
    assert counts == Counter({"compose": 4, "validate": 4, **{f"build {k}": 4 for k in BUILT}}), counts
