"""``hoexp compare`` against current search: Optuna 5's default TPE, the multi-fidelity searcher
(Hyperband over the reported validation losses), budgets of several multiples of HO's wall time read
from one search (best trial *finished* within each), and the time each search takes to match HO."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hoexp.tools.compare import parse_args
from hoexp.tools.compare.args import Plan
from hoexp.tools.compare.output import Results, best_within, compare_json, time_to_match
from hoexp.tools.report.compare import compare_lines
from hoexp.tools.search import SEARCHERS, Dim, SearchSettings, _storage, _study
from hoexp.tools.search_workers import run_search
from tests.fake_objective import Flat

SPACE = [Dim("x", 1e-6, 1.0, log=True)]


# ------------------------------------------------------------------------------------- the searchers
@pytest.mark.parametrize("sampler", ["tpe", "hyperband"])
def test_hoexps_tpe_is_optuna_5s_default_multivariate_with_constant_liar(tmp_path, sampler):
    """No flag undoes Optuna 5's defaults, with one worker as with several (hoexp once turned constant
    liar off for one worker): the sampler models the joint space and lies about running trials."""
    import optuna

    assert int(optuna.__version__.split(".")[0]) >= 5
    settings = SearchSettings(sampler=sampler, space=SPACE, budget_s=1, workers=1)
    study = _study(settings, _storage(tmp_path / "journal.log"), "s", 0)
    tpe = study.sampler
    assert type(tpe) is optuna.samplers.TPESampler
    assert tpe._multivariate is None and tpe._is_multivariate(study)  # left to the library: multivariate
    assert tpe._constant_liar is True
    assert tpe._n_startup_trials == settings.tpe_startup


def test_hyperband_prunes_a_clearly_bad_trial_at_its_brackets_first_rung(tmp_path):
    """Good trials all report 1/step (ties are promoted); trials 4 and 6 report 100 from their first step.
    Each is stopped at the first rung of its bracket (step 1 or 3 of 5: min_resource · η^bracket), before
    its end, and every good trial runs to the end. --no-prune does not turn Hyperband off."""
    import optuna

    settings = SearchSettings(
        sampler="hyperband", space=SPACE, budget_s=60, max_trials=8, min_resource=1, max_resource=5, prune=False
    )
    res = run_search(settings, Flat(seconds=0.0, steps=5, bad={4, 6}), tmp_path / "s")
    assert [t.state for t in res.trials] == ["COMPLETE"] * 4 + ["PRUNED", "COMPLETE", "PRUNED", "COMPLETE"]
    assert {t.attrs["reported"] for t in res.trials if t.number in (4, 6)} <= {1, 3}
    assert all(t.attrs["reported"] == 5 for t in res.trials if t.state == "COMPLETE")
    study = _study(settings, _storage(tmp_path / "s" / "journal.log"), "search", 0)
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner) and SEARCHERS["hyperband"].multi_fidelity


def test_a_bad_hyperband_setting_is_one_line():
    from hoexp.errors import ConfigError

    with pytest.raises(ConfigError, match="Hyperband needs 1 <= min_resource <= max_resource"):
        SearchSettings(sampler="hyperband", space=SPACE, budget_s=1, min_resource=10, max_resource=5).check()


# ----------------------------------------------------------------------- budgets and time to match
def trial(number, value, end_s, state="COMPLETE"):
    return {"number": number, "value": value, "end_s": end_s, "state": state, "final": {"test_loss": 9.0 + number}}


TRIALS = [
    trial(0, 0.50, 2.0),
    trial(1, 0.05, 3.0, state="PRUNED"),  # pruned: no final loss, never chosen or matched
    trial(2, 0.30, 4.0),
    trial(3, 0.40, 3.5),  # finished before trial 2 (another worker)
    trial(4, 0.10, 7.0),  # started within the budget, finished after 6 s
    trial(5, None, 1.0, state="FAIL"),
]


@pytest.mark.parametrize("limit,expected", [(1.9, None), (2.0, 0), (3.9, 3), (4.0, 2), (6.0, 2), (7.0, 4), (100.0, 4)])
def test_the_best_within_a_budget_counts_only_trials_finished_within_it(limit, expected):
    t = best_within(TRIALS, limit)
    assert (None if t is None else t["number"]) == expected


@pytest.mark.parametrize(
    "target,limit,expected",
    [
        (0.45, 10.0, 3.5),  # trials 3 and 2 match; 3 finished first although numbered later
        (0.30, 10.0, 4.0),
        (0.50, 10.0, 2.0),
        (0.20, 10.0, 7.0),
        (0.20, 6.0, None),  # trial 4 matches only after the budget: not within it
        (0.06, 100.0, None),  # only the pruned trial was that low
    ],
)
def test_time_to_match_is_the_first_finish_at_or_below_the_target(target, limit, expected):
    assert time_to_match(TRIALS, target, limit) == expected


def _plan(**kw):
    base = dict(
        base=[],
        ho=[("pes", ["method=pes"])],
        seeds=[0, 1],
        grid_key=None,
        grid=[],
        searches=["tpe"],
        space=[],
        budget_factor=3.0,
        budget_s=None,
        budget_factors=[1.0, 3.0],
        objective="final",
    )
    return Plan(**{**base, **kw})


def _run(seed, val, test, wall):
    return {"seed": seed, "status": "completed", "wall_time_s": wall, "final": {"val_loss": val, "test_loss": test}}


def test_compare_json_reports_each_budget_per_seed_and_the_time_to_match_in_ho_and_fixed_runs():
    """HO takes 10 s on seed 0 and 20 s on seed 1 (the unit of the budgets), a fixed run 4 s. Seed 0's TPE
    finishes 0.6 at 8 s and 0.2 at 25 s: within 1× (10 s) its best is 0.6, within 3× 0.2, and it matches
    HO's 0.25 at 25 s = 2.5× HO = 6.25 fixed runs. Seed 1's TPE never reaches HO's 0.1: not within 3×."""
    plan = _plan()
    r = Results.empty(plan)
    r.ho["pes"] = [_run(0, 0.25, 0.3, 10.0), _run(1, 0.1, 0.2, 20.0)]
    r.baseline = [_run(0, 0.9, 0.9, 4.0), _run(1, 0.9, 0.9, 8.0)]
    r.units, r.budgets = {0: 10.0, 1: 20.0}, {0: 30.0, 1: 60.0}
    seed0 = [trial(0, 0.6, 8.0), trial(1, 0.2, 25.0), trial(2, 0.1, 31.0)]  # #2 ends after the budget
    seed1 = [trial(0, 0.5, 30.0), trial(1, 0.4, 45.0)]
    study = {"wall_clock_s": 0.0, "trial_time_s": 0.0, "n_trials": 0, "states": {}, "best_trial": None, "best": None}
    r.studies["tpe"] = [
        {**study, "seed": 0, "budget_s": 30.0, "trials": seed0},
        {**study, "seed": 1, "budget_s": 60.0, "trials": seed1},
    ]
    data = compare_json(plan, r, 0.0)
    within = {w["factor"]: w for w in data["within"]}
    assert sorted(within) == [1.0, 3.0]
    assert [(x["budget_s"], x["trial"], x["value"]) for x in within[1.0]["runs"]] == [
        (10.0, 0, 0.6),
        (20.0, None, None),
    ]
    assert [(x["budget_s"], x["trial"], x["value"]) for x in within[3.0]["runs"]] == [(30.0, 1, 0.2), (60.0, 1, 0.4)]
    assert within[3.0]["summary"]["value"][0] == pytest.approx(0.3)
    assert within[3.0]["summary"]["final_test_loss"][0] == pytest.approx(10.0)  # the chosen trials' test losses
    m0, m1 = data["match"]
    assert m0["matched"] and m0["wall_s"] == 25.0
    assert m0["ho_walls"] == pytest.approx(2.5) and m0["fixed_runs"] == pytest.approx(6.25)
    assert not m1["matched"] and m1["wall_s"] is None and m1["ho_walls"] is None
    assert data["budget"]["factors"] == [1.0, 3.0] and data["budget"]["ho_wall_s"] == {"0": 10.0, "1": 20.0}

    md, short = compare_lines(json.loads(json.dumps(data)))  # as the report reads it back
    text = "\n".join(md)
    assert "| TPE | 1× | 0.6000 / 9.0000 | — | 0.6000 (1/2 seeds) | 2/2 |" in text  # seed 1: nothing finished
    assert "| TPE | 3× | 0.2000 / 10.0000 | 0.4000 / 10.0000 | 0.3000 ± 0.1414 | 1/2 |" in text
    assert "| TPE | pes | 2.50× HO, 6.25 fixed runs (25.0 s) | not within 3× | 1/2 |" in text
    assert "pes ≤ TPE within 3×: 1/2 seed(s)" in short
    assert any(s.startswith("TPE matched pes's final validation loss on 1/2 seed(s)") for s in short)


