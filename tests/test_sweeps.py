"""Sweeps: launcher presets (joblib, submitit), end to end as `hoexp run -m` subprocesses; the
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
    p = subprocess.Popen([sys.executable, "-m", "hoexp", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
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


@pytest.mark.parametrize("override", ["hydra/sweeper=tpe", "hydra/sweeper=random_search",
                                      *(f"experiment={e}" for e in BLACKBOX)])
def test_removed_presets_are_refused_naming_hoexp_compare(override):
    with pytest.raises(ConfigError, match="hoexp compare") as e:
        validate_job([override, "method=none"])
    assert "\n" not in str(e.value)


def test_basic_sweeper_still_composes():
    assert compose(["hydra/sweeper=basic"]).hydra.sweeper._target_.endswith("BasicSweeper")
    validate_job(["hydra/sweeper=basic", "method=none"])


def test_launcher_presets_compose():
    assert compose(["hydra/launcher=parallel"]).hydra.launcher._target_.endswith("JoblibLauncher")
    slurm = compose(["hydra/launcher=slurm"]).hydra.launcher
    gpu = compose(["hydra/launcher=slurm_gpu"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and gpu._target_ == slurm._target_
    assert slurm.gpus_per_node is None and gpu.gpus_per_node == 1
    # Requeued on time-out (3 times) and preemption, a job reruns with the same overrides and continues
    # from its checkpoint: resume=auto is the default.
    assert slurm.max_num_timeout == gpu.max_num_timeout == 3 and compose(["hydra/launcher=slurm"]).resume == "auto"


@pytest.mark.parametrize("preset,expected", [
    ("slurm", ["#SBATCH --cpus-per-task=2", "#SBATCH --mem=8GB", "#SBATCH --time=60", "#SBATCH --partition=cpu"]),
    ("slurm_gpu", ["#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
                   "#SBATCH --time=120", "#SBATCH --partition=cpu"]),
])
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
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -m hoexp", "uid")
    for line in expected:
        assert line in script, script


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_joblib_launcher_runs_two_jobs_in_worker_processes(tmp_path):
    sweep = tmp_path / "sweep"
    pid, _, err = hoexp("run", "-m", "method=none,cg", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                        "outer_steps=2", "inner_steps=5", "progress=false", f"hydra.sweep.dir={sweep}")
    assert "Joblib.Parallel(n_jobs=2" in err + _
    s = summaries(sweep)
    assert sorted(s) == ["0_none", "1_cg"]
    assert s["0_none"]["method"] == "none" and s["1_cg"]["method"] == "cg"
    assert s["1_cg"]["hypergradients"] == 2 and s["0_none"]["hypergradients"] == 0
    assert all(v["status"] == "completed" for v in s.values())
    pids = {event_pid(sweep / name) for name in s}
    assert pid not in pids  # the jobs ran in loky workers, not in the `hoexp run` process


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    pid, _, _ = hoexp("run", "-m", "method=none,cg", "hydra/launcher=submitit_local", "outer_steps=2",
                      "inner_steps=5", "progress=false", f"hydra.sweep.dir={sweep}")
    s = summaries(sweep)
    assert sorted(s) == ["0_none", "1_cg"] and s["1_cg"]["hypergradients"] == 2
    assert (sweep / ".submitit").is_dir()
    assert pid not in {event_pid(sweep / name) for name in s}  # each job in its own process


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_the_same_command(tmp_path):
    """SIGTERM while job 1 of 3 runs: the same command again finishes job 1 from its checkpoint and runs
    job 2, which never started (README: hydra.sweep.dir=... resume=true did stop at it)."""
    import signal
    import time

    args = ["run", "-m", "seed=0,1,2", "outer_steps=4", "inner_steps=100", "checkpoint_every=1", "progress=false",
            f"hydra.sweep.dir={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.Popen([sys.executable, "-m", "hoexp", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
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
