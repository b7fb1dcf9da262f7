"""``hoexp report``: gathering, rows (seeds averaged, studies as their best trial), table, Markdown, CSV,
PNG plots; end to end on real runs, with TensorBoard reading the runs' scalars and HPARAMS."""

import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from hoexp.cli import main
from hoexp.engine.metrics import read_jsonl, write_json_atomic
from hoexp.tools.report import build_report

ROOT = Path(__file__).resolve().parents[1]
BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


# --------------------------------------------------------------------------- synthetic run folders
def make_run(
    folder: Path,
    *,
    method="neumann",
    seed=0,
    best=0.5,
    final=None,
    test=0.6,
    acc=0.8,
    wall=2.0,
    hypergradients=3,
    num_hparams=17_280,
    granularity="per_weight",
    method_opts=None,
    sweeper=None,
    num=None,
    overrides=(),
    status="completed",
    decays=None,
):
    """A run folder as `hoexp run` writes it: summary.json, metrics.jsonl, .hydra/, final.pt."""
    folder.mkdir(parents=True)
    final = best + 0.1 if final is None else final
    summary = {
        "status": status,
        "final": {"step": 3, "val_loss": final, "val_acc": acc - 0.05, "test_loss": test + 0.1, "test_acc": acc - 0.1},
        "best": {"step": 2, "val_loss": best, "val_acc": acc, "test_loss": test, "test_acc": acc},
        "wall_time_s": wall,
        "solver_time_s": wall / 4,  # training and hypergradients: a quarter of the wall time here
        "hypergradients": hypergradients,
        "num_hparams": num_hparams,
        "num_params": 17_280,
        "method": method,
        "hp": "weight_decay",
        "dataset": "iris",
        "model": "mlp",
        "seed": seed,
    }
    write_json_atomic(folder / "summary.json", summary)
    vals = [1.1, best, final]  # the lowest is `best`
    with open(folder / "metrics.jsonl", "w") as f:
        for step, v in enumerate(vals):
            t = wall * (step + 1) / len(vals)
            f.write(json.dumps({"step": step, "loss/val": v, "time/elapsed_s": t, "time/solver_s": t / 4}) + "\n")
    cfg = {
        "seed": seed,
        "outer_steps": 3,
        "inner_steps": 10,
        "progress": False,
        "name": method,
        "hp": {"weight_decay": {"name": "weight_decay", "granularity": granularity, "init": 1e-3}},
        "method": {"name": method, **(method_opts or {})},
    }
    hydra = {
        "mode": "MULTIRUN" if num is not None else "RUN",
        "sweep": {"dir": "x", "subdir": "${hydra.job.num}_${name}"},
        "sweeper": sweeper or {"_target_": BASIC},
        "job": {"num": num},
        "overrides": {"task": list(overrides)},
    }
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    if decays is not None:
        torch.save({"hparams": {"weight_decay:fc.weight": torch.tensor(decays)}}, folder / "final.pt")
    return summary


def test_a_label_left_to_the_file_name_is_read_from_hydras_choices(tmp_path):
    """Hydra saves an option's default label unresolved (``${hydra:runtime.choices.method}``, hoexp/conf/config.yaml):
    the report reads the choice from .hydra/hydra.yaml, so two methods alike but for their file's name stay apart."""
    from hoexp.tools.report.load import load_run

    for i, label in enumerate(["mine", "yours"]):
        folder = tmp_path / f"{i}_{label}"
        make_run(folder, method=label, num=i)
        cfg = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
        cfg["method"]["name"] = "${hydra:runtime.choices.method}"
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
        hydra = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
        hydra["hydra"]["runtime"] = {"choices": {"method": label, "optim/inner": "sgd"}}
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
        assert load_run(folder).config["method.name"] == label
    rep, _ = report(tmp_path, tmp_path)
    assert sorted(g.label for g in rep.groups) == ["mine", "yours"]


def optuna(sampler):
    return {
        "_target_": OPTUNA,
        "sampler": {"_target_": f"optuna.samplers.{sampler}", "seed": 0},
        "direction": "minimize",
        "n_trials": 3,
        "study_name": sampler,
        "params": {"hp.weight_decay.init": "tag(log, interval(1e-6, 1.0))"},
    }


