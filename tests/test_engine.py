"""``hoexp.run`` on an experiment built by hand in Python (no config, no Hydra), and the engine's start state."""

import io
import json

import pytest
import torch
from rich.console import Console

import hoexp
from hoexp.dataset.iris import load_iris
from hoexp.engine import RunIO, start
from hoexp.engine.metrics import MemoryLogger
from hoexp.hp.weight_decay import WeightDecay
from hoexp.method.base import inner_scalars, train_inner
from hoexp.method.implicit import ImplicitMethod, NoHO
from hoexp.method.solvers import Neumann
from hoexp.model.mlp import MLP
from hoexp.optim import build_optimizer
from hoexp.task import Classification
from hoexp.types import OuterResult, OuterStep


def _experiment(method=None, **settings):
    torch.manual_seed(0)
    data = load_iris(dtype=torch.float64)
    model = MLP(4, 3, width=8, depth=1).to(torch.float64)
    task = Classification(model, WeightDecay("per_weight", init_value=1e-3), data=data)
    return hoexp.Experiment(
        task=task,
        method=method or ImplicitMethod(Neumann(5, 0.01), "neumann"),
        inner_opt=build_optimizer("sgd", lr=0.1, momentum=0.9, nesterov=True),
        outer_opt=build_optimizer("adam", lr=0.01),
        settings=hoexp.RunSettings(**{"outer_steps": 3, "inner_steps": 5, **settings}),
    )


def _quiet(out_dir=None, loggers=()):
    return RunIO(out_dir, console=Console(file=io.StringIO()), loggers=list(loggers))


def test_run_on_a_hand_built_experiment_is_deterministic_and_writes_nothing_without_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = []
    for _ in range(2):
        mem = MemoryLogger()
        summary = hoexp.run(_experiment(), _quiet(loggers=[mem]))
        runs.append([v for _, v in mem.series("hypergrad/norm")])
    assert summary["status"] == "completed" and summary["hypergradients"] == 3
    assert summary["final"]["step"] == 3 and summary["hp_final"]["moved_fraction"] > 0
    assert runs[0] == runs[1] and len(runs[0]) == 3 and all(v > 0 for v in runs[0])
    assert list(tmp_path.iterdir()) == []  # no folder: no file


def test_run_into_a_folder_writes_the_summary_and_final_state(tmp_path):
    summary = hoexp.run(_experiment(checkpoint_every=2), _quiet(tmp_path))
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert set(final) == {"params", "raw_hparams", "hparams"}
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3


class ZeroHypergradient:
    """A method written in the test: plain training, a zero hypergradient (the outer optimizer then stays put)."""

    name = "zero"
    extra_batches = 0
    needs_stationary_point = False
    differentiates_steps = False

    def __call__(self, s: OuterStep) -> OuterResult:
        assert len(s.train) == 5 and s.extra == []
        inner, loss, gnorm = train_inner(s.task, s.inner_opt, s.inner, s.raw, s.train, None, s.on_step)
        return OuterResult({k: torch.zeros_like(v) for k, v in s.raw.items()}, inner, inner_scalars(loss, gnorm))


def test_a_method_defined_outside_hoexp_runs_in_the_engine():
    exp = _experiment(ZeroHypergradient())
    summary = hoexp.run(exp, _quiet())
    assert summary["status"] == "completed" and summary["hypergradients"] == 3
    assert summary["hp_final"]["moved_fraction"] == 0  # Adam on zero gradients does not move
    assert summary["method"] == "zero" and summary["model"] == "MLP"  # no config: the objects' names


class Counting(ImplicitMethod):
    calls: int = 0

    def __call__(self, st):
        self.calls += 1
        return super().__call__(st)


def test_log_every_writes_every_kth_step_and_every_evaluation_and_changes_nothing_else():
    """log_every=4 over 10 outer steps (evaluations every 3, histograms every 5): scalars at steps 0, 3, 4, 5, 6, 8,
    9, 10 (the last), each with the values the run logs at that step with log_every=1, and the same summary."""
    every, sparse = MemoryLogger(), MemoryLogger()
    full = hoexp.run(_experiment(outer_steps=10, eval_every=3, histogram_every=5), _quiet(loggers=[every]))
    few = hoexp.run(_experiment(outer_steps=10, eval_every=3, histogram_every=5, log_every=4), _quiet(loggers=[sparse]))
    assert [s for s, _ in sparse.scalars] == [0, 3, 4, 5, 6, 8, 9, 10]
    logged = dict(every.scalars)
    for step, values in sparse.scalars:
        same = {k: v for k, v in values.items() if not k.startswith("time/")}  # clocks differ between two runs
        assert same == {k: v for k, v in logged[step].items() if not k.startswith("time/")}, step
    assert [s for s, _ in sparse.histograms] == [s for s, _ in every.histograms] == [0, 5, 10]
    assert {k: v for k, v in few.items() if "time" not in k} == {k: v for k, v in full.items() if "time" not in k}


