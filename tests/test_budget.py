"""``max_time`` (a budget of solver time) and ``time/solver_s`` (training and hypergradients, without evaluation,
logging or checkpoints): parsed in one line, logged beside ``time/elapsed_s``, the run ended cleanly at the step
that spends the budget, and a resume that either has nothing to do or continues with a larger budget."""

import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

from hoexp.cli import compose_spec, validate_job
from hoexp.config.run import run_experiment
from hoexp.config.spec import parse_max_time
from hoexp.engine import budget, loop
from hoexp.errors import ConfigError

SMALL = ["outer_steps=6", "inner_steps=3", "model.width=8", "method.terms=2", "progress=false", "device=cpu"]


@pytest.mark.parametrize(
    "value,seconds",
    [(None, None), (90, 90.0), (2.5, 2.5), ("1:30:00", 5400.0), ("01:30", 90.0), ("0:00:05", 5.0), ("100:00", 6000.0)],
)
def test_max_time_takes_seconds_or_clock_strings(value, seconds):
    assert parse_max_time(value) == seconds


@pytest.mark.parametrize("override", ["max_time=1h", "max_time=0", "max_time=-5", "max_time=1:75:00", "max_time=true"])
def test_a_bad_max_time_is_one_line_naming_the_forms(override):
    with pytest.raises(ConfigError, match=r"is not a time budget; give seconds \(max_time=600\), HH:MM:SS or MM:SS"):
        validate_job([override], device=False)


def _run(tmp_path, *overrides):
    spec, text = compose_spec([*SMALL, *overrides])
    return run_experiment(spec, tmp_path / "run", config_text=text, console=Console(file=io.StringIO()))


def _metrics(tmp_path):
    return [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


class StepClock:
    """``synced_clock`` stand-in: every outer step spends ``step_s`` of solver time, between its two readings."""

    def __init__(self, step_s: float):
        self.step_s, self.now, self.calls = step_s, 1000.0, 0

    def __call__(self, device: torch.device) -> float:
        self.calls += 1
        if self.calls % 2 == 0:  # the reading at a step's end
            self.now += self.step_s
        else:  # at its start: what ran since (evaluation, logging, checkpoints) is not solver time
            self.now += 100.0
        return self.now


def test_max_time_ends_the_run_at_the_step_that_spends_it_evaluated_and_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "synced_clock", StepClock(0.5))
    summary = _run(tmp_path, "max_time=1.2", "eval_every=5", "checkpoint_every=5")
    assert summary["status"] == "completed" and summary["stopped_by"] == "max_time"
    assert summary["solver_time_s"] == 1.5 and summary["max_time_s"] == 1.2
    assert summary["hypergradients"] == 3 and summary["final"]["step"] == 3  # evaluated at its last step
    lines = _metrics(tmp_path)
    assert [ln["step"] for ln in lines] == [0, 1, 2, 3]
    assert [ln["time/solver_s"] for ln in lines] == [0.0, 0.5, 1.0, 1.5]
    assert "loss/val" in lines[-1] and "loss/val" not in lines[2]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["status"] == "completed" and ckpt["solver_s"] == 1.5
    assert (tmp_path / "run" / "final.pt").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_by"] == "max_time"


@pytest.mark.slow
def test_a_budget_stopped_run_resumes_only_with_a_larger_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "synced_clock", StepClock(0.5))
    _run(tmp_path, "max_time=1.2")
    before = (tmp_path / "run" / "summary.json").read_text()
    again = _run(tmp_path, "max_time=1.2")  # resume=auto: its budget is spent, nothing runs
    assert again["final"]["step"] == 3 and (tmp_path / "run" / "summary.json").read_text() == before
    assert len(_metrics(tmp_path)) == 4
    more = _run(tmp_path, "max_time=00:02")  # 2 s: one more step (2.0 ≥ 2)
    assert more["stopped_by"] == "max_time" and more["final"]["step"] == 4 and more["solver_time_s"] == 2.0
    assert more["resumes"] == [{"step": 3, "changes": {"max_time": [1.2, "00:02"]}}]
    done = _run(tmp_path, "max_time=null")
    assert done["status"] == "completed" and "stopped_by" not in done and done["final"]["step"] == 6
    assert [ln["time/solver_s"] for ln in _metrics(tmp_path)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


def test_without_budget_or_within_it_the_run_goes_to_outer_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "synced_clock", StepClock(0.5))
    summary = _run(tmp_path, "max_time=3")  # spent exactly at the last step: a normal end
    assert summary["final"]["step"] == 6 and "stopped_by" not in summary and summary["solver_time_s"] == 3.0