def report(tmp_path, *paths):
    out = io.StringIO()
    rep = build_report([str(p) for p in paths], tmp_path / "report", console=Console(file=out, width=250))
    return rep, out.getvalue()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def runs(tmp_path):
    """An HO multirun (neumann on 2 seeds, cg on 1), a random-search study (3 trials, the middle one
    best) and a TPE study (2 trials)."""
    s = {}
    s["neumann0"] = make_run(
        tmp_path / "ho/0_neumann",
        seed=0,
        best=0.41,
        test=0.52,
        acc=0.80,
        wall=3.0,
        num=0,
        decays=[1e-4, 1e-3, 1e-2, 5e-3] * 5,
    )
    s["neumann1"] = make_run(
        tmp_path / "ho/1_neumann", seed=1, best=0.45, test=0.61, acc=0.90, wall=5.0, num=1, decays=[2e-3] * 20
    )
    s["cg0"] = make_run(
        tmp_path / "ho/2_cg", method="cg", seed=0, best=0.39, test=0.70, acc=0.70, wall=4.0, num=2, hypergradients=3
    )
    inits = ["1e-05", "0.003", "0.2"]
    for i, (b, init) in enumerate(zip([0.50, 0.30, 0.40], inits)):
        s[f"rs{i}"] = make_run(
            tmp_path / f"rs/{i}_none",
            method="none",
            best=b,
            test=0.5 + i / 10,
            wall=1.0 + i,
            hypergradients=0,
            num_hparams=1,
            granularity="global",
            sweeper=optuna("RandomSampler"),
            num=i,
            overrides=[f"hp.weight_decay.init={init}", "experiment=iris_blackbox_wd"],
            decays=[float(init)],
        )
    for i, (b, init) in enumerate(zip([0.35, 0.33], ["0.001", "0.002"])):
        s[f"tpe{i}"] = make_run(
            tmp_path / f"tpe/{i}_none",
            method="none",
            best=b,
            wall=1.5,
            hypergradients=0,
            num_hparams=1,
            granularity="global",
            sweeper=optuna("TPESampler"),
            num=i,
            overrides=[f"hp.weight_decay.init={init}"],
            decays=[float(init)],
        )
    return s


