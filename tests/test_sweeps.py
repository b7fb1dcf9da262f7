"""Sweeps: launcher presets (parallel, submitit), end to end as `hoexp run -m` subprocesses; the
Optuna sweeper presets and black-box experiment presets are gone (random search and TPE are
`hoexp compare`, tests/test_compare.py) and refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hoexp.cli import group_options, validate_job
from hoexp.errors import ConfigError
from tests import stopping

ROOT = Path(__file__).resolve().parents[1]
BLACKBOX = ["iris_blackbox_wd", "iris_blackbox_wd_lr", "iris_blackbox_wd_dropout_lr"]


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="hoexp.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def hoexp(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.Popen(
        [sys.executable, "-m", "hoexp", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return p.pid, out, err


def summaries(folder):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*/summary.json"))}


def event_pid(run_dir):
    (ev,) = Path(run_dir).glob("events.out.tfevents.*")
    return int(ev.name.split(".")[-2])  # events.out.tfevents.<time>.<host>.<pid>.<n>


# ------------------------------------------------------------------------------ presets (fast)
def test_optuna_sweeper_and_blackbox_presets_are_gone():
    assert not (ROOT / "hoexp" / "conf" / "hydra" / "sweeper").exists()
    assert not set(BLACKBOX) & set(group_options("experiment"))


@pytest.mark.parametrize(
    "override", ["hydra/sweeper=tpe", "hydra/sweeper=random_search", *(f"experiment={e}" for e in BLACKBOX)]
)
def test_removed_presets_are_refused_naming_hoexp_compare(override):
    with pytest.raises(ConfigError, match="hoexp compare") as e:
        validate_job([override, "method=none"])
    assert "\n" not in str(e.value)


def test_basic_sweeper_still_composes():
    assert compose(["hydra/sweeper=basic"]).hydra.sweeper._target_.endswith("BasicSweeper")
    validate_job(["hydra/sweeper=basic", "method=none"])


def test_launcher_presets_compose():
    assert (
        compose(["hydra/launcher=parallel"]).hydra.launcher._target_ == "hydra_plugins.hoexp_launcher.ParallelLauncher"
    )
    slurm = compose(["hydra/launcher=slurm"]).hydra.launcher
    gpu = compose(["hydra/launcher=slurm_gpu"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and gpu._target_ == slurm._target_
    assert slurm.gpus_per_node is None and gpu.gpus_per_node == 1
    # Requeued on time-out (3 times) and preemption, a job reruns with the same overrides and continues
    # from its checkpoint: resume=auto is the default.
    assert slurm.max_num_timeout == gpu.max_num_timeout == 3 and compose(["hydra/launcher=slurm"]).resume == "auto"


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("slurm", ["#SBATCH --cpus-per-task=2", "#SBATCH --mem=8GB", "#SBATCH --time=60", "#SBATCH --partition=cpu"]),
        (
            "slurm_gpu",
            [
                "#SBATCH --gpus-per-node=1",
                "#SBATCH --cpus-per-task=8",
                "#SBATCH --mem=32GB",
                "#SBATCH --time=120",
                "#SBATCH --partition=cpu",
            ],
        ),
    ],
)
def test_slurm_presets_make_valid_sbatch_scripts(tmp_path, monkeypatch, preset, expected):
    """What the launcher hands to submitit is accepted by its SLURM executor (no cluster needed:
    submitit only looks for srun, which is faked), and becomes these #SBATCH lines."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = compose([f"hydra/launcher={preset}", f"hydra.sweep.dir={tmp_path}", "hydra.launcher.partition=cpu"])
    launcher = instantiate(cfg.hydra.launcher)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))
    params = launcher.params  # the same translation as BaseSubmititLauncher.launch
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"]
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            k if k in base else f"slurm_{k}": v
            for k, v in params.items()
            if k not in ("submitit_folder", "max_num_timeout")
        }
    )
    script = executor._executor._make_submission_file_text("python -m hoexp", "uid")
    for line in expected:
        assert line in script, script


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_parallel_launcher_runs_jobs_in_worker_processes(tmp_path):
    sweep = tmp_path / "sweep"
    pid, _, err = hoexp(
        "run",
        "-m",
        "method=none,cg",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        "outer_steps=2",
        "inner_steps=5",
        "progress=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert "launching 2 jobs, 2 at a time" in err and "job #1 (method=cg outer_steps=2" in err
    s = summaries(sweep)
    assert sorted(s) == ["0_none", "1_cg"]
    assert s["0_none"]["method"] == "none" and s["1_cg"]["method"] == "cg"
    assert s["1_cg"]["hypergradients"] == 2 and s["0_none"]["hypergradients"] == 0
    assert all(v["status"] == "completed" for v in s.values())
    pids = {event_pid(sweep / name) for name in s}
    assert pid not in pids and len(pids) == 2  # each job in a worker of its own, not in `hoexp run`
    assert "hoexp: done in" in (sweep / "1_cg" / "job.log").read_text()


def _lock_pid(folder, timeout=200):
    """The pid of the worker that holds ``folder``'s run lock, once it has logged outer step 1 and written its
    checkpoint (the metrics line comes first: a kill between the two would leave nothing to resume)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if '"step": 1,' in (folder / "metrics.jsonl").read_text() and (folder / "checkpoint.pt").exists():
                return int((folder / ".hoexp.lock").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{folder} did not start")


def _alive(pid):
    """Running (not gone, not a zombie); Linux /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


PARALLEL = [
    "run",
    "-m",
    "hydra/launcher=parallel",
    "hydra.launcher.n_jobs=2",
    "seed=0,1,2",
    "inner_steps=100",
    "checkpoint_every=1",
    "progress=false",
]


@pytest.mark.slow
def test_parallel_sweep_survives_a_killed_worker_and_reports_it(tmp_path):
    """kill -9 of one worker: its siblings finish with their summaries, the sweep names the lost job in
    one line (exit 1), and the same command finishes it from its checkpoint (was: a joblib traceback
    that also killed the sibling without a summary)."""
    import signal

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env = stopping.slow_steps(env, tmp_path.parent / f"{tmp_path.name}-site")  # job 0 is still running at the kill
    args = [*PARALLEL, "outer_steps=6", f"hydra.sweep.dir={tmp_path}"]
    p = subprocess.Popen(
        [sys.executable, "-m", "hoexp", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    os.kill(_lock_pid(tmp_path / "0_neumann"), signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1 and "Traceback" not in err, err
    assert "hoexp: job #0 lost (worker killed by SIGKILL)" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hoexp: error: 1 of 3 jobs did not finish (#0 lost (worker killed by SIGKILL))")
    assert f"hydra.sweep.dir={tmp_path}" in last
    s = summaries(tmp_path)
    assert sorted(s) == ["1_neumann", "2_neumann"] and all(v["status"] == "completed" for v in s.values())
    _, _, err = hoexp(*args)
    s = summaries(tmp_path)
    assert sorted(s) == ["0_neumann", "1_neumann", "2_neumann"] and all(v["status"] == "completed" for v in s.values())
    assert "resumed after outer step" in (tmp_path / "0_neumann" / "job.log").read_text()


@pytest.mark.slow
def test_sigterm_to_a_parallel_sweep_stops_its_workers(tmp_path):
    """SIGTERM to `hoexp run -m`: the running workers save and stop (no orphans), the job not started
    stays so, and the sweep ends with one line (exit 143)."""
    import signal

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.Popen(
        [sys.executable, "-m", "hoexp", *PARALLEL, "outer_steps=200", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    workers = [_lock_pid(tmp_path / "0_neumann"), _lock_pid(tmp_path / "1_neumann")]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("hoexp: error: stopped by SIGTERM: 3 of 3 jobs did not finish")
    assert "#2 not started" in err and not (tmp_path / "2_neumann").exists()
    assert not any(_alive(w) for w in workers)
    s = summaries(tmp_path)
    assert sorted(s) == ["0_neumann", "1_neumann"] and all(v["status"] == "interrupted" for v in s.values())


# In each worker (its first argument is its job's payload, ``<n>.job``): SIGTERM to itself as its interpreter exits,
# after the job's result is written (where the default handler is back): what CI once saw when a stop came late.
SIGTERM_AT_EXIT = """
import atexit, os, signal, sys
if sys.argv[1:2] and sys.argv[1].endswith(".job"):
    atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))
"""


@pytest.mark.slow
def test_a_stop_that_reaches_a_worker_after_its_job_is_done_leaves_it_done(tmp_path):
    """A job whose result is written is done, whatever ends its worker after (was: 'lost (worker killed by
    SIGTERM)' and exit 1 for a sweep whose every job had finished)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env = stopping.with_site(env, tmp_path / "site", SIGTERM_AT_EXIT)
    args = [a for a in PARALLEL if not a.startswith("seed=")]
    r = subprocess.run(
        [sys.executable, "-m", "hoexp", *args, "seed=0,1", "outer_steps=2", f"hydra.sweep.dir={tmp_path / 's'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0 and "lost" not in r.stderr, r.stderr
    ends = sorted(
        ln.split(" in ")[0] for ln in r.stderr.splitlines() if ln.startswith("hoexp: job #") and "(" not in ln
    )
    assert ends == ["hoexp: job #0 done", "hoexp: job #1 done"], r.stderr
    s = summaries(tmp_path / "s")
    assert sorted(s) == ["0_neumann", "1_neumann"] and all(v["status"] == "completed" for v in s.values())


@pytest.mark.slow
def test_workers_stop_when_the_launcher_is_killed(tmp_path):
    """kill -9 of the launcher itself: the kernel sends its workers SIGTERM (they save and stop)."""
    import time

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.Popen(
        [sys.executable, "-m", "hoexp", *PARALLEL, "outer_steps=200", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    workers = [_lock_pid(tmp_path / "0_neumann"), _lock_pid(tmp_path / "1_neumann")]
    p.kill()
    p.wait(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    assert all(v["status"] == "interrupted" for v in summaries(tmp_path).values())


@pytest.mark.slow
def test_parallel_workers_draw_no_bars_on_a_terminal(tmp_path):
    """On a terminal (a pty here) the workers' progress goes to their job.log as plain lines; the
    terminal gets the launcher's lines only, without cursor movements from several bars."""
    import pty

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    leader, follower = pty.openpty()
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hoexp",
            "run",
            "-m",
            "hydra/launcher=parallel",
            "hydra.launcher.n_jobs=2",
            "seed=0,1",
            "outer_steps=3",
            "inner_steps=20",
            "progress=true",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    p.wait(timeout=300)
    os.close(leader)
    text = out.decode(errors="replace")
    assert p.returncode == 0, text
    assert "\x1b[" not in text.replace("\x1b[?25l", "").replace("\x1b[?25h", "") and "━" not in text, text
    for job in ("0_neumann", "1_neumann"):
        log = (tmp_path / job / "job.log").read_text()
        assert "[outer 3/3]" in log and "━" not in log


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    pid, _, _ = hoexp(
        "run",
        "-m",
        "method=none,cg",
        "hydra/launcher=submitit_local",
        "outer_steps=2",
        "inner_steps=5",
        "progress=false",
        f"hydra.sweep.dir={sweep}",
    )
    s = summaries(sweep)
    assert sorted(s) == ["0_none", "1_cg"] and s["1_cg"]["hypergradients"] == 2
    assert (sweep / ".submitit").is_dir()
    assert pid not in {event_pid(sweep / name) for name in s}  # each job in its own process


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_the_same_command(tmp_path):
    """SIGTERM while job 1 of 3 runs: the same command again finishes job 1 from its checkpoint and runs
    job 2, which never started (docs/cli.md: hydra.sweep.dir=... resume=true did stop at it)."""
    import signal
    import time

    args = [
        "run",
        "-m",
        "seed=0,1,2",
        "outer_steps=4",
        "inner_steps=100",
        "checkpoint_every=1",
        "progress=false",
        f"hydra.sweep.dir={tmp_path}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env = stopping.slow_steps(env, tmp_path.parent / f"{tmp_path.name}-site")  # job 1 is still running at the signal
    p = subprocess.Popen(
        [sys.executable, "-m", "hoexp", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 200
    while time.time() < deadline and not any('"step": 1,' in f.read_text() for f in tmp_path.glob("1_*/metrics.jsonl")):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert sorted(summaries(tmp_path)) == ["0_neumann", "1_neumann"] and not (tmp_path / "2_neumann").exists()
    assert summaries(tmp_path)["1_neumann"]["status"] == "interrupted"
    _, _, err = hoexp(*args, "resume=true")
    s = summaries(tmp_path)
    assert sorted(s) == ["0_neumann", "1_neumann", "2_neumann"], err
    assert all(v["status"] == "completed" and v["hypergradients"] == 4 for v in s.values())
    assert "already completed" in err and "resumed after outer step" in err