# ------------------------------------------------------------------------------------- the command
def test_budget_factors_and_search_names_parse(tmp_path):
    from argparse import Namespace

    from hoexp.tools.compare.args import _budget_factors, _searches

    plan = parse_args(["--search", "random,tpe,hyperband", "--budget-factor", "10,1,3", "--out", str(tmp_path / "o")])
    assert plan.searches == ["random", "tpe", "hyperband"]
    assert plan.budget_factor == 10.0 and plan.budget_factors == [1.0, 3.0, 10.0]
    assert _searches(Namespace(search="both")) == ["random", "tpe"]  # today's pair, as before
    assert _budget_factors(None, None) == [1.0] and _budget_factors(None, 5.0) == []


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--budget-factor", "1,3,3"], "--budget-factor has repeated values: 1,3,3"),
        (["--budget-factor", "1,x"], "--budget-factor: 'x' is not a number"),
        (["--budget-factor", "1,0"], "--budget-factor must be > 0, got 0"),
        (["--search", "tpe,hyperband,tpe"], "--search names a search twice"),
        (["--search", "asha"], "choose from: random, tpe, hyperband, both"),
    ],
)
def test_bad_budgets_and_searches_are_one_line(tmp_path, args, expected):
    from hoexp.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_args([*args, "--grid", "none", "--out", str(tmp_path / "o")])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_compare_folder_from_before_lists_of_factors_continues(tmp_path):
    """arguments.json written before --budget-factor took a list has no budget_factors: the same command
    continues it."""
    from hoexp.tools.compare.args import ARGUMENTS, plan_record

    argv = ["outer_steps=2", "--grid", "none", "--search", "none", "--budget-factor", "3"]
    record = plan_record(parse_args([*argv, "--out", str(tmp_path / "o")]))
    del record["plan"]["budget_factors"]
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / ARGUMENTS).write_text(json.dumps(record))
    assert parse_args([*argv, "--out", str(tmp_path / "o")]).continues


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow  # ~25 s: 2 seeds × (HO, baseline, 2 grid points, 3 searches) on Iris
def test_compare_with_three_searchers_and_two_budgets_end_to_end(tmp_path):
    """Iris, tiny: random, TPE and Hyperband run once to 3× HO's wall time; compare.json has each search's
    best trial finished within 1× and 3× per seed (checked against the trials), the time to match, and
    Hyperband's study records its pruner; the report has both tables."""
    out = tmp_path / "cmp"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    argv = ["outer_steps=4", "inner_steps=5", "model.width=16", "--methods", "neumann", "--seeds", "0,1"]
    argv += ["--grid", "1e-4,1e-2", "--search", "random,tpe,hyperband", "--budget-factor", "1,3"]
    p = subprocess.run(
        [sys.executable, "-m", "hoexp", "compare", *argv, "--objective", "final", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((out / "compare.json").read_text())
    studies = {(c["sampler"], s["seed"]): s for c in data["contenders"] if c["kind"] == "search" for s in c["studies"]}
    assert sorted({k[0] for k in studies}) == ["hyperband", "random", "tpe"]
    assert [(w["sampler"], w["factor"]) for w in data["within"]] == [
        (s, f) for s in ("random", "tpe", "hyperband") for f in (1.0, 3.0)
    ]
    unit = data["budget"]["ho_wall_s"]
    for w in data["within"]:
        for x in w["runs"]:
            s = studies[(w["sampler"], x["seed"])]
            assert x["budget_s"] == pytest.approx(w["factor"] * unit[str(x["seed"])])
            assert s["budget_s"] == pytest.approx(3 * unit[str(x["seed"])])
            done = [t for t in s["trials"] if t["state"] == "COMPLETE" and t["end_s"] <= x["budget_s"]]
            assert x["trial"] == (min(done, key=lambda t: t["value"])["number"] if done else None)
            if done:  # the final validation loss of that trial's run, and its test loss reported beside it
                run = json.loads((Path(s["trials"][x["trial"]]["path"]) / "summary.json").read_text())
                assert x["value"] == pytest.approx(run["final"]["val_loss"])
                assert x["final"]["test_loss"] == pytest.approx(run["final"]["test_loss"])
    for m in data["match"]:
        assert m["matched"] == (m["wall_s"] is not None)
        if m["matched"]:
            assert m["wall_s"] <= m["budget_s"] and m["ho_walls"] == pytest.approx(m["wall_s"] / m["ho_wall_s"])
    hb = json.loads((out / "hyperband" / "seed0" / "study.json").read_text())
    assert hb["label"] == "Hyperband (TPE)" and hb["pruner"].startswith("Hyperband: steps 1..4")
    md = (out / "report" / "report.md").read_text()
    assert "| Hyperband (TPE) | 3× |" in md and "Time to match" in md and "| Hyperband (TPE) | neumann |" in md
    assert "neumann ≤ Hyperband (TPE) within 3×" in p.stdout
