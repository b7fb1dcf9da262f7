"""``hoexp compare`` end to end on tiny problems: the default weight-decay compare runs through (its
grid values as overrides), an interrupted compare continues with the command it prints (finished runs
kept, the stopped one resumed from its checkpoint), and ``kill -9`` of a compare with search workers
leaves no worker behind, after which the same command finishes the study."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["outer_steps=2", "inner_steps=5", "model.width=16"]


def _env():
    return {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}


def _hoexp(args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "hoexp", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _wait_for(predicate, seconds, what):
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < seconds, f"timed out waiting for {what}"
        time.sleep(0.1)


def _advice(stderr: str) -> list[str]:
    """The command a stopped compare prints, as argv for this Python."""
    (line,) = stderr.strip().splitlines()
    m = re.search(r"continue with: (hoexp compare .*)$", line)
    assert m, line
    return [sys.executable, "-m", "hoexp", *shlex.split(m.group(1))[1:]]


@pytest.mark.slow
def test_the_default_compare_runs_on_a_weight_decay_problem(tmp_path):
    """The issue's reproduction (default grid 1e-5…1e-1) and scripts/compare_iris.py with every default
    (grid, random search and TPE) on a tiny version of the Iris preset: both run to the report."""
    p = _hoexp(
        ["compare", "outer_steps=2", "inner_steps=5", "--search", "none", "--out", str(tmp_path / "a")], tmp_path
    )
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads((tmp_path / "a" / "compare.json").read_text())
    grid = {c["value"]: c["runs"][0] for c in data["contenders"] if c["kind"] == "grid_point"}
    assert sorted(grid) == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1] and {r["status"] for r in grid.values()} == {"completed"}
    cfg = (tmp_path / "a" / "grid" / "seed0" / "point0" / ".hydra" / "config.yaml").read_text()
    assert "init: 1.0e-05" in cfg

    script = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare_iris.py"), *TINY, "--max-trials", "2", "--out", "b"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert script.returncode == 0, script.stderr[-2000:]
    kinds = [c["kind"] for c in json.loads((tmp_path / "b" / "compare.json").read_text())["contenders"]]
    assert kinds == ["ho", "ho", "baseline", *["grid_point"] * 5, "grid_best", "search", "search"]


@pytest.mark.slow
def test_an_interrupted_compare_continues_with_the_command_it_prints(tmp_path):
    """Ctrl-C during a grid point: one line with the command to continue, exit 130; that very command
    keeps the finished HO and baseline runs (their files untouched), resumes the stopped point from its
    checkpoint and runs the rest."""
    out = tmp_path / "cmp"
    args = ["compare", "outer_steps=60", "inner_steps=5", "model.width=16", "checkpoint_every=2"]
    args += ["--grid", "1e-4,1e-2", "--search", "none", "--out", str(out)]
    p = subprocess.Popen(
        [sys.executable, "-m", "hoexp", *args], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    point0 = out / "grid" / "seed0" / "point0"
    try:
        _wait_for(lambda: (point0 / "checkpoint.pt").exists() or p.poll() is not None, 240, "a grid checkpoint")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    stderr = err.decode()
    assert p.returncode == 130, stderr
    assert f"compare stopped by SIGINT in {point0.resolve()}" in stderr and "hydra.run.dir" not in stderr
    assert json.loads((point0 / "summary.json").read_text())["status"] == "interrupted"
    files = [f for part in ("ho", "baseline") for f in (out / part).rglob("*") if f.is_file()]
    kept = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    assert len(kept) >= 10  # the HO and baseline runs' files (summary.json, metrics.jsonl, checkpoint, .hydra/...)

    again = subprocess.run(_advice(stderr), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in kept} == kept
    lines = [line for line in again.stdout.splitlines() if line.startswith("  seed")]
    assert lines[0].endswith("completed (kept)") and lines[1].endswith("completed (kept)")
    assert lines[2].endswith("completed (resumed from its checkpoint)") and lines[3].endswith("completed")
    assert (out / "compare.json").is_file()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_kill_9_leaves_no_search_worker_and_the_same_command_finishes_the_study(tmp_path):
    """``kill -9`` of a compare while its 2 search workers run trials: every process it started is gone
    within seconds (they get a parent-death signal and save their trials' checkpoints); the same command
    then keeps the HO and baseline runs, resumes the stopped trials and ends the study."""
    out = tmp_path / "cmp"
    args = ["compare", "outer_steps=30", "inner_steps=5", "model.width=16", "--grid", "none", "--search", "random"]
    # --no-prune: the median pruner would stop a trial whose early loss is worse than the others (which ones
    # depends on the two workers' timing); every trial must then complete.
    args += ["--workers", "2", "--budget-s", "120", "--max-trials", "4", "--no-prune", "--out", str(out)]
    p = subprocess.Popen(
        [sys.executable, "-m", "hoexp", *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    sdir = out / "random" / "seed0"
    try:
        _wait_for(lambda: len(list(sdir.glob("trial_*/metrics.jsonl"))) == 2 or p.poll() is not None, 240, "2 trials")
        workers = _descendants(p.pid)
        assert len(workers) >= 2 and p.poll() is None
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        t0 = time.time()
        _wait_for(lambda: not any(_alive(w) for w in workers), 30, f"workers {workers} to die")
        print(f"workers gone {time.time() - t0:.1f} s after kill -9")
    finally:
        for w in _descendants(p.pid):
            os.kill(w, signal.SIGKILL)
    again = _hoexp(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "random search (continued)" in again.stdout and again.stdout.count("(kept)") == 2
    (study,) = next(c for c in json.loads((out / "compare.json").read_text())["contenders"] if c["kind"] == "search")[
        "studies"
    ]
    assert [t["number"] for t in study["trials"]] == [0, 1, 2, 3]
    assert {t["state"] for t in study["trials"]} == {"COMPLETE"}
