"""The arguments of ``hoexp compare``: parsed, and every contender's run validated before anything runs.

:func:`parse_args` turns the command line into a :class:`Plan`: the HO contenders, the baseline, the
grid and the searched space, each run's overrides validated as ``hoexp run`` validates them
(:func:`hoexp.config.compose.validate_job`), grid and search values included (a sample trial, the
ends of each range), so a bad value fails in one line before the first run is paid for. The compare
folder (``--out``) must be new, empty, or hold a compare of the same arguments (``arguments.json``),
which the command then continues.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hoexp.engine.metrics import read_json
from hoexp.errors import ArgumentParser, ConfigError
from hoexp.tools.compare.trial import format_value
from hoexp.tools.horizon import split_overrides
from hoexp.tools.search import SAMPLERS, Dim, parse_dim

__all__ = ["ARGUMENTS", "Plan", "continue_command", "parse_args", "plan_record"]

# A family's default grid of its global value (--grid) and whether it is searched on a log scale are declared
# by the family's class (`grid`, `log_scale`; hoexp.hp.*), read from its factory's return annotation.
OBJECTIVES = ("best", "final")
ARGUMENTS = "arguments.json"  # in the compare folder: the command it runs (a continued compare must match)


@dataclass
class Plan:
    """A validated ``hoexp compare`` command."""

    base: list[str]  # overrides for every run (the user's, plus progress=false)
    ho: list[tuple[str, list[str]]]  # (contender name, its overrides: method=..., method options)
    seeds: list[int]
    grid_key: str | None
    grid: list[float]
    searches: list[str]  # random, tpe, hyperband
    space: list[Dim]
    budget_factor: float | None  # the searches run to this × the seed's slowest HO run (the largest of budget_factors)
    budget_s: float | None
    workers: int = 1
    objective: str = "best"
    prune: bool = True
    prune_warmup: int = 0
    max_trials: int | None = None
    tpe_startup: int = 5
    out: Path = Path("outputs/compare")
    plots: bool = True
    x: str = "elapsed"  # the report's time axis: elapsed (wall) or solver time
    argv: list[str] = field(default_factory=list)
    continues: bool = False  # --out holds an earlier start of this compare
    budget_factors: list[float] = field(default_factory=list)  # the budgets reported (× HO's wall time), ascending


def _parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="hoexp compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="HO methods against a fixed baseline, a grid, random search, TPE and Hyperband over the "
        "family's global value, at equal wall-clock budgets, over several seeds; ends with hoexp report.",
        epilog="example: hoexp compare experiment=iris_per_weight_decay --methods neumann,cg --seeds 0,1,2 "
        "--budget-factor 3",
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (the experiment preset, steps, ...)")
    ap.add_argument("--methods", default=None, help="HO methods, comma-separated (default: the preset's method)")
    ap.add_argument(
        "--ho",
        action="append",
        default=[],
        metavar="METHOD[:OVERRIDES]",
        help="an HO contender with options, e.g. 'neumann:method.terms=20 method.alpha=0.05' "
        "(repeatable; added to --methods)",
    )
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    ap.add_argument(
        "--grid",
        default=None,
        help="grid values, comma-separated, or 'none' (default: 5 values per "
        "family, e.g. 1e-5,...,1e-1 for weight decay, 0.05,0.2,0.35,0.5,0.65 for dropout)",
    )
    ap.add_argument("--grid-key", default=None, help="the key the grid and the search set (default: hp.<family>.init)")
    ap.add_argument(
        "--search",
        default="random,tpe",
        help="black-box searches, comma-separated: random, tpe (Optuna's default TPE), hyperband (TPE with "
        "Optuna's HyperbandPruner over the logged validation losses); both = random,tpe (the default); or none",
    )
    ap.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=LOW:HIGH[:log]",
        help="a searched range (repeatable; default: the grid key over the grid's range)",
    )
    ap.add_argument("--search-lr", action="store_true", help="also search optim.inner.lr in [lr/10, 10 lr] (log)")
    _budget_and_output_arguments(ap)
    return ap


def _budget_and_output_arguments(ap: argparse.ArgumentParser) -> None:
    """The budget, pruning, output and report options of ``hoexp compare``."""
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-factor",
        default=None,
        help="search budget = this × the wall time of the slowest HO run of the seed (default 1); a list "
        "(e.g. 1,3,10) runs each search once to the largest and reports each search's best trial finished "
        "within each budget",
    )
    budget.add_argument("--budget-s", type=float, default=None, help="search budget in seconds, per search and seed")
    ap.add_argument("--workers", type=int, default=1, help="local worker processes per search (default 1)")
    ap.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="best",
        help="what the grid and the searches minimize: the best (default) or the final validation loss",
    )
    ap.add_argument(
        "--no-prune", action="store_true", help="no MedianPruner for random and tpe: their trials run to the end"
    )
    ap.add_argument(
        "--prune-warmup",
        type=int,
        default=None,
        help="outer steps before a trial can be pruned (default: a quarter of outer_steps)",
    )
    ap.add_argument("--max-trials", type=int, default=None, help="also stop a search after this many trials")
    ap.add_argument("--tpe-startup", type=int, default=5, help="random trials before TPE models (default 5)")
    ap.add_argument(
        "--out",
        default=None,
        help="output folder (default: outputs/compare/<date>_<time>); the same command with the same --out "
        "continues an interrupted compare (finished runs kept, stopped ones resumed)",
    )
    ap.add_argument("--no-plots", action="store_true", help="no PNG plots in the report")
    ap.add_argument(
        "--x",
        choices=("elapsed", "solver"),
        default="elapsed",
        help="the report plots' time axis: wall time (default) or solver time (training and hypergradients); "
        "the budgets stay in wall time",
    )


def _floats(text: str, what: str, positive: bool = False) -> list[float]:
    """Comma-separated distinct finite numbers (``positive``: each > 0)."""
    out = []
    for v in (t.strip() for t in text.split(",")):
        try:
            x = float(v)
        except ValueError:
            raise ConfigError(f"{what}: '{v}' is not a number") from None
        if positive and not (math.isfinite(x) and x > 0):
            raise ConfigError(f"{what} must be > 0, got {v}")
        if not math.isfinite(x):
            raise ConfigError(f"{what}: '{v}' is not a finite number")
        out.append(x)
    if len(set(out)) != len(out):
        raise ConfigError(f"{what} has repeated values: {text}")
    return out


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "run"


def _check(overrides: list[str], what: str) -> None:
    """Validate one run's overrides (the same checks as ``hoexp run``); prefix errors with ``what``."""
    from hoexp.config.compose import validate_job

    try:
        validate_job(overrides)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}" if what else str(e)) from None


