"""Data-parallel HO (hoexp.engine.distributed): N processes compute what one process computes on the concatenated
batch; a torchrun run writes one folder, resumes after a kill, and a failing rank ends it with one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hoexp.cli import compose_spec
from hoexp.errors import ConfigError
from tests import dist_worker, stopping
from tests.test_resume import wait_for_step

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_two_processes_compute_the_single_process_hypergradient(tmp_path):
    """Neumann, CG and fd (and Gauss-Newton CG, fd with terms, unrolled, looped PES): the hypergradient and the weights
    after an outer step (3 inner steps, per-unit Gaussian dropout with its noise sharded) of 2 gloo processes,
    each on half of every batch, equal the single-process ones on the whole batch, and are identical on both
    ranks; without averaging the derivatives each rank's would differ."""
    names = list(dist_worker.CASES)
    mp.spawn(dist_worker.worker, args=(2, str(tmp_path), names), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in names:
        ref = dist_worker.outer_step(name)
        for key, value in ref.items():
            for r in ranks:
                assert torch.equal(r[name][key], ranks[0][name][key]), (name, key)  # the same on every rank
            err = float((ranks[0][name][key] - value).abs().max())
            assert err <= 1e-10 * max(1.0, float(value.abs().max())), (name, key, err)
        assert any(float(v.abs().max()) > 1e-6 for k, v in ref.items() if k.startswith("hg/")), name
    unsynced, ref = ranks[0]["unsynced"], dist_worker.outer_step(names[0])
    assert max(float((unsynced[k] - ref[k]).abs().max()) for k in ref if k.startswith("hg/")) > 1e-6


def test_es_particles_spread_over_two_processes_give_the_single_process_estimate(tmp_path):
    """PES (vmapped) and NRES (looped) with method.spread (the default): each of 2 gloo processes trains 2 of the 4
    particles on whole batches and all-gathers them; over two outer steps (particles carried) the hypergradients,
    the central weights and every particle's weights equal one process's, which trains all 4, and are identical on
    both ranks (so rank 0's checkpoint holds the whole population)."""
    mp.spawn(dist_worker.spread_worker, args=(2, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"spread{r}.pt") for r in range(2)]
    for name in dist_worker.SPREAD:
        ref = dist_worker.spread_steps(name)
        assert ref["trained"].tolist() == [4, 4] and all(r[name]["trained"].tolist() == [2, 2] for r in ranks)
        for key, value in ref.items():
            if key == "trained":
                continue
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
            err = float((ranks[0][name][key] - value).abs().max())
            assert err <= 1e-10 * max(1.0, float(value.abs().max())), (name, key, err)
        assert all(float(v.abs().max()) > 1e-6 for k, v in ref.items() if k.startswith("hg2/")), name


def test_spread_particles_must_divide_evenly_over_the_ranks():
    from hoexp.config.build import build
    from hoexp.engine.distributed import Context

    spec = compose_spec([*dist_worker.BASE, "method=pes", "method.particles=6"])[0]
    with pytest.raises(ConfigError, match=r"method=pes with 4 processes: method.particles=6 cannot be spread evenly"):
        build(spec, Context(0, 4, 0))
    build(compose_spec([*dist_worker.BASE, "method=pes", "method.particles=8"])[0], Context(0, 4, 0))


def test_unsupported_methods_and_options_are_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for method, why in (
        ("exact", "dense Hessian"),
        ("forward", "torch.func"),
        ("reversible", "fixed-point"),
        ("hd", "learning rate"),
    ):
        with pytest.raises(ConfigError, match=f"method={method} does not run data-parallel .*{why}") as e:
            compose_spec(
                [f"method={method}", *{"hd": ["hp=lr"], "reversible": ["optim/inner=momentum"]}.get(method, [])]
            )
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="compile=true does not run data-parallel"):
        compose_spec(["compile=true"])
    compose_spec(["method=fd"])  # supported: no error


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


ARGS = ["outer_steps=6", "inner_steps=200", "checkpoint_every=1", "progress=false", "method.terms=3", "model.width=64"]


def torchrun(cwd, *extra, env=None):
    return subprocess.Popen(
        [*TORCHRUN, "-m", "hoexp", "run", *ARGS, *extra],
        cwd=cwd,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _metrics(folder):
    lines = [json.loads(ln) for ln in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if not k.startswith("time/")} for ln in lines]


def _children(pid):
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def _wait_gone(pid, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)


@pytest.mark.slow
def test_torchrun_pes_spread_over_two_ranks_resumes_to_the_single_process_run(tmp_path):
    """`torchrun` with 2 processes, PES on Bernoulli dropout spread over them: 2 outer steps, then resumed to 3,
    end where one process's 3 outer steps end (final losses and rates equal): rank 0's checkpoint holds every
    particle, and the streams are whole batches on every rank."""
    args = ["hp=dropout", "hp.dropout.relaxation=bernoulli", "method=pes", "method.particles=4", "inner_steps=20"]
    args += ["model.width=16", "progress=false", "dtype=float64", "checkpoint_every=1"]
    run, one = tmp_path / "run", tmp_path / "one"
    for extra in (["outer_steps=2"], ["outer_steps=3", "resume=true"]):
        cmd = [*TORCHRUN, "-m", "hoexp", "run", *args, *extra, f"hydra.run.dir={run}"]
        r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "-m", "hoexp", "run", *args, "outer_steps=3", f"hydra.run.dir={one}"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    spread, single = (json.loads((d / "summary.json").read_text()) for d in (run, one))
    assert spread["world_size"] == 2 and spread["resumes"] and spread["final"]["step"] == 3
    assert spread["final"] == single["final"] and spread["hp_final"] == single["hp_final"]