# ------------------------------------------------------------------------------------------ tests
def test_rows_average_seeds_and_studies_count_as_their_best_trial(tmp_path, runs):
    rep, text = report(tmp_path, tmp_path / "ho", tmp_path / "rs", tmp_path / "tpe")
    assert len(rep.runs) == 8
    rows = {r["label"] + "|" + r["tuning"]: r for r in read_csv(tmp_path / "report" / "report.csv")}
    assert list(rows) == ["cg|hypergradients", "neumann|hypergradients", "none|random search", "none|TPE"]

    n0, n1 = runs["neumann0"], runs["neumann1"]
    neu = rows["neumann|hypergradients"]
    for block, key in [("best", "val_loss"), ("best", "test_loss"), ("final", "val_loss"), ("final", "test_acc")]:
        values = [n0[block][key], n1[block][key]]
        assert float(neu[f"{block}_{key}"]) == pytest.approx(statistics.fmean(values))
        assert float(neu[f"{block}_{key}_std"]) == pytest.approx(statistics.stdev(values))
    assert float(neu["wall_time_s"]) == pytest.approx(4.0) and neu["count"] == "2 seeds"
    assert float(neu["hypergradients"]) == 3 and neu["num_hparams"] == "17280"
    assert neu["family"] == "weight_decay (per_weight)"

    rs = rows["none|random search"]  # trial 1 has the lowest best val loss
    assert float(rs["best_val_loss"]) == pytest.approx(runs["rs1"]["best"]["val_loss"])
    assert float(rs["best_test_loss"]) == pytest.approx(runs["rs1"]["best"]["test_loss"])
    assert float(rs["final_val_loss"]) == pytest.approx(runs["rs1"]["final"]["val_loss"])
    assert rs["best_val_loss_std"] == ""  # one study
    assert float(rs["wall_time_s"]) == pytest.approx(1.0 + 2.0 + 3.0)  # the study's budget: all its trials
    assert rs["count"] == "3 trials" and rs["best_params"] == "weight_decay.init=0.003"
    assert rs["family"] == "weight_decay (global)" and rs["num_hparams"] == "1"
    assert float(rows["none|TPE"]["best_val_loss"]) == pytest.approx(0.33)

    per_run = read_csv(tmp_path / "report" / "runs.csv")
    assert len(per_run) == 8
    trials = [r for r in per_run if r["tuning"] == "random search"]
    assert [r["trial"] for r in trials] == ["0", "1", "2"]
    assert [r["param:hp.weight_decay.init"] for r in trials] == ["1e-05", "0.003", "0.2"]
    assert [r["best_of_study"] for r in trials] == ["0", "1", "0"]
    for r in per_run:
        s = json.loads((Path(r["path"]) / "summary.json").read_text())
        assert float(r["best_val_loss"]) == pytest.approx(s["best"]["val_loss"])
        assert float(r["final_test_acc"]) == pytest.approx(s["final"]["test_acc"])
        assert float(r["wall_time_s"]) == pytest.approx(s["wall_time_s"])

    md = (tmp_path / "report" / "report.md").read_text()
    mean, std = statistics.fmean([0.41, 0.45]), statistics.stdev([0.41, 0.45])
    assert f"| neumann | hypergradients | weight_decay (per_weight) | 17,280 | 2 seeds | {mean:.4f} ± {std:.4f} |" in md
    assert "| 1 ★ | 0.003 |" in md  # the study's trial table marks the best trial
    assert "**0.3000**" in md and md.count("**") == 2 * 6  # best mean per metric column in bold (random search)
    assert f"{mean:.4f}±{std:.4f}" in text and "best of 3 trials: #1 weight_decay.init=0.003" in text
    for png in ("val_loss_vs_time.png", "hparams.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_labels_tell_apart_rows_of_one_method(tmp_path):
    make_run(tmp_path / "a/0", method="neumann", method_opts={"terms": 0, "alpha": 0.01}, best=0.5)
    make_run(tmp_path / "a/1", method="neumann", method_opts={"terms": 5, "alpha": 0.01}, best=0.4)
    make_run(tmp_path / "a/2", method="cg", method_opts={"iterations": 20}, best=0.3)
    rep, _ = report(tmp_path, tmp_path / "a")
    assert [g.label for g in rep.groups] == ["cg", "neumann (method.terms=0)", "neumann (method.terms=5)"]
    assert [g.count for g in rep.groups] == ["1 run"] * 3


def test_failed_runs_are_counted_and_never_best_trials(tmp_path):
    sw = optuna("RandomSampler")
    make_run(
        tmp_path / "s/0_none",
        method="none",
        best=math.nan,
        final=math.nan,
        status="diverged",
        sweeper=sw,
        num=0,
        overrides=["hp.weight_decay.init=0.9"],
    )
    make_run(tmp_path / "s/1_none", method="none", best=0.7, sweeper=sw, num=1, overrides=["hp.weight_decay.init=0.1"])
    rep, _ = report(tmp_path, tmp_path / "s")
    (g,) = rep.groups
    assert g.count == "2 trials (1 diverged)"
    assert g.members[0].best.trial == 1 and g.best_params == "weight_decay.init=0.1"
    (row,) = read_csv(tmp_path / "report" / "report.csv")
    assert float(row["best_val_loss"]) == pytest.approx(0.7)


def compare_study(folder: Path, kind: str, trials: list[dict], objective="best", seed=0):
    """A hoexp compare study: study.json, and trial folders with trial.json beside summary.json."""
    folder.mkdir(parents=True)
    label = {"grid": "grid search", "random": "random search", "tpe": "TPE"}[kind]
    write_json_atomic(
        folder / "study.json",
        {
            "kind": "grid" if kind == "grid" else "search",
            "label": label,
            "objective": objective,
            "seed": seed,
            "space": {"hp.weight_decay.init": "log-uniform [1e-05, 0.1]"},
        },
    )
    for i, t in enumerate(trials):
        run = folder / f"trial_{i:03d}"
        init = t.pop("init")
        make_run(run, method="none", seed=seed, hypergradients=0, **t)
        cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        cfg["hp"]["weight_decay"]["init"] = init
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / ".hydra" / "hydra.yaml").unlink()  # compare runs are not Hydra jobs
        write_json_atomic(
            run / "trial.json",
            {
                "number": i,
                "params": {"hp.weight_decay.init": repr(init)},
                "state": "PRUNED" if t.get("status") == "pruned" else "COMPLETE",
            },
        )


