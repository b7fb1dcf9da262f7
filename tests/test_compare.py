"""``hoexp compare`` and its search loop: Optuna ask/tell on a wall-clock budget with pruning
(fake objectives), argument errors in one line, the removed Hydra sweepers refused in one line, and
the whole command end to end on a tiny Iris problem (every contender, the budget, the report)."""

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hoexp.cli import main
from hoexp.tools.compare import match_time, objective_value, parse_args, pick_best
from hoexp.tools.search import Dim, Pruned, SearchSettings, parse_dim
from hoexp.tools.search_workers import run_search
from tests.fake_objective import Sleepy, StopsAt

ROOT = Path(__file__).resolve().parents[1]


SPACE = [Dim("x", 1e-6, 1.0, log=True)]


# ------------------------------------------------------------------------------------ the search
def test_search_stops_asking_once_the_budget_is_spent(tmp_path):
    settings = SearchSettings(sampler="random", space=SPACE, budget_s=0.6, seed=0, prune=False)
    res = run_search(settings, Sleepy(seconds=0.1), tmp_path / "s")
    durations = [t.duration_s for t in res.trials]
    assert 3 <= len(res.trials) <= 8, durations
    assert all(t.state == "COMPLETE" for t in res.trials)
    assert all(t.start_s < settings.budget_s for t in res.trials)  # no trial starts after the budget
    assert res.trials[-1].end_s >= settings.budget_s - max(durations) - 0.05  # it used the budget
    assert res.wall_clock_s <= settings.budget_s + max(durations) + 0.05  # over by at most one trial
    assert (tmp_path / "s" / "journal.log").is_file()


def test_median_pruner_stops_a_clearly_bad_trial_early(tmp_path):
    """Trials 0-3 complete (3 are needed before pruning); trial 4 reports 100 from its first step
    and is pruned there, so it takes 1 of its 5 steps; the search goes on after it."""
    settings = SearchSettings(
        sampler="random", space=SPACE, budget_s=60, seed=0, prune=True, prune_startup=3, prune_warmup=0, max_trials=6
    )
    res = run_search(settings, Sleepy(seconds=0.0, steps=5, bad={4}), tmp_path / "s")
    states = [t.state for t in res.trials]
    assert len(states) == 6 and states[4] == "PRUNED", states
    assert res.trials[4].attrs["reported"] == 1  # stopped at its first report
    assert all(t.attrs["reported"] == 5 for t in res.trials if t.state == "COMPLETE")
    assert res.best is not None and res.best.number != 4


def test_without_pruning_the_bad_trial_runs_to_the_end(tmp_path):
    settings = SearchSettings(sampler="random", space=SPACE, budget_s=60, seed=0, prune=False, max_trials=5)
    res = run_search(settings, Sleepy(seconds=0.0, steps=5, bad={4}), tmp_path / "s")
    assert [t.state for t in res.trials] == ["COMPLETE"] * 5 and res.trials[4].value == 100.0


@pytest.mark.parametrize("sampler", ["random", "tpe", "hyperband"])
def test_search_is_reproducible_with_a_seed(tmp_path, sampler):
    def points(seed, folder):  # one study name: Hyperband assigns brackets by the name and trial number
        settings = SearchSettings(
            sampler=sampler, space=SPACE, budget_s=60, seed=seed, prune=False, max_trials=8, tpe_startup=3
        )
        res = run_search(settings, Sleepy(seconds=0.0, steps=2), tmp_path / folder, name="study")
        return [(t.params["x"], t.value) for t in res.trials]

    a, b, c = points(0, "a"), points(0, "b"), points(1, "c")
    assert a == b and len(a) == 8
    assert a != c
    assert all(1e-6 <= x <= 1.0 for x, _ in a)


def test_tpe_models_after_its_random_startup(tmp_path):
    """With the same seed TPE's startup trials are random search's; afterwards TPE concentrates
    near the optimum x = 1e-3 (a mean error below random search's)."""

    def run(sampler):
        settings = SearchSettings(
            sampler=sampler, space=SPACE, budget_s=60, seed=0, prune=False, max_trials=30, tpe_startup=5
        )
        return run_search(settings, Sleepy(seconds=0.0, steps=1), tmp_path / sampler, name=sampler)

    rs, tpe = run("random"), run("tpe")
    assert [t.params for t in rs.trials[:5]] == [t.params for t in tpe.trials[:5]]
    late = lambda r: statistics.fmean(t.value for t in r.trials[15:])  # noqa: E731
    assert late(tpe) < late(rs)


