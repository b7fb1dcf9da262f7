"""``hoexp compare``: HO methods against black-box baselines at an equal wall-clock budget, one command.

For each seed (the seed sets the data split and the initialization, shared by every contender):

1. **HO**: one run per HO contender (``--methods neumann,cg``, ``--ho 'neumann:method.terms=20'``).
2. **Baseline**: ``method=none`` at the initial hyperparameters (the *fixed* row).
3. **Grid**: ``method=none`` at each value of ``--grid`` for ``--grid-key`` (default: the family's
   ``hp.<family>.init``). With ``method=none`` every hyperparameter of the family stays at that one
   value, so this is a grid over the family's global value. Each point is a row; the *grid search*
   row is the point with the lowest validation loss (``--objective``), per seed.
4. **Random search and TPE** (``--search``) over ``--space`` (default: the grid's range; ``--search-lr``
   adds the inner lr), Optuna ask/tell (:mod:`hoexp.search`) with a wall-clock budget of
   ``--budget-s`` or ``--budget-factor`` × the slowest HO run of that seed; a MedianPruner stops
   hopeless trials from the validation losses each run logs; ``--workers`` local processes.

The searches and the grid choose on validation loss only (``best``: the lowest validation loss a run
reached, i.e. with early stopping; ``final``: the one after the last step); test losses are only
reported. Every run is a normal hoexp run folder (summary.json, metrics.jsonl, TensorBoard events,
``.hydra/config.yaml``) under the compare folder; ``compare.json`` holds the raw numbers and
``report/`` the ``hoexp report`` of it all.
"""

from __future__ import annotations

import argparse
import io
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from hoexp.errors import ConfigError
from hoexp.horizon import split_overrides
from hoexp.metrics import read_json, write_json_atomic
from hoexp.search import SAMPLERS, Dim, SearchSettings, TrialContext, parse_dim, run_search

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["Plan", "parse_args", "run_compare", "pick_best", "match_time"]

# A family's default grid of its global value (--grid) and whether it is searched on a log scale are declared
# by the family's class (`grid`, `log_scale`; hoexp.hp.*), read from its factory's return annotation.
OBJECTIVES = ("best", "final")


@dataclass
class Plan:
    """A validated ``hoexp compare`` command."""

    base: list[str]  # overrides for every run (the user's, plus progress=false)
    ho: list[tuple[str, list[str]]]  # (contender name, its overrides: method=..., method options)
    seeds: list[int]
    grid_key: str | None
    grid: list[float]
    searches: list[str]  # random, tpe
    space: list[Dim]
    budget_factor: float | None
    budget_s: float | None
    workers: int = 1
    objective: str = "best"
    prune: bool = True
    prune_warmup: int = 0
    max_trials: int | None = None
    tpe_startup: int = 5
    out: Path = Path("outputs/compare")
    plots: bool = True
    argv: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ arguments
class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every hoexp error
        raise ConfigError(f"compare: {message}")


def _parser() -> argparse.ArgumentParser:
    ap = _ArgumentParser(
        prog="hoexp compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="HO methods against a fixed baseline, a grid, random search and TPE over the family's "
        "global value, at an equal wall-clock budget, over several seeds; ends with hoexp report.",
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
        "--search", default="random,tpe", help="black-box searches: random, tpe, both (default: random,tpe) or none"
    )
    ap.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=LOW:HIGH[:log]",
        help="a searched range (repeatable; default: the grid key over the grid's range)",
    )
    ap.add_argument("--search-lr", action="store_true", help="also search optim.inner.lr in [lr/10, 10 lr] (log)")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-factor",
        type=float,
        default=None,
        help="search budget = this × the wall time of the slowest HO run of the seed (default 1)",
    )
    budget.add_argument("--budget-s", type=float, default=None, help="search budget in seconds, per search and seed")
    ap.add_argument("--workers", type=int, default=1, help="local worker processes per search (default 1)")
    ap.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="best",
        help="what the grid and the searches minimize: the best (default) or the final validation loss",
    )
    ap.add_argument("--no-prune", action="store_true", help="no MedianPruner: every trial runs to the end")
    ap.add_argument(
        "--prune-warmup",
        type=int,
        default=None,
        help="outer steps before a trial can be pruned (default: a quarter of outer_steps)",
    )
    ap.add_argument("--max-trials", type=int, default=None, help="also stop a search after this many trials")
    ap.add_argument("--tpe-startup", type=int, default=5, help="random trials before TPE models (default 5)")
    ap.add_argument("--out", default=None, help="output folder (default: outputs/compare/<date>_<time>)")
    ap.add_argument("--no-plots", action="store_true", help="no PNG plots in the report")
    return ap