def test_torchrun_run_writes_one_folder_and_resumes_after_a_kill(tmp_path):
    ref_cwd = tmp_path / "ref"
    ref_cwd.mkdir()
    p = torchrun(ref_cwd)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    folders = [d for d in (ref_cwd / "outputs" / "runs").glob("*/*") if d.is_dir()]
    assert len(folders) == 1, folders  # one run folder for the two processes
    ref = folders[0]
    assert sorted(p.name for p in ref.iterdir()) == sorted(
        [
            ".hoexp-run",
            ".hydra",
            "checkpoint.pt",
            "final.pt",
            "metrics.jsonl",
            "summary.json",
            *[p.name for p in ref.glob("events*")],
        ]
    )
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert err.count("hoexp: done") == 1  # rank 0 alone reports

    run = tmp_path / "killed"
    p = torchrun(tmp_path, f"hydra.run.dir={run}")
    assert wait_for_step(run, 2, p, timeout=300), p.communicate()[1]
    workers = _children(p.pid)
    assert len(workers) == 2, workers
    for pid in [p.pid, *workers]:  # torchrun and both ranks, at once (a lost node)
        os.kill(pid, signal.SIGKILL)
    p.wait(timeout=60)
    for pid in workers:
        _wait_gone(pid)
    r = torchrun(tmp_path, f"hydra.run.dir={run}")
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert "resumed after outer step" in err
    a, b = json.loads((run / "summary.json").read_text()), summary
    assert a["final"] == b["final"] and a["best"] == b["best"] and a["hp_final"] == b["hp_final"]
    assert _metrics(run) == _metrics(ref)


SITE = """
import os
if os.environ.get("RANK") == "1":
    import hoexp.method.base as base
    calls = [0]
    original = base.train_inner
    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise ValueError("injected failure")
        return original(*args, **kwargs)
    base.train_inner = failing
    import hoexp.method.implicit as implicit
    implicit.train_inner = failing
"""

# Rank 0 busy outside any collective when rank 1 fails (here: asleep), so torchrun's SIGTERM reaches it before it
# sees the peer gone: it must still report rank 1's failure, not the signal (a race CI once lost).
SITE_BUSY_RANK0 = """
import os, time
if os.environ.get("RANK") == "0":
    import hoexp.method.base as base
    import hoexp.method.implicit as implicit
    calls = [0]
    original = base.train_inner
    def slow(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            time.sleep(60)
        return original(*args, **kwargs)
    base.train_inner = slow
    implicit.train_inner = slow
"""


@pytest.mark.slow
@pytest.mark.parametrize("site_code", [SITE, SITE + SITE_BUSY_RANK0], ids=["in-collective", "rank0-busy"])
def test_a_failing_rank_ends_the_job_with_one_line(tmp_path, site_code):
    env = stopping.with_site(_env(), tmp_path / "site", site_code)
    run = tmp_path / "run"
    p = torchrun(tmp_path, f"hydra.run.dir={run}", env=env)
    out, err = p.communicate(timeout=600)
    assert p.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("hoexp: error:")]
    assert lines == ["hoexp: error: rank 1 of 2: ValueError: injected failure"], err
    # no traceback from hoexp (torchrun follows with its own report of the failed worker, ChildFailedError)
    assert not any(str(ROOT / "hoexp") in ln for ln in err.splitlines() if ln.strip().startswith("File "))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "rank 1 of 2: ValueError: injected failure"
    assert summary["final"]["step"] == 1  # the first outer step completed and was checkpointed
    assert (run / "checkpoint.pt").exists()


def test_slurm_ddp_preset_and_its_refusals(capsys, tmp_path):
    from hoexp.cli import _compose, main

    launcher = _compose(["hydra/launcher=slurm_ddp"], hydra=True).hydra.launcher
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8 and launcher.nodes == 1
    assert launcher.max_num_timeout == 3  # requeued like the other SLURM presets
    with pytest.raises(SystemExit) as e:  # a multi-task launcher runs each job data-parallel: checked up front
        main(
            [
                "run",
                "-m",
                "hydra/launcher=submitit_local",
                "hydra.launcher.tasks_per_node=2",
                "method=neumann,exact",
                f"hydra.sweep.dir={tmp_path}",
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hoexp: error: method=exact does not run data-parallel (2 processes)")


@pytest.mark.slow
def test_a_multi_task_submitit_job_is_one_data_parallel_run(tmp_path):
    """The path of hydra/launcher=slurm_ddp, through submitit's local executor: one job, two tasks, one folder."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hoexp",
            "run",
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            "outer_steps=2",
            "inner_steps=5",
            "progress=false",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    jobs = [d for d in tmp_path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert [d.name for d in jobs] == ["0_neumann"]
    summary = json.loads((jobs[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    logs = sorted((tmp_path / ".submitit").glob("*/*_log.err"))
    assert len(logs) == 2 and "hoexp: done" in logs[0].read_text() and "hoexp:" not in logs[1].read_text()


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    p = torchrun(tmp_path, f"hydra.run.dir={run}", "checkpoint_every=5")
    assert wait_for_step(run, 2, p, timeout=300)
    p.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
    out, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("hoexp: error:")]
    assert len(lines) == 1 and "stopped by SIGTERM after outer step" in lines[0], err
    assert f"resume=true hydra.run.dir={run}" in lines[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["final"]["step"] >= 2
    r = torchrun(tmp_path, f"hydra.run.dir={run}", "checkpoint_every=5", "resume=true")
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0 and "resumed after outer step" in err, err
