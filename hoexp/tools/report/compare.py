"""The ``hoexp compare`` section of a report, from ``compare.json``: the budget rule, each search's studies,
the best of each contender within each budget (per seed and mean ± std), and each search's time to
match HO, as Markdown lines and short console lines."""

from __future__ import annotations

import math
import statistics
from typing import Any

from hoexp.tools.report.group import _fmt_value, _short_key
from hoexp.tools.report.tables import _md_table

__all__ = ["compare_lines"]


def _pm(values: list[float], digits: int = 4) -> str:
    """``mean ± std`` (std only for two or more values; ``—`` for none)."""
    if not values:
        return "—"
    text = f"{statistics.fmean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def _x(factor: float | None) -> str:
    return "--budget-s" if factor is None else f"{factor:g}×"


def _settings(data: dict[str, Any]) -> list[str]:
    obj = data.get("objective", "best")
    budget = data.get("budget") or {}
    per_seed = budget.get("per_seed") or {}
    factors = budget.get("factors") or []
    return [
        f"Objective of the grid and the searches: the **{obj}** validation loss (test loss is never used to "
        f"choose). Search budget per seed: {budget.get('rule', '?')}"
        + (": " + ", ".join(f"seed {k}: {v:.1f} s" for k, v in per_seed.items()) if per_seed else "")
        + (f"; reported at {', '.join(f'{f:g}' for f in factors)} × HO's wall time" if len(factors) > 1 else "")
        + f"; {data.get('workers', 1)} worker(s) per search; pruning of random search and TPE "
        + ("on (MedianPruner)" if data.get("prune") else "off")
        + ".",
        "",
    ]


def _studies(data: dict[str, Any]) -> list[str]:
    studies = [(c["name"], s) for c in data.get("contenders", []) if c.get("kind") == "search" for s in c["studies"]]
    if not studies:
        return []
    rows = []
    for name, s in studies:
        states = ", ".join(f"{n} {k.lower()}" for k, n in (s.get("states") or {}).items())
        params = " ".join(f"{_short_key(k)}={_fmt_value(v)}" for k, v in (s.get("best_params") or {}).items())
        rows.append(
            [
                name,
                str(s["seed"]),
                f"{s['budget_s']:.1f}",
                f"{s['wall_clock_s']:.1f}",
                f"{s['trial_time_s']:.1f}",
                f"{s['n_trials']} ({states})",
                "—" if s.get("best_trial") is None else f"#{s['best_trial']} {params}",
            ]
        )
    header = ["search", "seed", "budget (s)", "spent: wall clock (s)", "spent: trial time (s)", "trials", "best trial"]
    return [*_md_table(header, rows), ""]


def _objective(run: dict[str, Any] | None, obj: str) -> float | None:
    v = ((run or {}).get(obj) or {}).get("val_loss")
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _cell(value: float | None, test: float | None) -> str:
    return "—" if value is None else f"{value:.4f} / " + ("—" if test is None else f"{test:.4f}")


def _at_most(ho: float | None, other: float | None) -> bool:
    """HO's value is at most the other's (a contender with no value, e.g. no trial finished, loses)."""
    return ho is not None and (other is None or ho <= other)