@pytest.mark.slow  # each spawned worker imports hoexp, hence torch (seconds)
def test_two_worker_processes_share_one_journal_study(tmp_path):
    settings = SearchSettings(sampler="tpe", space=SPACE, budget_s=1.0, seed=0, workers=2, prune=False)
    res = run_search(settings, Sleepy(seconds=0.1), tmp_path / "s")
    assert {t.worker for t in res.trials} == {0, 1}
    assert len({t.number for t in res.trials}) == len(res.trials) >= 4
    assert all(t.start_s < 1.0 for t in res.trials)
    assert len({t.params["x"] for t in res.trials}) == len(res.trials)  # the workers' samplers differ


def test_an_objective_error_fails_its_trial_and_ends_the_search(tmp_path):
    def boom(ctx):
        raise ValueError("boom")

    settings = SearchSettings(sampler="random", space=SPACE, budget_s=60, prune=False)
    with pytest.raises(ValueError, match="boom"):
        run_search(settings, boom, tmp_path / "s")


def _journal_trials(folder, name="search"):
    import optuna

    from hoexp.tools.search import _storage

    return optuna.load_study(study_name=name, storage=_storage(Path(folder) / "journal.log")).get_trials()


def test_a_trial_stopped_by_a_signal_stays_running_and_a_continued_search_resumes_it(tmp_path):
    """Ctrl-C in trial 1: the search stops, trial 1 stays RUNNING (not FAIL); the same search again runs
    trial 1 first with its number and value (a hoexp trial continues its run from its checkpoint) and does
    not report its earlier steps twice, then goes on; the clock goes on from where the first start stopped."""
    settings = SearchSettings(sampler="random", space=SPACE, budget_s=60, seed=0, prune=False, max_trials=4)
    first = StopsAt(at=1, seconds=0.05)
    with pytest.raises(KeyboardInterrupt):
        run_search(settings, first, tmp_path / "s")
    before = {t.number: t for t in _journal_trials(tmp_path / "s")}
    assert {n: t.state.name for n, t in before.items()} == {0: "COMPLETE", 1: "RUNNING"}
    assert sorted(before[1].intermediate_values) == [1, 2]
    stopped_at = before[1].user_attrs["stopped_s"]

    again = StopsAt(at=-1, seconds=0.05)
    res = run_search(settings, again, tmp_path / "s")
    assert again.calls[0] == (1, first.calls[1][1])  # trial 1 again, same value, first
    assert [t.number for t in res.trials] == [0, 1, 2, 3] and {t.state for t in res.trials} == {"COMPLETE"}
    assert res.trials[0].end_s == before[0].user_attrs["end_s"]  # the finished trial is kept as it was
    assert all(t.start_s >= stopped_at for t in res.trials[2:])  # one clock across both starts
    assert sorted(_journal_trials(tmp_path / "s")[1].intermediate_values) == [1, 2, 3, 4, 5]


def test_a_continued_search_draws_new_points_and_counts_the_time_already_spent(tmp_path):
    """The samplers of a continued study are seeded anew (an unchanged seed would repeat the first start's
    points), and a search whose budget was spent by its first start asks for no more trials."""
    settings = SearchSettings(sampler="random", space=SPACE, budget_s=60, seed=0, prune=False, max_trials=3)
    first = run_search(settings, Sleepy(seconds=0.01), tmp_path / "s")
    settings.max_trials = 6
    second = run_search(settings, Sleepy(seconds=0.01), tmp_path / "s")
    xs = [t.params["x"] for t in second.trials]
    assert [t.params["x"] for t in first.trials] == xs[:3] and len(set(xs)) == 6

    spent = SearchSettings(sampler="random", space=SPACE, budget_s=0.3, seed=0, prune=False)
    done = run_search(spent, Sleepy(seconds=0.1), tmp_path / "t")
    assert done.wall_clock_s >= 0.3
    assert len(run_search(spent, Sleepy(seconds=0.1), tmp_path / "t").trials) == len(done.trials)