def test_compare_studies_grids_and_their_objective(tmp_path):
    """hoexp compare folders: a search study stands for its best trial by its objective (here the
    final validation loss; a pruned trial never counts), a grid is one row per point plus its best."""
    for seed in (0, 1):
        compare_study(
            tmp_path / f"tpe/seed{seed}",
            "tpe",
            objective="final",
            seed=seed,
            trials=[
                {"init": 1e-3, "best": 0.30, "final": 0.50, "wall": 1.0},
                {"init": 1e-2, "best": 0.40, "final": 0.45 + seed / 100, "wall": 2.0},  # best on final val
                {"init": 1e-4, "best": 0.10, "final": 0.10, "wall": 0.5, "status": "pruned"},
            ],
        )
        compare_study(
            tmp_path / f"grid/seed{seed}",
            "grid",
            seed=seed,
            trials=[
                {"init": 1e-4, "best": 0.50 + seed / 10, "test": 0.1},
                {"init": 1e-2, "best": 0.30 + seed / 10, "test": 0.9},
            ],
        )  # best on validation, worst on test
    rep, text = report(tmp_path, tmp_path)
    rows = [(g.label, g.tuning, g.count) for g in rep.groups]
    assert rows == [
        ("none (weight_decay.init=1.00e-04)", "grid point", "2 seeds"),
        ("none (weight_decay.init=0.01)", "grid point", "2 seeds"),
        ("none", "grid search", "2 studies × 2 trials"),
        ("none", "TPE", "2 studies × 3 trials (2 pruned)"),
    ]
    tpe, grid = rep.groups[3], rep.groups[2]
    assert [m.best.trial for m in tpe.members] == [1, 1]
    assert tpe.mean_std(tpe.values("final", "val_loss"))[0] == pytest.approx(0.455)
    assert tpe.members[0].wall_time_s == pytest.approx(3.5)  # every trial's time, the pruned one too
    assert [m.best.trial for m in grid.members] == [1, 1]  # on validation loss, not test loss
    assert grid.mean_std(grid.values("best", "test_loss"))[0] == pytest.approx(0.9)
    assert len(rep.runs) == 10
    assert "10 run(s)" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "best_so_far.png").read_bytes().startswith(b"\x89PNG")


def test_best_so_far_of_a_study_is_over_finished_trials_at_cumulative_trial_time(tmp_path):
    from hoexp.tools.report import best_so_far

    compare_study(
        tmp_path / "s",
        "random",
        trials=[
            {"init": 1e-3, "best": 0.40, "wall": 1.0},
            {"init": 1e-2, "best": 0.10, "wall": 0.5, "status": "pruned"},
            {"init": 1e-4, "best": 0.30, "wall": 2.0},
        ],
    )
    rep, _ = report(tmp_path, tmp_path / "s")
    (member,) = rep.groups[0].members
    assert best_so_far(member) == [(1.0, 0.40), (1.5, 0.40), (3.5, 0.30)]


def test_time_axis_solver_plots_against_solver_time(tmp_path, capsys):
    """--x solver: a run's curve on time/solver_s, a study's trials at their cumulative solver time; the plots are
    written; runs from before solver time was logged have no curve on that axis."""
    from hoexp.tools.report import best_so_far

    make_run(tmp_path / "r", method="cg", best=0.2, final=0.3, wall=3.0)
    compare_study(
        tmp_path / "s",
        "random",
        trials=[{"init": 1e-3, "best": 0.4, "wall": 1.0}, {"init": 1e-4, "best": 0.3, "wall": 2.0}],
    )
    rep, _ = report(tmp_path, tmp_path / "r", tmp_path / "s")
    run = next(m for g in rep.groups for m in g.members if not m.is_study)
    study = next(m for g in rep.groups for m in g.members if m.is_study)
    assert run.curve("solver") == [(0.25, 1.1), (0.5, 0.2), (0.75, 0.3)]
    assert run.curve() == [(1.0, 1.1), (2.0, 0.2), (3.0, 0.3)]
    assert best_so_far(run, "solver") == [(0.25, 1.1), (0.5, 0.2), (0.75, 0.2)]
    assert best_so_far(study, "solver") == [(0.25, 0.4), (0.75, 0.3)]
    assert [t for t, _ in study.curve("solver")] == [1 / 12, 1 / 6, 0.25, 0.25 + 1 / 6, 0.25 + 1 / 3, 0.75]
    main(["report", str(tmp_path / "r"), str(tmp_path / "s"), "--out", str(tmp_path / "out"), "--x", "solver"])
    assert {"val_loss_vs_time.png", "best_so_far.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 0, "loss/val": 1.0, "time/elapsed_s": 0.5}\n')
    rep, _ = report(tmp_path, tmp_path / "r")
    assert rep.groups[0].members[0].curve("solver") == [] and rep.groups[0].members[0].curve() == [(0.5, 1.0)]
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "r"), "--x", "wall"])
    assert e.value.code == 2 and "--x: invalid choice: 'wall'" in capsys.readouterr().err