def test_warmup_trains_without_hypergradients_then_hands_over_to_the_method():
    method = Counting(Neumann(5, 0.01), "neumann")
    mem = MemoryLogger()
    summary = hoexp.run(_experiment(method, warmup=2, outer_steps=4), _quiet(loggers=[mem]))
    assert method.calls == 2 and summary["hypergradients"] == 2  # outer steps 3 and 4
    assert [s for s, _ in mem.series("hypergrad/norm")] == [3, 4]
    hp_mean = dict(mem.series("hp/mean"))
    assert hp_mean[1] == hp_mean[2] == pytest.approx(1e-3) != hp_mean[3]  # the rates stay put during the warm-up
    # the warm-up's weights are those of plain training at the initial hyperparameters
    plain = MemoryLogger()
    hoexp.run(_experiment(NoHO(), outer_steps=2), _quiet(loggers=[plain]))
    assert dict(plain.series("inner/loss"))[2] == dict(mem.series("inner/loss"))[2]


def test_warmup_until_plateau_waits_for_the_validation_loss_to_rise():
    from hoexp.engine.loop import warming_up

    s = hoexp.RunSettings(outer_steps=9, inner_steps=1, warmup=2, warmup_until_plateau=True)
    evals = [{"step": 0, "val_loss": 9.0}, {"step": 2, "val_loss": 1.0}, {"step": 4, "val_loss": 0.5}]
    assert warming_up(s, evals, 1) and warming_up(s, evals, 5)  # still improving (step 0's loss does not count)
    evals.append({"step": 6, "val_loss": 0.7})
    assert not warming_up(s, evals, 7)  # above the best before it: the model overfits
    evals.append({"step": 8, "val_loss": 0.4})
    assert not warming_up(s, evals, 9)  # once started, hyper-steps go on
    assert warming_up(s, evals, 2)  # the first `warmup` steps are plain regardless
    assert not warming_up(hoexp.RunSettings(outer_steps=9, inner_steps=1, warmup=2), [], 3)
    # in a run: hyper-steps start right after the first evaluation above the best one before it
    mem = MemoryLogger()
    summary = hoexp.run(
        _experiment(warmup_until_plateau=True, outer_steps=40, inner_steps=20, eval_every=1), _quiet(loggers=[mem])
    )
    val = [v for _, v in mem.series("loss/val")][1:]  # outer steps 1..40
    rise = next(i + 1 for i, v in enumerate(val) if i > 0 and v > min(val[:i]))
    assert [s for s, _ in mem.series("hypergrad/norm")] == list(range(rise + 1, 41))
    assert summary["hypergradients"] == 40 - rise > 0


def test_start_is_the_set_up_every_caller_shares():
    exp = _experiment()
    state = start(exp)
    params = dict(exp.task.model.named_parameters())
    assert state.step == 0 and state.inner.step == 0 and set(state.inner.params) == set(params)
    assert all(torch.equal(state.inner.params[k], params[k]) and state.inner.params[k] is not params[k] for k in params)
    assert state.raw.keys() == exp.task.family.init(params).keys()
    batch = next(state.train)
    assert torch.equal(batch.x, exp.task.data.train.x) and batch.noise is None  # Iris: the full batch


def test_the_engine_on_built_objects_gives_the_configured_run_s_pinned_numbers():
    """``hoexp.run`` on the objects ``build`` makes (no folder) = ``run_experiment`` (tests/test_pinned.py)."""
    from hoexp.cli import compose_spec
    from hoexp.config.build import build
    from tests.test_pinned import PINNED

    spec, _ = compose_spec(["outer_steps=3", "inner_steps=10", "progress=false", "dtype=float64", "seed=0"])
    built = build(spec)
    exp = hoexp.Experiment(built.task, built.method, built.inner_opt, built.outer_opt, built.settings, built.device)
    mem = MemoryLogger()
    summary = hoexp.run(exp, _quiet(loggers=[mem]))
    val, hp_mean, norms = PINNED[""]
    assert summary["final"]["val_loss"] == pytest.approx(val, rel=1e-7)
    assert summary["hp_final"]["mean"] == pytest.approx(hp_mean, rel=1e-7)
    assert [v for _, v in mem.series("hypergrad/norm")] == pytest.approx(list(norms), rel=1e-6)


def test_automatic_threads_leave_the_cores_other_processes_use(monkeypatch):
    """threads=0: a large model on the CPU takes the cores not busy when the run starts. It took every core
    whatever the load: the PTB preset's 3x5-step run spent 590 s instead of 29 s at load 5-6 on 2 cores, nearly all
    in evaluation, its 2 threads stalling each other (issue 28, item 10)."""
    from hoexp.engine import io
    from hoexp.engine.io import auto_threads, thread_policy

    cpu, big = torch.device("cpu"), 2_600_000  # the PTB LSTM's weights
    assert auto_threads(cpu, big, available=2, load=0.2) == 2  # a quiet machine: every core
    assert auto_threads(cpu, big, available=2, load=5.9) == 1  # the machine: one
    assert auto_threads(cpu, big, available=8, load=2.6) == 5
    assert auto_threads(cpu, big, available=8, load=40.0) == 1
    assert auto_threads(cpu, 17_280, available=8, load=0.0) == 1  # a small model: one, as before
    assert auto_threads(torch.device("cuda"), big, available=8, load=40.0) == 8  # the host side of a GPU run
    before = torch.get_num_threads()
    monkeypatch.setattr(io, "machine_load", lambda: 99.0)
    with thread_policy(0, cpu, big) as threads:
        assert threads == 1 == torch.get_num_threads()
    with thread_policy(3, cpu, big) as threads:  # an explicit threads=N is kept whatever the load
        assert threads == 3 == torch.get_num_threads()
    assert torch.get_num_threads() == before