def _declared(spec: Any, family: str | None) -> Any:
    """The class the ``hp.<family>`` factory declares it returns (its ``grid`` and ``log_scale``), or None."""
    from hoexp.config.build import declared_type

    component = next((h for h in spec.hp if h.key == f"hp.{family}"), None)
    return None if component is None else declared_type(component.target)


def _refuse_overrides(overrides: list[str]) -> None:
    """Overrides that compare sets itself: ``hydra.*`` (it runs without Hydra's launcher), the seed, the
    method, and ``resume`` (compare continues its own runs)."""
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key.startswith("hydra") and key != "hydra.searchpath":  # hydra.searchpath: --config-dir
            raise ConfigError(
                f"compare: '{o}': hydra.* overrides do not apply (compare runs without Hydra's "
                "launcher); choose the folder with --out"
            )
        if key in ("seed", "method"):
            raise ConfigError(f"compare: '{o}': give seeds with --seeds and HO methods with --methods / --ho")
        if key == "resume":
            raise ConfigError(
                f"compare: '{o}': compare continues its own runs: run the same command with the same --out "
                "to continue an interrupted compare"
            )


def _ho_contenders(entries: list[str], base: list[str], spec: Any, seed: int) -> list[tuple[str, list[str]]]:
    """``(name, overrides)`` per HO contender (``entries``: of ``--methods`` and ``--ho``; none: the preset's
    method), each run validated."""
    from hoexp.config.compose import group_options

    valid = [m for m in group_options("method", base) if m != "none"]
    ho: list[tuple[str, list[str]]] = []
    for entry in entries or [spec.method.name]:
        method, _, opts = entry.partition(":")
        method = method.strip()
        if method == "none":
            raise ConfigError(
                "method 'none' is the baseline, which compare always runs; choose HO methods: " + ", ".join(valid)
            )
        if method not in valid:
            raise ConfigError(f"unknown method '{method}'; choose one of: {', '.join(valid)}")
        extra = split_overrides(opts)
        name = _name(method + ("_" + "_".join(extra) if extra else ""))
        while name in {n for n, _ in ho}:
            name += "_"
        ov = [f"method={method}", *extra]
        _check([*base, f"seed={seed}", *ov], f"HO contender '{entry}'")
        ho.append((name, ov))
    if not ho:
        raise ConfigError("compare needs at least one HO method (--methods or --ho)")
    return ho