def _within(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The per-budget table: HO's runs, the grid's best point, each search's best trial finished within
    each budget; a column per HO contender counts the seeds on which HO's objective is at most the row's."""
    obj, seeds = data.get("objective", "best"), [int(s) for s in data.get("seeds", [])]
    contenders = data.get("contenders", [])
    ho = {c["name"]: {r["seed"]: _objective(r, obj) for r in c["runs"]} for c in contenders if c["kind"] == "ho"}
    units = {int(k): v for k, v in ((data.get("budget") or {}).get("ho_wall_s") or {}).items()}
    rows, short = [], []

    def row(name: str, budget: str, by_seed: dict[int, tuple[float | None, float | None]], wins: bool) -> None:
        vals = [v for v, _ in by_seed.values() if v is not None]
        cols = [_cell(*by_seed.get(s, (None, None))) for s in seeds]
        counts = []
        for h, target in ho.items():
            beaten = [s for s in seeds if _at_most(target.get(s), by_seed.get(s, (None, None))[0])]
            counts.append(f"{len(beaten)}/{len(seeds)}" if wins else "—")
            if wins:
                short.append(f"{h} ≤ {name} within {budget}: {len(beaten)}/{len(seeds)} seed(s)")
        some = f" ({len(vals)}/{len(seeds)} seeds)" if 0 < len(vals) < len(seeds) else ""
        rows.append([name, budget, *cols, _pm(vals) + some, *counts])

    for c in contenders:
        if c["kind"] == "ho":
            runs = {r["seed"]: (_objective(r, obj), (r.get("final") or {}).get("test_loss")) for r in c["runs"]}
            row(f"HO {c['name']}", "its run", runs, False)
        elif c["kind"] == "grid_best":
            runs = {r["seed"]: (_objective(r, obj), (r.get("final") or {}).get("test_loss")) for r in c["runs"]}
            cost = [r["grid_time_s"] / units[r["seed"]] for r in c["runs"] if units.get(r["seed"])]
            row("grid (best on val)", f"all points ({_pm(cost, 1)}× HO)" if cost else "all points", runs, True)
    for w in data.get("within", []):
        runs = {x["seed"]: (x["value"], (x.get("final") or {}).get("test_loss")) for x in w["runs"]}
        row(w["search"], _x(w.get("factor")), runs, True)
    if not data.get("within"):
        return [], []
    header = ["contender", "budget (× HO wall time)", *(f"seed {s}" for s in seeds), "mean ± std (val)"]
    header += [f"{h} ≤ it" for h in ho]
    md = [
        f"Best within each budget: cells are the **{obj}** validation loss / final test loss of the run each "
        "contender chose on validation loss. A search's entry is its best trial *finished* within the budget "
        "(× the seed's slowest HO run; the search ran once, to the largest budget, starting trials until it "
        "was spent; its clock counts each trial's set-up, which a run's wall time leaves out); `—`: no trial "
        "finished by then. The last column(s): seeds on which HO's validation loss is at most the row's.",
        "",
        *_md_table(header, rows),
        "",
    ]
    return md, short


def _match(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Time to match: per search and HO contender, each seed's time to its first trial finished at or below
    HO's objective, in HO wall times and fixed runs' worth, or "not within F×"."""
    match = data.get("match") or []
    if not match:
        return [], []
    obj, seeds = data.get("objective", "best"), [int(s) for s in data.get("seeds", [])]
    limit = _x((data.get("budget") or {}).get("factor"))
    rows, short = [], []
    for key in dict.fromkeys((m["search"], m["ho"]) for m in match):
        ms = {m["seed"]: m for m in match if (m["search"], m["ho"]) == key}
        cells = []
        for s in seeds:
            m = ms.get(s)
            if m is None:
                cells.append("—")
            elif not m["matched"]:
                cells.append(f"not within {limit}")
            else:
                in_ho = "" if m.get("ho_walls") is None else f"{m['ho_walls']:.2f}× HO, "
                in_fixed = "" if m.get("fixed_runs") is None else f"{m['fixed_runs']:.2f} fixed runs"
                cells.append(f"{in_ho}{in_fixed} ({m['wall_s']:.1f} s)")
        hit = [m for m in ms.values() if m["matched"]]
        walls = [m["ho_walls"] for m in hit if m.get("ho_walls") is not None]
        fixed = [m["fixed_runs"] for m in hit if m.get("fixed_runs") is not None]
        mean = f"{_pm(walls, 2)}× HO; {_pm(fixed, 2)} fixed runs" if hit else "—"
        rows.append([key[0], key[1], *cells, f"{len(hit)}/{len(ms)}", mean])
        text = f"{key[0]} matched {key[1]}'s {obj} validation loss on {len(hit)}/{len(ms)} seed(s)"
        if fixed:
            text += f", after {_pm(fixed, 2)} fixed runs' worth of wall time ({_pm(walls, 2)} × HO's)"
        if len(hit) < len(ms):
            text += f"; not within {limit} HO's wall time on {len(ms) - len(hit)}"
        short.append(text)
    header = ["search", "HO", *(f"seed {s}" for s in seeds), "matched", "mean over matched seeds"]
    md = [
        "Time to match: when each search first had a trial finished with HO's validation loss or lower (same "
        "seed), on the search's clock, in the seed's HO wall time and in fixed runs' worth (that time / the "
        "`method=none` baseline run's wall time):",
        "",
        *_md_table(header, rows),
        "",
        *(f"- {t}" for t in short),
        "",
    ]
    return md, short


def compare_lines(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Markdown lines for a ``compare.json`` (budgets, studies, the per-budget table, time to match) and the
    short summary lines printed on the console."""
    within_md, within_short = _within(data)
    match_md, match_short = _match(data)
    return [*_settings(data), *_studies(data), *within_md, *match_md], [*within_short, *match_short]