def test_pruned_is_a_stop_not_an_error():
    from hoexp.errors import HoexpError, StopRun

    assert issubclass(Pruned, StopRun) and not issubclass(Pruned, HoexpError) and Pruned.status == "pruned"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("hp.weight_decay.init=1e-6:1:log", Dim("hp.weight_decay.init", 1e-6, 1.0, True)),
        ("hp.dropout.init=0.01:0.8", Dim("hp.dropout.init", 0.01, 0.8, False)),
    ],
)
def test_parse_dim(text, expected):
    assert parse_dim(text) == expected


# ------------------------------------------------------------------------- choosing and matching
def summary(val_best, val_final, test_best, test_final, status="completed"):
    return {
        "status": status,
        "best": {"val_loss": val_best, "test_loss": test_best},
        "final": {"val_loss": val_final, "test_loss": test_final},
    }


def test_the_best_run_is_chosen_on_validation_loss_never_on_test_loss():
    a = summary(0.50, 0.60, test_best=0.10, test_final=0.10)  # best on test, worst on validation
    b = summary(0.30, 0.70, test_best=0.90, test_final=0.90)  # best on best-val
    c = summary(0.40, 0.40, test_best=0.80, test_final=0.80)  # best on final val
    d = summary(0.01, 0.01, test_best=0.01, test_final=0.01, status="pruned")  # stopped early: never chosen
    assert pick_best([a, b, c, d], "best") is b
    assert pick_best([a, b, c, d], "final") is c
    assert objective_value(summary(math.nan, math.inf, 0, 0), "best") == math.inf


def test_match_time_counts_trials_until_the_search_reaches_the_target():
    trials = [
        {"state": "COMPLETE", "value": 0.9, "wall_time_s": 2.0},
        {"state": "PRUNED", "value": 0.1, "wall_time_s": 0.5},  # a pruned trial's value never counts
        {"state": "COMPLETE", "value": 0.4, "wall_time_s": 2.0},
        {"state": "COMPLETE", "value": 0.3, "wall_time_s": 2.0},
    ]
    assert match_time(trials, 0.45, 2.0) == {"matched": True, "trials": 3, "time_s": 4.5, "fixed_runs": 2.25}
    m = match_time(trials, 0.2, 2.0)
    assert not m["matched"] and m["trials"] == 4 and m["fixed_runs"] == pytest.approx(3.25) and m["best_value"] == 0.3