def test_a_methods_compile_warm_up_is_logged_apart_and_left_out_of_solver_time(tmp_path, monkeypatch):
    """A method that reports ``time/compile_s`` (method.compile=true's first call) has it taken off its outer step's
    time: outer step 1 spends 0.5 s of which 0.25 s compiling, so solver time reads 0.25, 0.75, 1.25 and the budget
    of 1.2 s ends the run at step 3, not 2; the compile seconds are in that step's metrics, the summary
    (``compile_time_s``) and the checkpoint."""
    from hoexp.types import COMPILE_S

    monkeypatch.setattr(loop, "synced_clock", StepClock(0.5))
    real, calls = loop.advance, []

    def advance(*args, **kwargs):
        res = real(*args, **kwargs)
        calls.append(1)
        return res._replace(scalars={**res.scalars, COMPILE_S: 0.25}) if len(calls) == 1 else res

    monkeypatch.setattr(loop, "advance", advance)
    summary = _run(tmp_path, "max_time=1.2")
    lines = _metrics(tmp_path)
    assert [ln["time/solver_s"] for ln in lines] == [0.0, 0.25, 0.75, 1.25]
    assert [ln.get("time/compile_s") for ln in lines] == [None, 0.25, None, None]
    assert summary["solver_time_s"] == 1.25 and summary["compile_time_s"] == 0.25
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["compile_s"] == 0.25


def test_solver_time_leaves_out_evaluation(tmp_path, monkeypatch):
    """Real clocks: a slow evaluation (0.2 s each, 7 of them) shows in elapsed, not in solver time."""
    from hoexp.engine import evaluate as ev

    slow = ev.evaluate

    def evaluate(*a, **k):
        time.sleep(0.2)
        return slow(*a, **k)

    monkeypatch.setattr(ev, "evaluate", evaluate)
    summary = _run(tmp_path)
    lines = _metrics(tmp_path)
    steps = [ln["time/outer_step_s"] for ln in lines[1:]]
    assert [ln["time/solver_s"] for ln in lines[1:]] == pytest.approx([sum(steps[: i + 1]) for i in range(6)])
    assert summary["solver_time_s"] == lines[-1]["time/solver_s"] and summary["solver_time_s"] > 0
    assert summary["wall_time_s"] - summary["solver_time_s"] >= 7 * 0.2


def test_the_clock_waits_for_the_gpu(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    budget.synced_clock(torch.device("cpu"))
    assert synced == []
    budget.synced_clock(torch.device("cuda", 0))
    assert synced == [torch.device("cuda", 0)]


@pytest.mark.slow
def test_every_rank_stops_at_the_same_step(tmp_path):
    """Data-parallel: ranks' clocks differ; the run stops on every rank once any rank's solver time is spent."""
    import torch.multiprocessing as mp

    from tests import dist_worker

    mp.spawn(dist_worker.budget_worker, args=(2, str(tmp_path)), nprocs=2)
    decided = [torch.load(tmp_path / f"budget{r}.pt") for r in range(2)]
    assert decided == [[True, False], [True, False]]


# Run in a fresh interpreter (this one has imported torch._dynamo through other tests): the modules present when
# outer step 1 starts, and those imported from then until outer step 2 starts.
_FIRST_STEP_IMPORTS = """
import json, sys
from hoexp.cli import compose_spec
from hoexp.config.build import build
from hoexp.engine.loop import run

class Record:
    seen = {}
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    def start_outer(self, step): self.seen[step] = set(sys.modules)
    def advance_inner(self, n=1): pass
    def end_outer(self, step, fields): pass
    def message(self, text): pass

spec = compose_spec(["progress=false", "threads=1", "outer_steps=2", "inner_steps=2", *sys.argv[1:]])[0]
run(build(spec), progress=Record())
print(json.dumps({"before": "torch._dynamo" in Record.seen[1], "new": sorted(Record.seen[2] - Record.seen[1])}))
"""


@pytest.mark.slow
def test_outer_step_one_imports_nothing():
    """torch.func's first gradient imports torch._dynamo lazily (~900 modules, seconds): the run imports it before
    its clock starts, so outer step 1's ``time/outer_step_s`` is a step's, not torch's start-up."""
    overrides = ["method=saba", "dataset.batch_size=0", "dataset.val_batch_size=0"]  # iris: no torchvision
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_STEP_IMPORTS, *overrides],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] and got["new"] == []