def _grid(ns: argparse.Namespace, spec: Any) -> tuple[str, list[float], list[float], Any]:
    """The grid's key, its values, the family's default grid (for the search's range) and the family's class."""
    families = [h.name for h in spec.hp]
    key = ns.grid_key
    if key is None:
        if len(families) != 1:
            raise ConfigError(
                f"several hp families ({', '.join(families)}): choose the compared value with "
                "--grid-key, e.g. --grid-key hp.weight_decay.init"
            )
        key = f"hp.{families[0]}.init"
    family = key.split(".")[1] if key.startswith("hp.") and key.count(".") >= 2 else None
    declared = _declared(spec, family)
    default_grid = list(getattr(declared, "grid", ())) if key == f"hp.{family}.init" else []
    if ns.grid is None:
        if not default_grid:
            raise ConfigError(f"no default grid for --grid-key {key}: give the values with --grid")
        grid = default_grid
    elif ns.grid.strip().lower() == "none":
        grid = []
    else:
        grid = _floats(ns.grid, "--grid")
    return key, grid, default_grid, declared


def _searches(ns: argparse.Namespace) -> list[str]:
    searches = [s.strip() for s in ns.search.split(",") if s.strip()]
    if searches == ["none"]:
        return []
    if searches == ["both"]:
        return ["random", "tpe"]
    for s in searches:
        if s not in SAMPLERS:
            raise ConfigError(f"unknown search '{s}'; choose from: {', '.join(SAMPLERS)}, both (or none)")
    if len(set(searches)) != len(searches):
        raise ConfigError(f"--search names a search twice: {ns.search}")
    return searches


def _space(ns: argparse.Namespace, spec: Any, key: str, values: list[float], declared: Any) -> list[Dim]:
    space = [parse_dim(t) for t in ns.space]
    if not space:
        if len(values) < 2:
            raise ConfigError(f"give the search range with --space {key}=LOW:HIGH[:log]")
        space = [Dim(key, min(values), max(values), bool(getattr(declared, "log_scale", False)) or key.endswith(".lr"))]
    if ns.search_lr:
        lr = float(spec.inner_optim.lr)
        space.append(Dim("optim.inner.lr", lr / 10, lr * 10, True))
    if len({d.key for d in space}) != len(space):
        raise ConfigError("--space names a key twice")
    return space


def _middle(d: Dim) -> float:
    """A trial's value inside the range: the geometric middle of a log range, else the middle."""
    return math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2


def _budget_factors(text: str | None, budget_s: float | None) -> list[float]:
    """``--budget-factor``: positive, distinct factors, ascending (default ``[1]``; none with --budget-s)."""
    if budget_s is not None:
        return []
    return [1.0] if text is None else sorted(_floats(text, "--budget-factor", positive=True))