def test_report_command_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"hoexp: error: report: no such file or folder: {tmp_path / 'missing'}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "empty")])
    assert e.value.code == 2
    assert "no runs (summary.json)" in capsys.readouterr().err


def test_report_command_on_one_summary_file(tmp_path, capsys):
    s = make_run(tmp_path / "r", method="cg", best=0.42, test=0.51)
    main(["report", str(tmp_path / "r" / "summary.json"), "--out", str(tmp_path / "out"), "--no-plots"])
    out = capsys.readouterr().out
    assert "0.4200" in out and "0.5100" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.md", "runs.csv"]
    (row,) = read_csv(tmp_path / "out" / "report.csv")
    assert float(row["best_test_loss"]) == pytest.approx(s["best"]["test_loss"])


# ------------------------------------------------------------------------------------- end to end
def hoexp(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    r = subprocess.run(
        [sys.executable, "-m", "hoexp", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_report_on_a_multirun_and_a_study_end_to_end(tmp_path):
    ho, cmp, out = tmp_path / "ho", tmp_path / "cmp", tmp_path / "report"
    tpe = cmp / "tpe" / "seed0"  # a TPE study of hoexp compare (2 trials, no pruning before 3)
    hoexp(
        "run",
        "-m",
        "method=neumann,none",
        "seed=0,1",
        "outer_steps=2",
        "inner_steps=5",
        "progress=false",
        f"hydra.sweep.dir={ho}",
    )
    hoexp(
        "compare",
        "outer_steps=2",
        "inner_steps=5",
        "--methods",
        "neumann",
        "--grid",
        "none",
        "--search",
        "tpe",
        "--max-trials",
        "2",
        "--budget-s",
        "600",
        "--no-plots",
        "--out",
        str(cmp),
    )
    r = hoexp("report", str(ho), str(tpe), "--out", str(out))
    assert "4 row(s)" not in r.stdout and "3 row(s)" in r.stdout  # neumann, none (2 seeds each), TPE

    summaries = {p.parent: json.loads(p.read_text()) for p in [*ho.glob("*/summary.json"), *tpe.glob("*/summary.json")]}
    assert len(summaries) == 6
    rows = {r["tuning"]: r for r in read_csv(out / "report.csv")}
    assert set(rows) == {"hypergradients", "fixed", "TPE"}
    for tuning, method in [("hypergradients", "neumann"), ("fixed", "none")]:
        mine = [s for d, s in summaries.items() if d.parent == ho and s["method"] == method]
        assert len(mine) == 2
        for block, key in [("best", "val_loss"), ("final", "test_loss"), ("best", "test_acc")]:
            assert float(rows[tuning][f"{block}_{key}"]) == pytest.approx(statistics.fmean(s[block][key] for s in mine))
        assert float(rows[tuning]["wall_time_s"]) == pytest.approx(statistics.fmean(s["wall_time_s"] for s in mine))
    trials = [s for d, s in summaries.items() if d.parent == tpe]
    best = min(trials, key=lambda s: s["best"]["val_loss"])
    assert float(rows["TPE"]["best_val_loss"]) == pytest.approx(best["best"]["val_loss"])
    assert float(rows["TPE"]["wall_time_s"]) == pytest.approx(sum(s["wall_time_s"] for s in trials))
    assert rows["hypergradients"]["hypergradients"] == "2" and rows["TPE"]["hypergradients"] == "0"
    (study,) = next(c for c in json.loads((cmp / "compare.json").read_text())["contenders"] if c["name"] == "TPE")[
        "studies"
    ]
    assert study["best"]["best"]["val_loss"] == pytest.approx(best["best"]["val_loss"])
    for png in ("val_loss_vs_time.png", "hparams.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")

    # TensorBoard reads every run's scalars and its HPARAMS session (the comparison in TensorBoard)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for run_dir, s in summaries.items():
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        lines = read_jsonl(run_dir / "metrics.jsonl")
        assert [e.value for e in acc.Scalars("loss/val")] == pytest.approx([ln["loss/val"] for ln in lines], rel=1e-6)
        assert acc.Scalars("final/val_loss")[-1].value == pytest.approx(s["final"]["val_loss"], rel=1e-6)
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hp = start.session_start_info.hparams
        assert hp["method"].string_value == s["method"] and hp["seed"].number_value == s["seed"]
        exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert "final/val_loss" in {m.name.tag for m in exp.metric_infos}


# ------------------------------------------------------------------------------- issue 17, item 9
def test_run_control_keys_and_extensions_are_not_configuration_differences(tmp_path):
    """A resumed run (resume, checkpoint_every set), a fresh one and one extended from 2 to 3 outer steps
    by a resume are runs of one experiment: one row."""
    for seed in (0, 1, 2):
        make_run(tmp_path / f"r{seed}", seed=seed)
    cfg = yaml.safe_load((tmp_path / "r1/.hydra/config.yaml").read_text())
    (tmp_path / "r1/.hydra/config.yaml").write_text(yaml.safe_dump({**cfg, "resume": True, "checkpoint_every": 1}))
    cfg = yaml.safe_load((tmp_path / "r2/.hydra/config.yaml").read_text())
    (tmp_path / "r2/.hydra/config.yaml").write_text(yaml.safe_dump({**cfg, "outer_steps": 2}))
    summary = json.loads((tmp_path / "r2/summary.json").read_text())
    summary["resumes"] = [{"step": 2, "changes": {"outer_steps": [2, 3]}}]
    write_json_atomic(tmp_path / "r2/summary.json", summary)
    rep, _ = report(tmp_path, tmp_path)
    assert [g.count for g in rep.groups] == ["3 seeds"]


def test_report_lists_the_jobs_a_sweep_has_not_finished(tmp_path):
    import shutil

    sweep = tmp_path / "sweep"
    main(
        [
            "run",
            "-m",
            "seed=0,1",
            "method=none,cg",
            "model.width=4",
            "model.depth=1",
            "outer_steps=1",
            "inner_steps=1",
            "progress=false",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert sorted(p.name for p in sweep.iterdir()) == [
        ".hoexp-run",
        "0_none",
        "1_cg",
        "2_none",
        "3_cg",
        "multirun.yaml",
    ]
    shutil.rmtree(sweep / "1_cg")  # never started
    (sweep / "3_cg" / "summary.json").unlink()  # killed
    rep, text = report(tmp_path, sweep)
    line = next(ln for ln in text.splitlines() if "jobs have no summary.json" in ln)
    assert line.startswith(f"hoexp report: sweep {sweep}: 2 of 4 jobs have no summary.json")
    assert "#1 seed=0 method=cg " in line and "#3 seed=1 method=cg " in line and "#0 " not in line
    assert f"hydra.sweep.dir={sweep}" in line
    assert "## Missing jobs" in (tmp_path / "report" / "report.md").read_text()


def test_console_table_keeps_the_method_column_when_narrow(tmp_path, runs):
    out = io.StringIO()
    build_report(
        [str(tmp_path / "ho"), str(tmp_path / "rs")],
        tmp_path / "report",
        plots=False,
        console=Console(file=out, width=90),
    )
    text = out.getvalue()
    rows = [ln for ln in text.splitlines() if ln.startswith("│")]
    assert [ln.split("│")[1].strip() for ln in rows] == ["cg", "neumann", "none"]
    assert max(len(ln) for ln in text.splitlines() if ln[:1] in "┏│└") <= 90
    assert "left out at this width: hypergradients" in text
