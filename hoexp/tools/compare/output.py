"""What ``hoexp compare`` reports: the numbers of each run, the choices made on validation loss
(:func:`pick_best`), each search's best trial finished within each budget (:func:`best_within`), when a
search matched an HO run (:func:`time_to_match` on the search's clock, :func:`match_time` in trials), and
``compare.json`` (:func:`compare_json`: every contender's runs and mean ± std over seeds).

Budgets and times are on a search's clock (seconds since its start, which excludes start-up as an HO
run's wall time does). A search *starts* trials until its budget (the largest ``--budget-factor``) is
spent, so its last trial may end after it: the main table's search row counts every trial it started.
The per-budget table and the time to match count only trials *finished* within a budget: what the
search would have had, stopped then."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hoexp.tools.compare.args import Plan
from hoexp.tools.compare.trial import format_value, objective_value
from hoexp.tools.search import SAMPLERS

__all__ = ["Results", "best_within", "compare_json", "match_time", "numbers", "pick_best", "time_to_match"]


@dataclass
class Results:
    """Every contender's numbers so far (see :func:`numbers`), filled seed by seed."""

    ho: dict[str, list[dict]]  # HO contender → one entry per seed
    baseline: list[dict] = field(default_factory=list)
    grid_points: dict[float, list[dict]] = field(default_factory=dict)  # grid value → one entry per seed
    grid_best: list[dict] = field(default_factory=list)
    studies: dict[str, list[dict]] = field(default_factory=dict)  # sampler → one study per seed
    budgets: dict[int, float] = field(default_factory=dict)  # seed → the searches' budget (s)
    units: dict[int, float] = field(default_factory=dict)  # seed → the slowest HO run's wall time (s)

    @classmethod
    def empty(cls, plan: Plan) -> Results:
        return cls(
            ho={name: [] for name, _ in plan.ho},
            grid_points={v: [] for v in plan.grid},
            studies={s: [] for s in plan.searches},
        )


def pick_best(runs: list[dict[str, Any]], objective: str) -> dict[str, Any] | None:
    """The run with the lowest validation loss (``objective`` block) among completed runs; never test loss."""
    done = [r for r in runs if r.get("status") == "completed" and math.isfinite(objective_value(r, objective))]
    return min(done, key=lambda r: objective_value(r, objective)) if done else None


def match_time(trials: list[dict[str, Any]], target: float, fixed_s: float) -> dict[str, Any]:
    """When a search's best-so-far objective first reached ``target`` (trials in trial order, time =
    their cumulative run time), also in units of one fixed run (``fixed_s``)."""
    best, cum = math.inf, 0.0
    worth = lambda t: t / fixed_s if fixed_s > 0 else None  # noqa: E731
    for n, t in enumerate(trials, 1):
        cum += float(t.get("wall_time_s") or 0.0)
        if t.get("state") == "COMPLETE" and t.get("value") is not None:
            best = min(best, float(t["value"]))
        if best <= target:
            return {"matched": True, "trials": n, "time_s": cum, "fixed_runs": worth(cum)}
    return {
        "matched": False,
        "trials": len(trials),
        "time_s": cum,
        "fixed_runs": worth(cum),
        "best_value": best if math.isfinite(best) else None,
    }


def _finished_value(t: dict[str, Any]) -> float | None:
    """A trial's objective if it completed with one (a pruned or failed trial has none)."""
    v = t.get("value")
    return float(v) if t.get("state") == "COMPLETE" and v is not None and not math.isnan(float(v)) else None


def best_within(trials: list[dict[str, Any]], limit_s: float) -> dict[str, Any] | None:
    """The trial a search would report had it stopped at ``limit_s`` on its clock: the lowest objective
    among the COMPLETE trials that *finished* by then (``end_s <= limit_s``); None if none did."""
    done = [
        t
        for t in trials
        if _finished_value(t) is not None and t.get("end_s") is not None and float(t["end_s"]) <= limit_s
    ]
    return min(done, key=lambda t: cast(float, _finished_value(t))) if done else None