def _check_numbers(ns: argparse.Namespace, outer_steps: int) -> int:
    """The numeric options' bounds; returns the pruner's warm-up (default: a quarter of outer_steps)."""
    if ns.budget_s is not None and not (math.isfinite(ns.budget_s) and ns.budget_s > 0):
        raise ConfigError(f"--budget-s must be > 0, got {ns.budget_s:g}")
    if ns.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {ns.workers}")
    if ns.max_trials is not None and ns.max_trials < 1:
        raise ConfigError(f"--max-trials must be >= 1, got {ns.max_trials}")
    warmup = outer_steps // 4 if ns.prune_warmup is None else ns.prune_warmup
    if warmup < 0:
        raise ConfigError(f"--prune-warmup must be >= 0, got {warmup}")
    if ns.tpe_startup < 0:
        raise ConfigError(f"--tpe-startup must be >= 0, got {ns.tpe_startup}")
    return warmup


def parse_args(argv: list[str]) -> Plan:
    """Parse and validate ``hoexp compare`` arguments; every error is one :class:`ConfigError`.

    Every run the compare will make is validated here as ``hoexp run`` validates its overrides: each HO
    contender, the baseline, each grid point, and for the searches a trial in the middle of the space and
    each end of each range."""
    from hoexp.config.compose import compose_spec, refuse_removed

    ns = _parser().parse_intermixed_args(argv)
    refuse_removed(ns.overrides)
    _refuse_overrides(ns.overrides)
    base = ["progress=false", *ns.overrides]
    try:
        seeds = [int(s) for s in ns.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got '{ns.seeds}'") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct integers >= 0, got '{ns.seeds}'")
    # the preset must be valid with the method compare runs first (its own unless --methods / --ho: a preset's
    # method may refuse what the overrides ask, e.g. t1t2 and hp.dropout.relaxation=bernoulli)
    methods = [m.strip() for m in ns.methods.split(",")] if ns.methods else []
    entries = [*methods, *ns.ho]  # the HO contenders (none: the preset's method)
    first = next((e.partition(":")[0].strip() for e in entries if e.strip() != "none"), None)
    spec, _ = compose_spec([*base, f"seed={seeds[0]}", *([f"method={first}"] if first else [])])
    warmup = _check_numbers(ns, spec.run.outer_steps)
    factors = _budget_factors(ns.budget_factor, ns.budget_s)
    ho = _ho_contenders(entries, base, spec, seeds[0])
    none_ov = [*base, f"seed={seeds[0]}", "method=none"]
    _check(none_ov, "the baseline (method=none)")
    key, grid, default_grid, declared = _grid(ns, spec)
    for v in grid:
        _check([*none_ov, f"{key}={format_value(v)}"], f"bad --grid value {v:g} for {key}")
    searches = _searches(ns)
    space = _space(ns, spec, key, grid or default_grid, declared)
    if searches:
        for d in space:
            for end in (d.low, d.high):
                _check([*none_ov, f"{d.key}={format_value(end)}"], f"search range {d.key}={d.low:g}:{d.high:g}")
        sample = [f"{d.key}={format_value(_middle(d))}" for d in space]
        _check([*none_ov, *sample], f"a search trial ({' '.join(sample)})")
    plan = Plan(
        base=base,
        ho=ho,
        seeds=seeds,
        grid_key=key,
        grid=grid,
        searches=searches,
        space=space,
        budget_factor=max(factors) if factors else None,
        budget_factors=factors,
        budget_s=ns.budget_s,
        workers=ns.workers,
        objective=ns.objective,
        prune=not ns.no_prune,
        prune_warmup=warmup,
        max_trials=ns.max_trials,
        tpe_startup=ns.tpe_startup,
        out=Path(ns.out or f"outputs/compare/{time.strftime('%Y-%m-%d_%H-%M-%S')}"),
        plots=not ns.no_plots,
        x=ns.x,
        argv=_without_out(list(argv)),
    )
    plan.continues = _check_out(plan)
    return plan


