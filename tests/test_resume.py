"""Checkpoints and resume: a run killed (SIGKILL) or preempted (SIGTERM) and resumed ends exactly like
an uninterrupted one."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import stopping

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["outer_steps=8", "inner_steps=150", "checkpoint_every=1", "progress=false", "method.terms=3"]
TIME_KEYS = ("time/elapsed_s", "time/outer_step_s", "time/solver_s")


def start(run_dir, *extra, slow=False):
    """The run in ``run_dir``; ``slow``: each outer step 0.5 s longer (same numbers), so that a test's signal finds
    it still running."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if slow:
        env = stopping.slow_steps(env, Path(run_dir).parent / f"{Path(run_dir).name}-site")
    return subprocess.Popen(
        [sys.executable, "-m", "hoexp", "run", *ARGS, *extra, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_step(run_dir, step, proc, timeout=120):
    """Poll metrics.jsonl until a line with ``step`` appears (or the process ends)."""
    path = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and any(f'"step": {step},' in ln for ln in path.read_text().splitlines()):
            return True
        time.sleep(0.01)
    return False


def metrics(run_dir):
    lines = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if k not in TIME_KEYS} for ln in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    p = start(run_dir)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return run_dir


def check_same(run_dir, reference):
    a = json.loads((Path(run_dir) / "summary.json").read_text())
    b = json.loads((Path(reference) / "summary.json").read_text())
    assert a["status"] == "completed"
    assert a["final"] == b["final"] and a["best"] == b["best"]  # bit for bit (floats compared exactly)
    assert a["hypergradients"] == b["hypergradients"] == 8 and a["hp_final"] == b["hp_final"]
    assert metrics(run_dir) == metrics(reference)


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, reference):
    kill_at = random.Random().randint(2, 6)
    p = start(tmp_path, slow=True)
    assert wait_for_step(tmp_path, kill_at, p), "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    r = start(tmp_path, "resume=true")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    assert "resumed after outer step" in err
    check_same(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_checkpoints_explains_and_resumes(tmp_path, reference):
    p = start(tmp_path, slow=True)
    assert wait_for_step(tmp_path, 3, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hoexp: error: stopped by SIGTERM after outer step ") and "Traceback" not in err
    assert "; everything is saved; resume with: hoexp run outer_steps=8 " in last
    assert f"resume=true hydra.run.dir={tmp_path}" in last
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["final"]["step"] >= 3
    r = start(tmp_path, "resume=true")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    check_same(tmp_path, reference)
    # Resuming a completed run does nothing.
    again = start(tmp_path, "resume=true")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "already completed" in err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "hoexp", "run", "resume=true", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().startswith("hoexp: error: resume=true but there is no checkpoint.pt in")


def test_checkpoint_is_loadable_with_weights_only(tmp_path):
    import torch

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hoexp",
            "run",
            "outer_steps=2",
            "inner_steps=5",
            "checkpoint_every=1",
            "progress=false",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["status"] == "completed" and ckpt["hypergradients"] == 2
    assert set(ckpt["params"]) == {"layers.0.weight", "layers.1.weight", "layers.2.weight"}
    assert not list(tmp_path.glob(".checkpoint*"))  # no temporary file left behind


@pytest.mark.slow
def test_multirun_jobs_resume_in_their_folders(tmp_path):
    def sweep(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "hoexp",
                "run",
                "-m",
                "seed=0,1",
                "outer_steps=3",
                "inner_steps=5",
                "checkpoint_every=1",
                "progress=false",
                f"hydra.sweep.dir={tmp_path}",
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    r = sweep()
    assert r.returncode == 0, r.stderr
    jobs = sorted(p.parent for p in tmp_path.glob("*/summary.json"))
    assert len(jobs) == 2
    first = json.loads((jobs[1] / "summary.json").read_text())
    again = sweep("resume=true")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already completed") == 2
    assert json.loads((jobs[1] / "summary.json").read_text())["final"] == first["final"]