# ---------------------------------------------------------------------------------- the command
def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hoexp: error: "), err
    return err


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--methods", "nope"], "unknown method 'nope'; choose one of: amigo, cg, cg_gn, exact"),
        (["--methods", "none"], "method 'none' is the baseline"),
        (["--ho", "neumann:method.termz=3"], "unknown key 'termz'"),
        (["--grid", "0.1,abc"], "--grid: 'abc' is not a number"),
        (["--grid", "20"], "bad --grid value 20 for hp.weight_decay.init"),
        (["hp=dropout", "--grid", "0.2,1.5"], "bad --grid value 1.5 for hp.dropout.init"),
        (["--grid-key", "hp.weight_decay.nope", "--grid", "0.1"], "unknown key 'nope'"),
        (["--budget-s", "0"], "--budget-s must be > 0"),
        (["--budget-factor", "-1"], "--budget-factor must be > 0"),
        (["--budget-s", "1", "--budget-factor", "2"], "not allowed with argument"),
        (["--space", "hp.weight_decay.init=0:1:log"], "a log range needs LOW > 0"),
        (["--space", "hp.weight_decay.init=1e-3:20"], "search range hp.weight_decay.init=0.001:20"),
        (["--search", "cmaes"], "unknown search 'cmaes'"),
        (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["seed=3"], "give seeds with --seeds"),
        (["hydra.run.dir=x"], "hydra.* overrides do not apply"),
        (["hp=[weight_decay,dropout]"], "several hp families"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_compare_input_is_one_line_and_nothing_runs(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["compare", *args, "--out", str(tmp_path / "out")])
    assert expected in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--budget-s", "nan"], "--budget-s must be > 0"),
        (["--budget-s", "inf"], "--budget-s must be > 0"),
        (["--budget-factor", "0"], "--budget-factor must be > 0"),
        (["--budget-factor", "inf"], "--budget-factor must be > 0"),
        (["--workers", "-2"], "--workers must be >= 1"),
        (["--workers", "nan"], "invalid int value: 'nan'"),
        (["--max-trials", "0"], "--max-trials must be >= 1"),
        (["--prune-warmup", "-1"], "--prune-warmup must be >= 0"),
        (["--tpe-startup", "-1"], "--tpe-startup must be >= 0"),
        (["--grid", "nan"], "--grid: 'nan' is not a finite number"),
        (["--grid", "1e-3,inf"], "--grid: 'inf' is not a finite number"),
        (["--grid", "-0.1"], "bad --grid value -0.1 for hp.weight_decay.init"),
        (["--space", "hp.weight_decay.init=1e-5:inf:log"], "need finite LOW < HIGH"),
        (["--space", "hp.weight_decay.init=nan:1"], "need finite LOW < HIGH"),
        (["--seeds", "-1"], "--seeds must be distinct integers >= 0"),
        (["--seeds", "0,0"], "--seeds must be distinct integers >= 0"),
        (["resume=true"], "compare continues its own runs"),
        (["--grid", "none", "--space", "hp.weight_decay.init=1e-5:20"], "search range hp.weight_decay.init=1e-05:20"),
    ],
)
def test_every_numeric_compare_option_is_bounded_in_one_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["compare", *args, "--out", str(tmp_path / "out")])
    assert expected in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()