# ----------------------------------------------------------------------------- the compare folder
def _without_out(argv: list[str]) -> list[str]:
    """``argv`` less its ``--out`` option (``--out X``, ``--out=X``, or argparse's abbreviation ``--ou``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        flag, eq, _ = a.partition("=")
        if flag in ("--ou", "--out"):
            skip = not eq
            continue
        out.append(a)
    return out


def plan_record(plan: Plan) -> dict[str, Any]:
    """What must match for a compare to continue in a folder: every option that changes a run or a
    choice (not --out, --no-plots, --x), and the command line it came from."""
    fields = {k: v for k, v in asdict(plan).items() if k not in ("out", "plots", "x", "argv", "continues")}
    return {"version": 1, "argv": plan.argv, "plan": json.loads(json.dumps(fields))}


def continue_command(argv: list[str], out: Path) -> str:
    """The command that continues the compare of ``argv`` (without --out) in ``out``."""
    return shlex.join(["hoexp", "compare", *argv, "--out", str(out)])


def _check_out(plan: Plan) -> bool:
    """The compare folder must be new, empty, or hold an earlier start of this very compare (then: True)."""
    out = plan.out
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose another")
    from hoexp.engine.rundir import LOCK_NAME

    if not any(p.name != LOCK_NAME for p in out.iterdir()):  # empty, or a start stopped before writing anything
        return False
    if not (out / ARGUMENTS).is_file():
        raise ConfigError(f"--out {out} exists and is not an empty folder (nor a hoexp compare's); choose another")
    try:
        stored = read_json(out / ARGUMENTS)
        theirs = stored["plan"]
        argv = list(stored["argv"])
    except Exception:  # noqa: BLE001 - damaged: the folder cannot be continued safely
        raise ConfigError(f"--out {out}: {out / ARGUMENTS} is damaged; choose another --out") from None
    mine = plan_record(plan)["plan"]
    if isinstance(theirs, dict) and "budget_factors" not in theirs:  # a compare from before lists of factors
        theirs["budget_factors"] = [] if theirs.get("budget_factor") is None else [theirs["budget_factor"]]
    if theirs != mine:
        shown = "; ".join(_difference(k, mine.get(k), theirs.get(k)) for k in mine if mine.get(k) != theirs.get(k))
        raise ConfigError(
            f"--out {out} holds a compare with other arguments ({shown}); continue it with: "
            f"{continue_command(argv, out)}, or choose another --out"
        )
    return True


# Plan fields → the options that set them (for the one line that refuses other arguments).
OPTIONS = {
    "base": "overrides",
    "ho": "--methods/--ho",
    "seeds": "--seeds",
    "grid_key": "--grid-key",
    "grid": "--grid",
    "searches": "--search",
    "space": "--space/--search-lr",
    "budget_factor": "--budget-factor",
    "budget_factors": "--budget-factor",
    "budget_s": "--budget-s",
    "workers": "--workers",
    "objective": "--objective",
    "prune": "--no-prune",
    "prune_warmup": "--prune-warmup",
    "max_trials": "--max-trials",
    "tpe_startup": "--tpe-startup",
}


def _difference(key: str, mine: Any, theirs: Any) -> str:
    """``--budget-s: 8.0 here, 120.0 there``; for lists, only the items one side has (``--seeds: 1 here, - there``)."""

    def show(value: Any) -> str:
        if isinstance(value, list):
            return " ".join(x if isinstance(x, str) else json.dumps(x) for x in value) or "-"
        return json.dumps(value)

    if isinstance(mine, list) and isinstance(theirs, list):
        mine, theirs = [x for x in mine if x not in theirs], [x for x in theirs if x not in mine]
    return f"{OPTIONS.get(key, key)}: {show(mine)} here, {show(theirs)} there"
