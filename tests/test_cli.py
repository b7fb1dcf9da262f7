"""The command line: help, validation errors, and real runs as subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hoexp.cli import main
from hoexp.engine.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def hoexp(*args, cwd=ROOT, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", "hoexp", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "version" in out and "tensorboard --logdir" in out


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["method=foo"],
            "unknown method 'foo'; choose one of: amigo, cg, cg_gn, exact, fd, fixed_point, forward, hd, neumann, none, pes, reversible, saba, soba, stn, t1t2, truncated, unrolled",
        ),
        (["dataset=cifar"], "unknown dataset 'cifar'; choose one of: arrays, iris, mnist"),
        (["optim/inner=adm"], "unknown optim/inner 'adm'; choose one of: adagrad, adam, adamw"),
        (
            ["method.termz=3"],
            "unknown key 'termz' in method (did you mean 'terms'?); valid keys: alpha, alpha_every, "
            "compile, curvature, damping, fuse_step, hvp, residual, terms, warm_start",
        ),
        (["datset=iris"], "unknown key 'datset' (did you mean 'dataset'?)"),
        (["method.terms=-1"], "method=neumann: terms must be >= 0, got -1"),
        (["method.alpha=0"], "method=neumann: alpha must be > 0, got 0.0"),
        (["method=cg", "method.iterations=-2"], "method=cg: iterations must be >= 1, got -2"),
        (["method.terms=abc"], "method.terms: 'abc' is not a valid int"),
        (
            ["hp.weight_decay.granularity=per_unit"],
            "hp.weight_decay.granularity='per_unit' is not valid; choose one of: global, layer_and_weight, per_layer, per_weight",
        ),
        (["hp.weight_decay.include=[nothing]"], "match no parameter"),
        (["device=tpu"], "device must be auto, cpu, cuda or cuda:N"),
        (["log_every=0"], "log_every must be > 0, got 0"),
        (["dataset.train_size=100", "dataset.val_size=60"], "but Iris has 150 examples"),
        (["optim.inner.lr=-1"], "lr must be > 0"),
        (["+foo=1"], "unknown top-level key(s) foo"),
        (["method=forward"], "method=forward carries one tangent per hyperparameter and hp=weight_decay has 17,280"),
        (
            ["method=hd", "method.variant=rmsprop"],
            "method.variant='rmsprop' is not valid; choose one of: adam, sgd, sgdn",
        ),
        (["method=truncated", "method.k=0"], "method=truncated: k must be > 0, got 0"),
        (["method=exact", "method.max_params=1000"], "method=exact would form a dense 17,280x17,280 Hessian"),
        (["method.alpha=-1"], "method=neumann: alpha must be > 0, got -1.0 (or alpha=auto"),
        (
            ["method=fixed_point", "method.alpha=foo"],
            "method=fixed_point: alpha must be a number > 0 or auto, got 'foo'",
        ),
        (["method=t1t2", "method.alpha=auto", "method.alpha_every=0"], "method=t1t2: alpha_every must be > 0, got 0"),
        (["method.curvature=fisher"], "method.curvature='fisher' is not valid; choose one of: gauss_newton, hessian"),
        (["method=cg", "method.damping=-0.1"], "method=cg: damping must be >= 0, got -0.1"),
        (
            ["method=cg", "method.alpha=auto"],
            "unknown key 'alpha' in method; valid keys: compile, curvature, damping, fuse_step, hvp, iterations",
        ),
        (
            ["method=exact", "method.warm_start=true"],
            "unknown key 'warm_start' in method; valid keys: compile, curvature, damping, fuse_step, hvp, max_params",
        ),
        (["method=fixed_point", "method.warm_start=true", "method.iterations=0"], "warm_start needs iterations >= 1"),
        (["method.warm_start=maybe"], "method.warm_start: 'maybe' is not a valid bool"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, expected):
    with pytest.raises(SystemExit) as e:
        main(["run", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("hoexp: error: ") and err.count("\n") == 1, err
    assert expected in err, err


def test_sweep_is_validated_before_any_job_runs(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["run", "-m", "method=cg,nope", f"hydra.sweep.dir={tmp_path}"])
    assert e.value.code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_error_from_a_subprocess_has_no_traceback():
    r = hoexp("run", "method.terms=-1")
    assert r.returncode == 2
    assert r.stderr.strip() == "hoexp: error: method=neumann: terms must be >= 0, got -1"
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.slow
def test_max_time_ends_a_run_with_exit_0_and_a_line_saying_so(tmp_path):
    run_dir = tmp_path / "run"
    r = hoexp("run", "outer_steps=50", "inner_steps=2", "model.width=8", "max_time=0.001", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    assert "max_time=0.001s of solver time spent" in r.stderr and "at outer step 1 of 50" in r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stopped_by"] == "max_time" and summary["final"]["step"] == 1


def _scalar_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_short_run_writes_tensorboard_metrics_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    r = hoexp("run", "outer_steps=3", "inner_steps=10", "histogram_every=2", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    assert "done in" in r.stderr and "[outer 3/3]" in r.stderr

    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert [ln["step"] for ln in lines] == [0, 1, 2, 3]  # one line per outer step, plus the start
    for ln in lines[1:]:
        for key in (
            "loss/train",
            "loss/val",
            "loss/test",
            "acc/train",
            "acc/val",
            "acc/test",
            "hypergrad/norm",
            "solver/residual",
            "inner/grad_norm",
            "hp/mean",
            "hp/std",
            "hp/min",
            "hp/max",
            "time/elapsed_s",
            "time/solver_s",
        ):
            assert key in ln, key
        assert 0 < ln["time/solver_s"] <= ln["time/elapsed_s"]
        assert ln["solver/hvps"] == 6  # 5 Neumann terms + the residual
        assert ln["hypergrad/norm"] > 0
    assert lines[-1]["time/elapsed_s"] > lines[1]["time/elapsed_s"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    for block in ("final", "best"):
        for key in ("val_loss", "val_acc", "test_loss", "test_acc"):
            assert isinstance(summary[block][key], float)
    assert summary["final"]["val_loss"] == pytest.approx(lines[-1]["loss/val"])
    assert summary["best"]["val_loss"] == pytest.approx(min(ln["loss/val"] for ln in lines))
    assert summary["num_hparams"] == 17_280 and summary["num_params"] == 17_280
    assert summary["hypergradients"] == 3 and summary["wall_time_s"] > 0
    assert summary["solver_time_s"] == lines[-1]["time/solver_s"] and "stopped_by" not in summary
    assert 0 < summary["hp_final"]["moved_fraction"] <= 1

    acc = _scalar_tags(run_dir)
    tags = acc.Tags()
    val = acc.Scalars("loss/val")
    assert [e.step for e in val] == [0, 1, 2, 3]
    assert val[-1].value == pytest.approx(lines[-1]["loss/val"], rel=1e-6)
    for tag in (
        "hypergrad/norm",
        "solver/residual",
        "inner/grad_norm",
        "hp/mean",
        "acc/test",
        "time/elapsed_s",
        "time/solver_s",
    ):
        assert tag in tags["scalars"], tag
    assert "hp/values" in tags["histograms"]
    assert [e.step for e in acc.Histograms("hp/values")] == [0, 2, 3]
    assert any("config" in t for t in tags["tensors"])  # the composed config as text

    import torch

    state = torch.load(run_dir / "final.pt", weights_only=True)
    assert set(state) == {"params", "raw_hparams", "hparams"}
    assert sum(v.numel() for v in state["hparams"].values()) == 17_280


@pytest.mark.slow
def test_multirun_sweeps_and_console_script(tmp_path):
    sweep = tmp_path / "sweep"
    exe = Path(sys.executable).parent / "hoexp"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hoexp"]
    r = subprocess.run(
        [*cmd, "run", "-m", "method=none,cg", "outer_steps=2", "inner_steps=5", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    by_method = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in summaries}
    assert by_method["none"]["hypergradients"] == 0 and by_method["none"]["hp_final"]["moved_fraction"] == 0
    assert by_method["cg"]["hypergradients"] == 2


def test_version(capsys):
    main(["version"])
    assert capsys.readouterr().out.startswith("hoexp ")


@pytest.mark.slow
def test_a_diverging_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    r = hoexp("run", "-m", "optim.inner.lr=1e9,0.01", "outer_steps=2", "inner_steps=5", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    assert "diverged" in r.stderr and "the sweep goes on" in r.stderr
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep.glob("*/summary.json"))
    assert statuses == ["completed", "diverged"]


def test_a_diverging_single_run_is_one_line_exit_2(tmp_path):
    r = hoexp("run", "optim.inner.lr=1e9", "outer_steps=2", "inner_steps=5", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("hoexp: error: ")
    assert "Traceback" not in r.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


BAD_DATA = [
    # (files to create under <root>, overrides, expected message)
    ("mnist_truncated", ["dataset=mnist"], "corrupt"),
    ("mnist_missing", ["dataset=mnist"], "MNIST not found under"),
    ("ptb_empty", ["dataset=ptb", "model=lstm"], "empty"),
    ("ptb_missing", ["dataset=ptb", "model=lstm"], "not found"),
]


@pytest.mark.parametrize("case,overrides,expected", BAD_DATA)
def test_bad_data_folders_are_one_line_errors(tmp_path, case, overrides, expected):
    import shutil

    shared = Path(os.environ["HOEXP_DATA"])
    root = tmp_path / "data"
    if case == "mnist_truncated":
        shutil.copytree(shared / "mnist", root / "mnist")
        f = root / "mnist" / "MNIST" / "raw" / "train-images-idx3-ubyte"
        if not f.exists():
            f = next((root / "mnist" / "MNIST" / "raw").glob("train-images*"))
        f.write_bytes(f.read_bytes()[:5000])
    elif case == "ptb_empty":
        shutil.copytree(shared / "ptb", root / "ptb")
        (root / "ptb" / "ptb.valid.txt").write_text("")
    else:
        root.mkdir()
    r = hoexp(
        "run",
        *overrides,
        f"dataset.data_root={root}",
        "outer_steps=1",
        "inner_steps=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("hoexp: error: ") and expected in last and "Traceback" not in r.stderr, r.stderr


def test_unwritable_output_folder_is_refused(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["run", f"hydra.run.dir={blocker}/run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("hoexp: error: cannot create the output folder") and "is a file" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "device=cuda"])
    assert e.value.code == 2
    assert "device=cuda but CUDA is not available here; use device=auto or device=cpu" in capsys.readouterr().err


def test_hydra_full_error_shows_the_detail():
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "hoexp", "run", "method.terms=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr and "terms must be >= 0" in r.stderr


# --------------------------------------------------------------------- one line, not a traceback (issue 17)
def test_cfg_job_of_a_sweep_prints_each_job(capsys):
    main(["run", "-m", "seed=0,1", "method=cg", "--cfg", "job"])  # Hydra refuses -m with --cfg
    out = capsys.readouterr().out
    assert "# job 0: seed=0 method=cg\nseed: 0\n" in out and "# job 1: seed=1 method=cg\nseed: 1\n" in out
    assert "hydra:" not in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cfg_job_prints_gpu_presets_on_a_cpu_machine(capsys):
    main(["run", "experiment=mnist_per_weight_decay_gpu", "--cfg", "job"])
    assert "device: cuda" in capsys.readouterr().out


@pytest.mark.skipif(__import__("shutil").which("srun") is not None, reason="this machine has SLURM")
def test_slurm_launcher_without_slurm_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["run", "-m", "hydra/launcher=slurm", "seed=0,1", f"hydra.sweep.dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hydra/launcher=slurm needs a SLURM cluster" in err and "submitit_local" in err
    assert not list(tmp_path.iterdir())


def test_report_into_a_file_is_one_line(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "completed", "method": "none", "final": {}, "best": {}}')
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["report", str(run), "--out", str(tmp_path / "file" / "x"), "--no-plots"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hoexp: error: report: cannot create the output folder"), err


def test_ctrl_c_during_start_up_is_one_line(capsys, monkeypatch):
    import hoexp.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hoexp.cli, "validate_job", interrupted)  # e.g. while torch is imported
    with pytest.raises(SystemExit) as e:
        main(["run", "outer_steps=1"])
    assert e.value.code == 130 and capsys.readouterr().err == (
        "hoexp: error: stopped by SIGINT while starting, before any outer step: nothing to resume; start it again "
        "with the same command\n"
    )