def _floats(text: str, what: str) -> list[float]:
    out = []
    for v in (t.strip() for t in text.split(",")):
        try:
            x = float(v)
        except ValueError:
            raise ConfigError(f"{what}: '{v}' is not a number") from None
        if not math.isfinite(x):
            raise ConfigError(f"{what}: '{v}' is not a finite number")
        out.append(x)
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
    from hoexp.build import declared_type

    component = next((h for h in spec.hp if h.key == f"hp.{family}"), None)
    return None if component is None else declared_type(component.target)


def _fmt_value(x: float) -> str:
    """A value as an override: integral ones as ints (so int keys take them too), others exactly."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def parse_args(argv: list[str]) -> Plan:
    """Parse and validate ``hoexp compare`` arguments; every error is one :class:`ConfigError`."""
    from hoexp.config.compose import compose_spec, group_options, refuse_removed

    ns = _parser().parse_intermixed_args(argv)
    refuse_removed(ns.overrides)
    for o in ns.overrides:
        if o.lstrip("+~").startswith("hydra") and not o.startswith("hydra.searchpath="):  # --config-dir: allowed
            raise ConfigError(
                f"compare: '{o}': hydra.* overrides do not apply (compare runs without Hydra's "
                "launcher); choose the folder with --out"
            )
        if o.split("=", 1)[0] in ("seed", "method"):
            raise ConfigError(f"compare: '{o}': give seeds with --seeds and HO methods with --methods / --ho")
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
    first = next((e.partition(":")[0].strip() for e in [*methods, *ns.ho] if e.strip() != "none"), None)
    spec, _ = compose_spec([*base, f"seed={seeds[0]}", *([f"method={first}"] if first else [])])

    # HO contenders
    if not methods and not ns.ho:
        methods = [spec.method.name]
    valid = [m for m in group_options("method", base) if m != "none"]
    ho: list[tuple[str, list[str]]] = []
    for entry in [*methods, *ns.ho]:
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
        _check([*base, f"seed={seeds[0]}", *ov], f"HO contender '{entry}'")
        ho.append((name, ov))
    if not ho:
        raise ConfigError("compare needs at least one HO method (--methods or --ho)")

    # grid
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
    none_ov = [*base, f"seed={seeds[0]}", "method=none"]
    if ns.grid is None:
        if not default_grid:
            raise ConfigError(f"no default grid for --grid-key {key}: give the values with --grid")
        grid = default_grid
    elif ns.grid.strip().lower() == "none":
        grid = []
    else:
        grid = _floats(ns.grid, "--grid")
        if len(set(grid)) != len(grid):
            raise ConfigError(f"--grid has repeated values: {ns.grid}")
    for v in grid:
        _check([*none_ov, f"{key}={_fmt_value(v)}"], f"bad --grid value {v:g} for {key}")

    # searches
    searches = [s.strip() for s in ns.search.split(",") if s.strip()]
    if searches == ["none"]:
        searches = []
    elif searches == ["both"]:
        searches = list(SAMPLERS)
    for s in searches:
        if s not in SAMPLERS:
            raise ConfigError(f"unknown search '{s}'; choose from: {', '.join(SAMPLERS)}, both (or none)")
    space = [parse_dim(t) for t in ns.space]
    if not space:
        values = grid or default_grid
        if len(values) < 2:
            raise ConfigError(f"give the search range with --space {key}=LOW:HIGH[:log]")
        space = [Dim(key, min(values), max(values), bool(getattr(declared, "log_scale", False)) or key.endswith(".lr"))]
    if ns.search_lr:
        lr = float(spec.inner_optim.lr)
        space.append(Dim("optim.inner.lr", lr / 10, lr * 10, True))
    if len({d.key for d in space}) != len(space):
        raise ConfigError("--space names a key twice")
    if searches:
        for d in space:
            for end in (d.low, d.high):
                _check([*none_ov, f"{d.key}={_fmt_value(end)}"], f"search range {d.key}={d.low:g}:{d.high:g}")

    # budget and the rest
    if ns.budget_s is not None and not (math.isfinite(ns.budget_s) and ns.budget_s > 0):
        raise ConfigError(f"--budget-s must be > 0, got {ns.budget_s:g}")
    if ns.budget_factor is not None and not (math.isfinite(ns.budget_factor) and ns.budget_factor > 0):
        raise ConfigError(f"--budget-factor must be > 0, got {ns.budget_factor:g}")
    factor = None if ns.budget_s is not None else (1.0 if ns.budget_factor is None else ns.budget_factor)
    if ns.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {ns.workers}")
    if ns.max_trials is not None and ns.max_trials < 1:
        raise ConfigError(f"--max-trials must be >= 1, got {ns.max_trials}")
    warmup = spec.run.outer_steps // 4 if ns.prune_warmup is None else ns.prune_warmup
    if warmup < 0:
        raise ConfigError(f"--prune-warmup must be >= 0, got {warmup}")
    if ns.tpe_startup < 0:
        raise ConfigError(f"--tpe-startup must be >= 0, got {ns.tpe_startup}")
    out = Path(ns.out or f"outputs/compare/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose another")
    return Plan(
        base=base,
        ho=ho,
        seeds=seeds,
        grid_key=key,
        grid=grid,
        searches=searches,
        space=space,
        budget_factor=factor,
        budget_s=ns.budget_s,
        workers=ns.workers,
        objective=ns.objective,
        prune=not ns.no_prune,
        prune_warmup=warmup,
        max_trials=ns.max_trials,
        tpe_startup=ns.tpe_startup,
        out=out,
        plots=not ns.no_plots,
        argv=list(argv),
    )


# ----------------------------------------------------------------------------------------- runs
class Composer:
    """Compose a config once (Hydra), then derive runs from it by setting plain keys (seed, the grid
    or searched values): Hydra's compose costs ~0.5 s, which would count against a search's budget.
    Picklable (composes lazily in each worker process)."""

    def __init__(self, overrides: list[str]):
        self.overrides = list(overrides)
        self._cfg: DictConfig | None = None

    def __getstate__(self):
        return {"overrides": self.overrides, "_cfg": None}

    def spec(self, updates: dict[str, str]):
        """``(spec, config_text, overrides)`` with ``updates`` ({key: value as text}) applied."""
        import copy

        import yaml
        from omegaconf import OmegaConf

        from hoexp.build import preflight
        from hoexp.config import validate
        from hoexp.config.compose import compose as _compose

        if self._cfg is None:
            self._cfg = _compose(self.overrides)
        cfg = copy.deepcopy(self._cfg)
        for k, v in updates.items():
            OmegaConf.update(cfg, k, yaml.safe_load(v), merge=False)
        spec = validate(cfg)
        preflight(spec)
        return spec, OmegaConf.to_yaml(cfg), [*self.overrides, *(f"{k}={v}" for k, v in updates.items())]


def _write_run_files(folder: Path, spec, overrides: list[str], trial: dict[str, Any] | None = None) -> None:
    """What ``hoexp report`` reads besides summary.json: ``.hydra/config.yaml`` (the composed config,
    resolved) and ``.hydra/overrides.yaml``; ``trial.json`` for the trials of a grid or a search."""
    import yaml

    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if trial is not None:
        write_json_atomic(folder / "trial.json", trial)


def run_one(
    composer: Composer, updates: dict[str, str], folder: Path, *, loggers=(), trial: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One hoexp run (in this process) into ``folder``; returns its summary (also when it diverged)."""
    from hoexp.runner import Diverged, run_experiment

    spec, text, overrides = composer.spec(updates)
    _write_run_files(folder, spec, overrides, trial)
    try:
        return run_experiment(
            spec, folder, config_text=text, console=Console(file=io.StringIO()), loggers=list(loggers)
        )
    except Diverged:
        return read_json(folder / "summary.json")