def time_to_match(trials: list[dict[str, Any]], target: float, limit_s: float) -> float | None:
    """When a search first had a trial finished with objective ``<= target``: the earliest ``end_s``
    among such COMPLETE trials (workers may finish out of trial order); None if none by ``limit_s``."""
    ends = [
        float(t["end_s"])
        for t in trials
        if (v := _finished_value(t)) is not None and v <= target and t.get("end_s") is not None
    ]
    first = min(ends, default=math.inf)
    return first if first <= limit_s else None


def numbers(summary: dict[str, Any], path: Path) -> dict[str, Any]:
    """What compare.json keeps of a run: its folder, status, seed, wall time and final / best evaluations."""
    keys = ("val_loss", "val_acc", "test_loss", "test_acc", "step")
    return {
        "path": str(path),
        "status": summary.get("status"),
        "seed": summary.get("seed"),
        "wall_time_s": summary.get("wall_time_s"),
        "hypergradients": summary.get("hypergradients"),
        "num_hparams": summary.get("num_hparams"),
        **{b: {k: (summary.get(b) or {}).get(k) for k in keys} for b in ("final", "best")},
    }


def _mean_std(values: list[Any]) -> list[float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return [None, None]
    return [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None]


def _loss_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``final_val_loss``, ..., ``best_test_loss``: each ``[mean, std]`` over the runs (std None for one run)."""
    return {
        f"{b}_{k}": _mean_std([(r.get(b) or {}).get(k) for r in runs])
        for b in ("final", "best")
        for k in ("val_loss", "test_loss")
    }


def _summarize(runs: list[dict[str, Any]], budget_key: str = "wall_time_s") -> dict[str, Any]:
    """Mean and std over seeds of a contender's numbers (``[mean, std]``; std None for one seed)."""
    out: dict[str, Any] = _loss_stats(runs)
    out["wall_time_s"] = _mean_std([r.get("wall_time_s") for r in runs])
    out["budget_spent_s"] = _mean_std([r.get(budget_key) for r in runs])
    out["seeds"] = len(runs)
    return out


def _contender(name: str, kind: str, summary: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """One entry of compare.json's ``contenders``: its name and kind, ``fields``, then its ``summary``."""
    return {"name": name, "kind": kind, **fields, "summary": summary}


def _contenders(plan: Plan, r: Results) -> list[dict[str, Any]]:
    out = [_contender(name, "ho", _summarize(r.ho[name]), overrides=ov, runs=r.ho[name]) for name, ov in plan.ho]
    out.append(_contender("baseline", "baseline", _summarize(r.baseline), overrides=["method=none"], runs=r.baseline))
    for v, runs in r.grid_points.items():
        overrides = ["method=none", f"{plan.grid_key}={format_value(v)}"]
        name = f"grid {plan.grid_key}={v:g}"
        out.append(_contender(name, "grid_point", _summarize(runs), value=v, overrides=overrides, runs=runs))
    if plan.grid:
        summary = _summarize(r.grid_best, "grid_time_s")
        out.append(_contender("grid (best on val)", "grid_best", summary, runs=r.grid_best))
    for sampler, st in r.studies.items():
        best_runs = [{**s["best"], "budget_spent_s": s["wall_clock_s"]} for s in st if s["best"] is not None]
        summary = _summarize(best_runs, "budget_spent_s")
        out.append(_contender(SAMPLERS[sampler], "search", summary, sampler=sampler, studies=st))
    return out


def _budgets(plan: Plan, r: Results, seed: int) -> list[tuple[float | None, float]]:
    """``(factor, seconds)`` of each reported budget of ``seed`` (``--budget-s``: one, factor None)."""
    if plan.budget_s is not None:
        return [(None, plan.budget_s)]
    unit = r.units.get(seed, 0.0)
    return [(f, f * unit) for f in plan.budget_factors]


def _within(plan: Plan, r: Results) -> list[dict[str, Any]]:
    """Per search and budget: each seed's best trial finished within the budget, and mean ± std over seeds
    of its objective and of its final validation and test losses (test: reported, never chosen on)."""
    rows = []
    for sampler, st in r.studies.items():
        for i in range(len(plan.budget_factors) if plan.budget_s is None else 1):
            runs = []
            for s in st:
                factor, limit = _budgets(plan, r, s["seed"])[i]
                t = best_within(s["trials"], limit) or {}  # {}: no trial finished by then
                finished = sum(1 for x in s["trials"] if x.get("end_s") is not None and float(x["end_s"]) <= limit)
                runs.append(
                    {
                        "seed": s["seed"],
                        "factor": factor,
                        "budget_s": limit,
                        "finished": finished,
                        "trial": t.get("number"),
                        "value": t.get("value"),
                        "final": t.get("final"),
                        "best": t.get("best"),
                    }
                )
            summary = {
                "value": _mean_std([x["value"] for x in runs]),
                **_loss_stats(runs),
                "seeds_with_a_trial": sum(1 for x in runs if x["trial"] is not None),
            }
            rows.append(
                {
                    "search": SAMPLERS[sampler],
                    "sampler": sampler,
                    "factor": runs[0]["factor"] if runs else None,
                    "runs": runs,
                    "summary": summary,
                }
            )
    return rows


def _matches(plan: Plan, r: Results) -> list[dict[str, Any]]:
    """For each search, HO contender and seed: when the search first had a trial finished with the HO run's
    objective or lower, on the search's clock (``wall_s``), in the seed's HO wall time (``ho_walls``) and
    in fixed runs' worth (``fixed_runs``), or not within its budget (``matched`` false); and, in trial
    order, the trials and cumulative trial time it took (:func:`match_time`: ``trials``, ``trial_time_s``)."""
    match = []
    fixed = {b["seed"]: float(b["wall_time_s"] or 0) for b in r.baseline}
    for sampler, st in r.studies.items():
        for s in st:
            seed, unit, fixed_s = s["seed"], r.units.get(s["seed"]), fixed.get(s["seed"], 0.0)
            for name, _ in plan.ho:
                run = next(x for x in r.ho[name] if x["seed"] == seed)
                target = objective_value(run, plan.objective)
                wall = time_to_match(s["trials"], target, s["budget_s"])
                order = match_time(s["trials"], target, fixed_s)
                match.append(
                    {
                        "search": SAMPLERS[sampler],
                        "ho": name,
                        "seed": seed,
                        "target": target,
                        "budget_s": s["budget_s"],
                        "budget_factor": plan.budget_factor,
                        "ho_wall_s": unit,
                        "fixed_run_s": fixed.get(seed),
                        "matched": wall is not None,
                        "wall_s": wall,
                        "ho_walls": wall / unit if wall is not None and unit else None,
                        "fixed_runs": wall / fixed_s if wall is not None and fixed_s > 0 else None,
                        "trials": order["trials"] if order["matched"] else None,
                        "trial_time_s": order["time_s"] if order["matched"] else None,
                        "best_value": order.get("best_value"),
                    }
                )
    return match


def compare_json(plan: Plan, r: Results, elapsed: float) -> dict[str, Any]:
    """``compare.json``: the command, the budget rule, every contender's runs and summaries, the matches."""
    return {
        "version": 1,
        "argv": plan.argv,
        "overrides": plan.base,
        "seeds": plan.seeds,
        "objective": plan.objective,
        "grid": {"key": plan.grid_key, "values": plan.grid},
        "space": [{"key": d.key, "low": d.low, "high": d.high, "log": d.log} for d in plan.space],
        "budget": {
            "factor": plan.budget_factor,
            "seconds": plan.budget_s,
            "per_seed": {str(k): v for k, v in r.budgets.items()},
            "rule": (
                "--budget-s"
                if plan.budget_s is not None
                else f"{plan.budget_factor:g} × the wall time of the slowest HO run of the seed"
            ),
            "factors": plan.budget_factors,
            "ho_wall_s": {str(k): v for k, v in r.units.items()},
            "convention": "a search starts trials until its budget is spent; per budget, its best trial "
            "finished within that budget",
        },
        "workers": plan.workers,
        "prune": plan.prune,
        "prune_warmup": plan.prune_warmup,
        "elapsed_s": elapsed,
        "contenders": _contenders(plan, r),
        "within": _within(plan, r),
        "match": _matches(plan, r),
    }