def test_out_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert "is not an empty folder" in one_line_error(capsys, ["compare", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("where", ["/proc/hoexp-nope/out", "{tmp}/a-file/out"])
def test_an_unwritable_out_is_one_line_naming_the_folder_before_anything_runs(tmp_path, monkeypatch, capsys, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    out = where.format(tmp=tmp_path)
    err = one_line_error(capsys, ["compare", "outer_steps=2", "--grid", "none", "--search", "none", "--out", out])
    assert f"cannot write the output folder {out}" in err and "choose a writable folder with --out" in err
    assert not (tmp_path / "outputs").exists()


def test_out_holding_another_compare_is_refused_with_the_command_that_continues_it(tmp_path, capsys):
    """A compare folder keeps its arguments (arguments.json): the same arguments continue it (in any
    order, --no-plots and --x aside), other ones are refused in one line naming the difference and the command."""
    from hoexp.tools.compare.args import ARGUMENTS, plan_record

    out = tmp_path / "out"
    first = ["outer_steps=2", "--grid", "none", "--search", "none", "--seeds", "0,1"]
    plan = parse_args([*first, "--out", str(out)])
    assert not plan.continues
    out.mkdir()
    (out / ARGUMENTS).write_text(json.dumps(plan_record(plan)))
    same = parse_args(
        ["--out", str(out), "--no-plots", "--search", "none", "--seeds", "0,1", "--grid", "none", "outer_steps=2"]
        + ["--x", "solver"]  # the report's time axis: any
    )
    assert same.continues and plan_record(same)["plan"] == plan_record(plan)["plan"]
    assert (plan.x, same.x) == ("elapsed", "solver")
    err = one_line_error(capsys, ["compare", *first[:-1], "0,2", "--out", str(out)])
    assert "holds a compare with other arguments (--seeds: 2 here, 1 there)" in err
    assert f"continue it with: hoexp compare {' '.join(first)} --out {out}" in err


# ------------------------------------------------------------------------- values as overrides
def _family_values():
    from hoexp.hp.dropout import Dropout
    from hoexp.hp.learning_rate import LearningRate, Momentum
    from hoexp.hp.weight_decay import WeightDecay

    grids = [v for cls in (WeightDecay, LearningRate, Momentum, Dropout) for v in cls.grid]
    return sorted(set(grids)) + [1e-6, 3.3e-7, 2.5e-05, 1e16, 1.0, 0.0, 123.0, 0.1 + 0.2]


def test_every_value_compare_writes_reads_back_as_the_same_number_in_hydra_and_yaml():
    """A grid or searched value becomes an override: Hydra's grammar (``hoexp run``) and YAML must read
    the text back as the very number (YAML 1.1 reads ``1e-05``, the old text of 1e-5, as a string)."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hoexp.tools.compare import format_value

    parser = OverridesParser.create()
    for v in _family_values():
        text = format_value(v)
        assert parser.parse_override(f"k={text}").value() == v, text
        assert yaml.safe_load(text) == v and not isinstance(yaml.safe_load(text), str), text
    assert format_value(1e-5) == "1.0e-05" and format_value(0.001) == "0.001" and format_value(2.0) == "2"


def _planned_runs(plan):
    """Every run the compare plan makes, as (Composer, updates) on the path the runs take."""
    from hoexp.tools.compare.args import _middle
    from hoexp.tools.compare.trial import Composer, format_value

    seed = {"seed": str(plan.seeds[0])}
    none = Composer([*plan.base, "method=none"])
    runs = [(Composer([*plan.base, *ov]), seed) for _, ov in plan.ho] + [(none, seed)]
    runs += [(none, {**seed, plan.grid_key: format_value(v)}) for v in plan.grid]
    if plan.searches:
        for pick in (lambda d: d.low, lambda d: d.high, _middle):
            runs.append((none, {**seed, **{d.key: format_value(pick(d)) for d in plan.space}}))
    return runs


def test_each_compare_run_is_validated_and_built_once_from_one_compose(tmp_path, monkeypatch):
    """Every run of a compare (HO, baseline, grid point, search trial) goes through ``Composer`` and ``run_one``: the
    config is composed once per Composer, and each run validated once and each component built once (the run
    takes what the checks before it built)."""
    from collections import Counter

    from hoexp.tools.compare.trial import Composer, run_one
    from tests.counting import BUILT, count_composes_and_builds

    counts = count_composes_and_builds(monkeypatch)
    composer = Composer(["model.width=4", "outer_steps=1", "inner_steps=1", "progress=false", "method=cg"])
    for seed in (0, 1):
        assert run_one(composer, {"seed": str(seed)}, tmp_path / str(seed))["status"] == "completed"
    assert counts == Counter({"compose": 1, "validate": 2, **{f"build {k}": 2 for k in BUILT}}), counts


def _readme_compare_commands():
    """From the README and docs/*.md (docs/results.md holds the tables' commands)."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    lines = [
        line.split("  #", 1)[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        for line in block.splitlines()
        if line.startswith("hoexp compare ")
    ]
    inline = [" ".join(c.split()) for c in re.findall(r"`(hoexp compare\s[^`]+)`", text)]
    lines += [c.replace("--seeds S", "--seeds 1") for c in inline if "..." not in c and "[" not in c]
    from hoexp.cli import USAGE

    lines += [m.strip() for m in re.findall(r"^\s+(hoexp compare experiment=.*)$", USAGE, flags=re.M)]
    return list(dict.fromkeys(lines))


def test_the_documented_compare_commands_are_found():
    commands = _readme_compare_commands()
    assert len(commands) >= 6 and any("mnist_per_weight_decay" in c for c in commands), commands


@pytest.mark.slow  # ~4 s each: every run of every command composed
@pytest.mark.parametrize("command", _readme_compare_commands() + ["SCRIPT", "HELP"])
def test_every_run_of_each_documented_compare_command_composes_as_it_will_run(tmp_path, monkeypatch, command):
    """The README's and docs' compare commands (their code blocks and their tables'), the --help example and
    scripts/compare_iris.py: every run each would make (HO, baseline, each grid point, search trials)
    composes on the path the runs take, not only as an override."""
    import shlex

    from hoexp.tools.compare.args import _parser

    if command == "SCRIPT":  # the script's own defaults, captured where it calls run_compare
        import runpy

        import hoexp.tools.compare

        captured = []
        monkeypatch.setattr(hoexp.tools.compare, "run_compare", lambda plan, console=None: captured.append(plan))
        monkeypatch.setattr(sys, "argv", ["compare_iris.py", "--out", str(tmp_path / "out")])
        runpy.run_path(str(ROOT / "scripts" / "compare_iris.py"), run_name="__main__")
        (plan,) = captured
    else:
        if command == "HELP":
            command = _parser().epilog.removeprefix("example: ")
        plan = parse_args([*shlex.split(command)[2:], "--out", str(tmp_path / "out")])
    for composer, updates in _planned_runs(plan):
        spec, _, _ = composer.spec(updates)  # composed, validated and preflighted as the run will be
        for key, value in updates.items():  # holding the very number
            node = spec.raw
            for part in key.split("."):
                node = node[part]
            assert node == float(value), (key, value, node)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "-m", "hydra/sweeper=tpe", "method=none"],
        ["run", "-m", "experiment=iris_per_weight_decay", "hydra/sweeper=random_search", "hydra.sweeper.n_trials=2"],
        ["run", "-m", "experiment=iris_blackbox_wd", "hydra/sweeper=tpe", "hydra.sweeper.n_trials=20"],
        ["run", "experiment=iris_blackbox_wd_lr"],
    ],
)
def test_the_optuna_sweepers_are_refused_in_one_line_naming_hoexp_compare(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, argv)
    assert "hoexp compare" in err and "--search random,tpe" in err
    assert not (tmp_path / "outputs").exists()  # refused before Hydra launched anything


def test_help_lists_compare(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "\n  compare " in out and "hoexp compare experiment=" in out
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--methods",
        "--ho",
        "--seeds",
        "--grid",
        "--grid-key",
        "--budget-factor",
        "--budget-s",
        "--workers",
        "--objective",
        "--search",
        "--space",
        "--out",
    ):
        assert option in text


# ------------------------------------------------------------------------------------ end to end
TINY = ["outer_steps=4", "inner_steps=5", "model.width=16"]


@pytest.mark.slow
def test_compare_end_to_end_on_a_tiny_budget(tmp_path):
    """Iris, a 16-unit MLP, 4×5 steps, 2 seeds, Neumann: HO, baseline, a 3-point grid and both
    searches run; each search stays within its budget plus one trial; the report reads back with
    mean ± std; the grid and the searches choose on validation loss only."""
    out = tmp_path / "cmp"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "hoexp",
            "compare",
            *TINY,
            "--methods",
            "neumann",
            "--seeds",
            "0,1",
            "--grid",
            "1e-4,1e-2,1",
            "--budget-factor",
            "5",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((out / "compare.json").read_text())
    kinds = [c["kind"] for c in data["contenders"]]
    assert kinds == ["ho", "baseline", "grid_point", "grid_point", "grid_point", "grid_best", "search", "search"]
    by_name = {c["name"]: c for c in data["contenders"]}

    # every contender ran on both seeds
    for c in data["contenders"]:
        if c["kind"] == "search":
            assert [s["seed"] for s in c["studies"]] == [0, 1]
            assert all(s["n_trials"] >= 1 and s["best"] is not None for s in c["studies"])
        else:
            assert sorted(r["seed"] for r in c["runs"]) == [0, 1]
            assert all(r["status"] == "completed" for r in c["runs"])
    assert all(r["hypergradients"] == 4 for r in by_name["neumann"]["runs"])
    assert all(r["hypergradients"] == 0 for r in by_name["baseline"]["runs"])

    # the budget: 5 × the HO run of the seed; no trial starts after it, so one trial over at most
    for c in data["contenders"]:
        for s in c.get("studies", []):
            ho = next(r for r in by_name["neumann"]["runs"] if r["seed"] == s["seed"])
            assert s["budget_s"] == pytest.approx(5 * ho["wall_time_s"])
            assert all(t["start_s"] < s["budget_s"] for t in s["trials"])
            longest = max(t["duration_s"] for t in s["trials"])
            assert s["wall_clock_s"] <= s["budget_s"] + longest + 1e-6
            assert s["trial_time_s"] == pytest.approx(sum(t["wall_time_s"] for t in s["trials"]))

    # choices on validation loss (best over the run, the default objective), never on test loss
    assert data["objective"] == "best"
    for r in by_name["grid (best on val)"]["runs"]:
        points = [
            p for c in data["contenders"] if c["kind"] == "grid_point" for p in c["runs"] if p["seed"] == r["seed"]
        ]
        assert r["best"]["val_loss"] == min(p["best"]["val_loss"] for p in points)
    for c in data["contenders"]:
        for s in c.get("studies", []):
            done = [t for t in s["trials"] if t["state"] == "COMPLETE"]
            best = min(done, key=lambda t: t["value"])
            assert s["best_trial"] == best["number"] and s["best"]["best"]["val_loss"] == pytest.approx(best["value"])
            for t in s["trials"]:  # the value told to Optuna is the run's best validation loss
                run = json.loads((Path(t["path"]) / "summary.json").read_text())
                assert run["status"] == {"COMPLETE": "completed", "PRUNED": "pruned"}[t["state"]]
                if t["state"] == "COMPLETE":
                    assert t["value"] == pytest.approx(run["best"]["val_loss"])

    # compare.json: mean ± std over seeds
    ho_runs = by_name["neumann"]["runs"]
    mean, std = by_name["neumann"]["summary"]["final_test_loss"]
    assert mean == pytest.approx(statistics.fmean(r["final"]["test_loss"] for r in ho_runs))
    assert std == pytest.approx(statistics.stdev(r["final"]["test_loss"] for r in ho_runs))
    assert {m["search"] for m in data["match"]} == {"random search", "TPE"} and len(data["match"]) == 4

    # the report reads back: rows, mean ± std, the compare section, the plots
    import csv

    with open(out / "report" / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tunings = [r["tuning"] for r in rows]
    assert tunings == [
        "hypergradients",
        "fixed",
        "grid point",
        "grid point",
        "grid point",
        "grid search",
        "random search",
        "TPE",
    ]
    neu = rows[0]
    assert float(neu["best_val_loss"]) == pytest.approx(statistics.fmean(r["best"]["val_loss"] for r in ho_runs))
    assert float(neu["best_val_loss_std"]) == pytest.approx(statistics.stdev(r["best"]["val_loss"] for r in ho_runs))
    assert [r["count"] for r in rows[:6]] == ["2 seeds"] * 5 + ["2 studies × 3 trials"]
    rs = rows[6]
    studies = by_name["random search"]["studies"]
    assert float(rs["best_val_loss"]) == pytest.approx(statistics.fmean(s["best"]["best"]["val_loss"] for s in studies))
    assert float(rs["final_test_loss"]) == pytest.approx(
        statistics.fmean(s["best"]["final"]["test_loss"] for s in studies)
    )
    md = (out / "report" / "report.md").read_text()
    assert "| neumann | hypergradients |" in md and " ± " in md.split("| neumann | hypergradients |")[1].split("\n")[0]
    assert "## hoexp compare" in md and "fixed runs' worth" in md
    assert "matched neumann's best validation loss on" in p.stdout
    for png in ("best_so_far.png", "val_loss_vs_time.png"):
        assert (out / "report" / png).read_bytes().startswith(b"\x89PNG")
    assert elapsed < 120


@pytest.mark.parametrize("value,expected", [("both", ["random", "tpe"]), ("tpe", ["tpe"]), ("none", [])])
def test_search_names_parse_as_the_help_says(tmp_path, value, expected):
    from hoexp.tools.compare import parse_args

    plan = parse_args(["--search", value, "--out", str(tmp_path / "out")])
    assert plan.searches == expected


def test_the_preset_is_checked_with_the_method_compare_runs_not_its_own():
    """mnist_dropout_gaussian's own method (t1t2) refuses hard masks; with --methods the contender's check is the one
    made."""
    from hoexp.errors import ConfigError
    from hoexp.tools.compare import parse_args

    bernoulli = ["experiment=mnist_dropout_gaussian", "hp.dropout.relaxation=bernoulli"]
    with pytest.raises(ConfigError, match="^method=t1t2 cannot tune hp=dropout: relaxation=bernoulli"):
        parse_args(bernoulli)
    with pytest.raises(ConfigError, match="^method=unrolled cannot tune hp=dropout: relaxation=bernoulli"):
        parse_args([*bernoulli, "--methods", "unrolled"])