class PruneLogger:
    """A metric logger that reports each evaluation's validation loss to the search's pruner (the
    running minimum for ``objective='best'``); the runner stops the run when the pruner says so."""

    def __init__(self, ctx: TrialContext, objective: str):
        self.ctx, self.objective, self.best = ctx, objective, math.inf

    def log_scalars(self, step: int, values) -> None:
        v = values.get("loss/val")
        if step == 0 or v is None:  # step 0: before training, the same for every trial
            return
        v = float(v)
        self.best = min(self.best, v) if math.isfinite(v) else self.best
        self.ctx.report(step, self.best if self.objective == "best" else v)

    def log_histograms(self, step, values) -> None: ...
    def log_text(self, tag, text) -> None: ...
    def log_hparams(self, hparams, metrics) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def objective_value(summary: dict[str, Any], objective: str) -> float:
    """The validation loss a search minimizes (``best`` or ``final`` block); +inf if not finite."""
    v = (summary.get(objective) or {}).get("val_loss")
    if v is None:
        return math.inf
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.inf
    return v if math.isfinite(v) else math.inf


@dataclass
class RunTrial:
    """The search objective: one ``method=none`` hoexp run at the trial's values (picklable)."""

    composer: Composer
    seed: int
    folder: str
    objective: str

    def prepare(self) -> None:
        """Before the budget's clock starts (in each worker): compose the config and make one
        throwaway one-step run outside the study, so the first trial pays no one-time costs."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="hoexp-compare-warmup-") as tmp:
            run_one(self.composer, {"seed": str(self.seed), "outer_steps": "1", "checkpoint_every": "0"}, Path(tmp))

    def __call__(self, ctx: TrialContext) -> float:
        params = {k: _fmt_value(v) for k, v in ctx.params.items()}
        run_dir = Path(self.folder) / f"trial_{ctx.number:03d}"
        ctx.attrs["run_dir"] = str(run_dir)
        try:
            summary = run_one(
                self.composer,
                {"seed": str(self.seed), **params},
                run_dir,
                loggers=[PruneLogger(ctx, self.objective)],
                trial={"number": ctx.number, "params": params},
            )
        finally:
            if (run_dir / "summary.json").is_file():
                s = read_json(run_dir / "summary.json")
                ctx.attrs.update(wall_time_s=s.get("wall_time_s"), status=s.get("status"))
        return objective_value(summary, self.objective)


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


def _numbers(summary: dict[str, Any], path: Path) -> dict[str, Any]:
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


def _summarize(runs: list[dict[str, Any]], budget_key: str = "wall_time_s") -> dict[str, Any]:
    """Mean and std over seeds of a contender's numbers (``[mean, std]``; std None for one seed)."""
    out: dict[str, Any] = {
        f"{b}_{k}": _mean_std([(r.get(b) or {}).get(k) for r in runs])
        for b in ("final", "best")
        for k in ("val_loss", "test_loss")
    }
    out["wall_time_s"] = _mean_std([r.get("wall_time_s") for r in runs])
    out["budget_spent_s"] = _mean_std([r.get(budget_key) for r in runs])
    out["seeds"] = len(runs)
    return out


# ------------------------------------------------------------------------------------ the command
class _Compare:
    """The state of one ``hoexp compare`` while it runs."""

    def __init__(self, plan: Plan, console: Console):
        self.plan, self.console, self.obj = plan, console, plan.objective
        self.out = plan.out.resolve()
        self.ho_composers = {name: Composer([*plan.base, *ov]) for name, ov in plan.ho}
        self.none = Composer([*plan.base, "method=none"])
        self.ho: dict[str, list[dict]] = {name: [] for name, _ in plan.ho}
        self.baseline: list[dict] = []
        self.grid_points: dict[float, list[dict]] = {v: [] for v in plan.grid}
        self.grid_best: list[dict] = []
        self.studies: dict[str, list[dict]] = {s: [] for s in plan.searches}
        self.budgets: dict[int, float] = {}

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def line(self, seed: int, what: str, s: dict[str, Any]) -> None:
        f, b = s.get("final") or {}, s.get("best") or {}
        self.say(
            f"  seed {seed}  {what:<34} val {f.get('val_loss', math.nan):.4f} (best "
            f"{b.get('val_loss', math.nan):.4f})  test {f.get('test_loss', math.nan):.4f}  "
            f"{s.get('wall_time_s', math.nan):6.1f} s  {s.get('status')}"
        )

    def warm_up(self) -> None:
        """One short throwaway run per HO contender and of method=none, outside the compare folder,
        so that one-time costs (first autograd passes, allocations) do not inflate the first measured
        HO run, which sets the search budget."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="hoexp-compare-warmup-") as tmp:
            for i, c in enumerate([*self.ho_composers.values(), self.none]):
                run_one(
                    c,
                    {"seed": str(self.plan.seeds[0]), "outer_steps": "1", "checkpoint_every": "0"},
                    Path(tmp) / str(i),
                )

    def seed(self, seed: int) -> None:
        plan = self.plan
        for name, _ in plan.ho:
            folder = self.out / "ho" / name / f"seed{seed}"
            s = run_one(self.ho_composers[name], {"seed": str(seed)}, folder)
            self.ho[name].append(_numbers(s, folder))
            self.line(seed, f"HO {name}", s)
        folder = self.out / "baseline" / f"seed{seed}"
        s = run_one(self.none, {"seed": str(seed)}, folder)
        self.baseline.append(_numbers(s, folder))
        self.line(seed, "baseline (method=none)", s)
        if plan.grid:
            self.grid(seed)
        if plan.searches:
            slowest = max(runs[-1]["wall_time_s"] for runs in self.ho.values())
            budget = plan.budget_s if plan.budget_s is not None else plan.budget_factor * slowest
            self.budgets[seed] = budget
            note = "" if plan.budget_s is not None else f" ({plan.budget_factor:g} × {slowest:.1f} s)"
            for sampler in plan.searches:
                self.search(seed, sampler, budget, note)

    def grid(self, seed: int) -> None:
        plan, key = self.plan, self.plan.grid_key
        assert key is not None  # a grid comes with its key (parse_args sets one)
        gdir = self.out / "grid" / f"seed{seed}"
        gdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            gdir / "study.json",
            {
                "kind": "grid",
                "label": "grid search",
                "objective": self.obj,
                "seed": seed,
                "space": {key: "grid " + ", ".join(f"{v:g}" for v in plan.grid)},
            },
        )
        runs = []
        for i, v in enumerate(plan.grid):
            folder, value = gdir / f"point{i}", _fmt_value(v)
            s = run_one(self.none, {"seed": str(seed), key: value}, folder, trial={"number": i, "params": {key: value}})
            write_json_atomic(
                folder / "trial.json",
                {
                    "number": i,
                    "params": {key: value},
                    "value": objective_value(s, self.obj),
                    "state": "COMPLETE" if s.get("status") == "completed" else "FAIL",
                },
            )
            n = {**_numbers(s, folder), "value": v}
            self.grid_points[v].append(n)
            runs.append((s, n))
            self.line(seed, f"grid {key}={v:g}", s)
        chosen = pick_best([s for s, _ in runs], self.obj)
        if chosen is not None:
            n = next(n for s, n in runs if s is chosen)
            self.grid_best.append({**n, "grid_time_s": sum(float(x["wall_time_s"] or 0) for _, x in runs)})
            self.say(
                f"  seed {seed}  grid: best {key}={n['value']:g} (lowest {self.obj} validation loss, "
                f"{objective_value(chosen, self.obj):.4f})"
            )

    def search(self, seed: int, sampler: str, budget: float, note: str) -> None:
        plan = self.plan
        sdir = self.out / sampler / f"seed{seed}"
        settings = SearchSettings(
            sampler=sampler,
            space=plan.space,
            budget_s=budget,
            seed=seed,
            workers=plan.workers,
            prune=plan.prune,
            prune_warmup=plan.prune_warmup,
            max_trials=plan.max_trials,
            tpe_startup=plan.tpe_startup,
        )
        info = {
            "kind": "search",
            "label": SAMPLERS[sampler],
            "sampler": sampler,
            "objective": self.obj,
            "seed": seed,
            "budget_s": budget,
            "workers": plan.workers,
            "prune": plan.prune,
            "space": {d.key: d.describe() for d in plan.space},
        }
        sdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(sdir / "study.json", info)
        self.say(f"  seed {seed}  {SAMPLERS[sampler]}: budget {budget:.1f} s{note}, {plan.workers} worker(s) → {sdir}")
        result = run_search(
            settings, RunTrial(self.none, seed, str(sdir), self.obj), sdir, name=f"{sampler}_seed{seed}"
        )
        trials: list[dict[str, Any]] = []
        for t in result.trials:
            rec: dict[str, Any] = {
                "number": t.number,
                "params": t.params,
                "state": t.state,
                "value": t.value,
                "start_s": t.start_s,
                "end_s": t.end_s,
                "duration_s": t.duration_s,
                "worker": t.worker,
                "wall_time_s": t.attrs.get("wall_time_s"),
                "status": t.attrs.get("status"),
                "path": t.attrs.get("run_dir"),
            }
            trials.append(rec)
            if rec["path"] and Path(rec["path"]).is_dir():  # the outcome, next to the run
                write_json_atomic(
                    Path(rec["path"]) / "trial.json",
                    {
                        "number": t.number,
                        "params": {k: _fmt_value(v) for k, v in t.params.items()},
                        "state": t.state,
                        "value": t.value,
                    },
                )
        best = result.best
        trial_time = sum(float(t["wall_time_s"] or 0) for t in trials)
        states = [t.state for t in result.trials]
        write_json_atomic(
            sdir / "study.json",
            {
                **info,
                "wall_clock_s": result.wall_clock_s,
                "trial_time_s": trial_time,
                "n_trials": len(trials),
                "best_trial": None if best is None else best.number,
            },
        )
        best_run = None if best is None else Path(best.attrs["run_dir"])
        self.studies[sampler].append(
            {
                "seed": seed,
                "folder": str(sdir),
                "budget_s": budget,
                "wall_clock_s": result.wall_clock_s,
                "trial_time_s": trial_time,
                "n_trials": len(trials),
                "states": {s: states.count(s) for s in sorted(set(states))},
                "best_trial": None if best is None else best.number,
                "best_params": None if best is None else best.params,
                "best": None if best_run is None else _numbers(read_json(best_run / "summary.json"), best_run),
                "trials": trials,
            }
        )
        self.say(
            f"  seed {seed}  {SAMPLERS[sampler]}: {len(trials)} trials ("
            + ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
            + f") in {result.wall_clock_s:.1f} s"
            + (
                ""
                if best is None
                else f"; best #{best.number} "
                + " ".join(f"{k}={v:.3g}" for k, v in best.params.items())
                + f", val {best.value:.4f}"
            )
        )

    def to_json(self, elapsed: float) -> dict[str, Any]:
        plan, obj = self.plan, self.obj
        contenders: list[dict[str, Any]] = []
        for name, ov in plan.ho:
            contenders.append(
                {
                    "name": name,
                    "kind": "ho",
                    "overrides": ov,
                    "runs": self.ho[name],
                    "summary": _summarize(self.ho[name]),
                }
            )
        contenders.append(
            {
                "name": "baseline",
                "kind": "baseline",
                "overrides": ["method=none"],
                "runs": self.baseline,
                "summary": _summarize(self.baseline),
            }
        )
        for v, runs in self.grid_points.items():
            contenders.append(
                {
                    "name": f"grid {plan.grid_key}={v:g}",
                    "kind": "grid_point",
                    "value": v,
                    "overrides": ["method=none", f"{plan.grid_key}={_fmt_value(v)}"],
                    "runs": runs,
                    "summary": _summarize(runs),
                }
            )
        if plan.grid:
            contenders.append(
                {
                    "name": "grid (best on val)",
                    "kind": "grid_best",
                    "runs": self.grid_best,
                    "summary": _summarize(self.grid_best, "grid_time_s"),
                }
            )
        for sampler, st in self.studies.items():
            best_runs = [{**s["best"], "budget_spent_s": s["wall_clock_s"]} for s in st if s["best"] is not None]
            contenders.append(
                {
                    "name": SAMPLERS[sampler],
                    "kind": "search",
                    "sampler": sampler,
                    "studies": st,
                    "summary": _summarize(best_runs, "budget_spent_s"),
                }
            )
        # how long each search took to reach each HO contender's validation loss, in fixed runs' worth
        match = []
        fixed = {r["seed"]: float(r["wall_time_s"] or 0) for r in self.baseline}
        for sampler, st in self.studies.items():
            for s in st:
                for name, _ in plan.ho:
                    run = next(r for r in self.ho[name] if r["seed"] == s["seed"])
                    target = objective_value(run, obj)
                    match.append(
                        {
                            "search": SAMPLERS[sampler],
                            "ho": name,
                            "seed": s["seed"],
                            "target": target,
                            "budget_s": s["budget_s"],
                            "fixed_run_s": fixed.get(s["seed"]),
                            **match_time(s["trials"], target, fixed.get(s["seed"], 0.0)),
                        }
                    )
        return {
            "version": 1,
            "argv": plan.argv,
            "overrides": plan.base,
            "seeds": plan.seeds,
            "objective": obj,
            "grid": {"key": plan.grid_key, "values": plan.grid},
            "space": [{"key": d.key, "low": d.low, "high": d.high, "log": d.log} for d in plan.space],
            "budget": {
                "factor": plan.budget_factor,
                "seconds": plan.budget_s,
                "per_seed": {str(k): v for k, v in self.budgets.items()},
                "rule": (
                    "--budget-s"
                    if plan.budget_s is not None
                    else f"{plan.budget_factor:g} × the wall time of the slowest HO run of the seed"
                ),
            },
            "workers": plan.workers,
            "prune": plan.prune,
            "prune_warmup": plan.prune_warmup,
            "elapsed_s": elapsed,
            "contenders": contenders,
            "match": match,
        }


def run_compare(plan: Plan, console: Console | None = None) -> dict[str, Any]:
    """Run every contender on every seed into ``plan.out``, write compare.json and the report."""
    from hoexp.report import build_report

    c = _Compare(plan, console or Console())
    started = time.time()
    c.out.mkdir(parents=True, exist_ok=True)
    c.say(
        f"hoexp compare → {c.out}: {len(plan.ho)} HO contender(s), baseline, {len(plan.grid)} grid point(s) of "
        f"{plan.grid_key}, search(es): {', '.join(plan.searches) or 'none'}; seeds {plan.seeds}; objective: "
        f"{plan.objective} validation loss"
    )
    c.warm_up()
    for seed in plan.seeds:
        c.seed(seed)
    data = c.to_json(time.time() - started)
    write_json_atomic(c.out / "compare.json", data)
    c.say(f"hoexp compare: wrote {c.out / 'compare.json'}; the report:")
    build_report([c.out], c.out / "report", console=c.console, plots=plan.plots)
    return data
