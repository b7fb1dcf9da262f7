"""Running ``hoexp compare``: every contender on every seed into the compare folder, then the report.

For each seed: the HO runs, the baseline, the grid points, then each search (its budget set by the
HO runs' wall time). Every run is a normal hoexp run folder under the compare folder. The command is
continued by running it again with the same ``--out``: a run whose ``summary.json`` says it finished is
kept, a stopped one continues from its checkpoint (``resume=auto`` in its folder), a search continues
its Optuna study (:mod:`hoexp.tools.search`), and what never started runs. A signal (Ctrl-C, SIGTERM) or a
failed run ends the command with one line that gives that command.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from hoexp.engine.metrics import read_json, write_json_atomic
from hoexp.errors import ConfigError, HoexpError
from hoexp.tools.compare.args import ARGUMENTS, Plan, continue_command, plan_record
from hoexp.tools.compare.output import Results, compare_json, numbers, pick_best
from hoexp.tools.compare.trial import Composer, RunTrial, finished, format_value, objective_value, run_one
from hoexp.tools.search import SAMPLERS, SEARCHERS, SearchResult, SearchSettings, SearchStopped, read_search
from hoexp.tools.search_workers import run_search

__all__ = ["run_compare"]


class _Compare:
    """The state of one ``hoexp compare`` while it runs."""

    def __init__(self, plan: Plan, console: Console):
        self.plan, self.console, self.obj = plan, console, plan.objective
        self.out = plan.out.resolve()
        self.ho_composers = {name: Composer([*plan.base, *ov]) for name, ov in plan.ho}
        self.none = Composer([*plan.base, "method=none"])
        self.results = Results.empty(plan)
        self.where: Path = self.out  # the folder being worked on (named when the command stops)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def line(self, seed: int, what: str, s: dict[str, Any], note: str = "") -> None:
        f, b = s.get("final") or {}, s.get("best") or {}
        self.say(
            f"  seed {seed}  {what:<34} val {f.get('val_loss', math.nan):.4f} (best "
            f"{b.get('val_loss', math.nan):.4f})  test {f.get('test_loss', math.nan):.4f}  "
            f"{s.get('wall_time_s', math.nan):6.1f} s  {s.get('status')}{note}"
        )

    def fixed_folders(self) -> list[Path]:
        """The HO and baseline runs' folders (their wall times set the searches' budgets)."""
        return [
            self.out / part / f"seed{seed}"
            for seed in self.plan.seeds
            for part in [*(f"ho/{name}" for name, _ in self.plan.ho), "baseline"]
        ]

    def warm_up(self) -> None:
        """One short throwaway run per HO contender and of method=none, outside the compare folder,
        so that one-time costs (first autograd passes, allocations) do not inflate the first measured
        HO run, which sets the search budget. Skipped when every HO and baseline run has finished."""
        import tempfile

        if all(finished(f) is not None for f in self.fixed_folders()):
            return
        one_step = {"seed": str(self.plan.seeds[0]), "outer_steps": "1", "checkpoint_every": "0"}
        with tempfile.TemporaryDirectory(prefix="hoexp-compare-warmup-") as tmp:
            for i, c in enumerate([*self.ho_composers.values(), self.none]):
                run_one(c, one_step, Path(tmp) / str(i))

    def run(
        self, composer: Composer, updates: dict[str, str], folder: Path, what: str, seed: int, **kw: Any
    ) -> dict[str, Any]:
        """The summary of the run in ``folder``: kept if it finished, else run (continued from its checkpoint)."""
        s = finished(folder)
        if s is not None:
            self.line(seed, what, s, " (kept)")
            return s
        self.where = folder
        resumed = (folder / "checkpoint.pt").is_file()
        s = run_one(composer, updates, folder, **kw)
        self.line(seed, what, s, " (resumed from its checkpoint)" if resumed else "")
        return s

    def seed(self, seed: int) -> None:
        plan, r = self.plan, self.results
        for name, _ in plan.ho:
            folder = self.out / "ho" / name / f"seed{seed}"
            s = self.run(self.ho_composers[name], {"seed": str(seed)}, folder, f"HO {name}", seed)
            r.ho[name].append(numbers(s, folder))
        folder = self.out / "baseline" / f"seed{seed}"
        s = self.run(self.none, {"seed": str(seed)}, folder, "baseline (method=none)", seed)
        r.baseline.append(numbers(s, folder))
        if plan.grid:
            self.grid(seed)
        if plan.searches:
            slowest = max(runs[-1]["wall_time_s"] for runs in r.ho.values())
            budget = plan.budget_s if plan.budget_s is not None else plan.budget_factor * slowest
            r.budgets[seed], r.units[seed] = budget, slowest
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
            folder, value = gdir / f"point{i}", format_value(v)
            trial = {"number": i, "params": {key: value}}
            s = self.run(self.none, {"seed": str(seed), key: value}, folder, f"grid {key}={v:g}", seed, trial=trial)
            state = "COMPLETE" if s.get("status") == "completed" else "FAIL"
            write_json_atomic(folder / "trial.json", {**trial, "value": objective_value(s, self.obj), "state": state})
            n = {**numbers(s, folder), "value": v}
            self.results.grid_points[v].append(n)
            runs.append((s, n))
        chosen = pick_best([s for s, _ in runs], self.obj)
        if chosen is not None:
            n = next(n for s, n in runs if s is chosen)
            self.results.grid_best.append({**n, "grid_time_s": sum(float(x["wall_time_s"] or 0) for _, x in runs)})
            self.say(
                f"  seed {seed}  grid: best {key}={n['value']:g} (lowest {self.obj} validation loss, "
                f"{objective_value(chosen, self.obj):.4f})"
            )

    def search(self, seed: int, sampler: str, budget: float, note: str) -> None:
        """One search of one seed: run (or continue) it, unless an earlier start finished it (then read it)."""
        plan = self.plan
        sdir = self.out / sampler / f"seed{seed}"
        run = self.none.spec({"seed": str(seed)})[0].run  # the steps a trial reports: Hyperband's resource
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
            min_resource=min(run.eval_every, max(run.outer_steps, 1)),
            max_resource=max(run.outer_steps, 1),
        )
        info = {
            "kind": "search",
            "label": SAMPLERS[sampler],
            "sampler": sampler,
            "objective": self.obj,
            "seed": seed,
            "budget_s": budget,
            "workers": plan.workers,
            "prune": plan.prune or SEARCHERS[sampler].multi_fidelity,
            "pruner": _pruner_text(settings),
            "space": {d.key: d.describe() for d in plan.space},
        }
        name = f"{sampler}_seed{seed}"
        if _finished_study(sdir):
            result = read_search(settings, sdir, name)
            self.say(f"  seed {seed}  {SAMPLERS[sampler]}: finished earlier (kept) → {sdir}")
        else:
            sdir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(sdir / "study.json", info)
            again = " (continued)" if (sdir / "journal.log").is_file() else ""
            self.say(
                f"  seed {seed}  {SAMPLERS[sampler]}{again}: budget {budget:.1f} s{note}, "
                f"{plan.workers} worker(s) → {sdir}"
            )
            self.where = sdir
            result = run_search(settings, RunTrial(self.none, seed, str(sdir), self.obj), sdir, name=name)
        self.record_search(seed, sampler, sdir, info, result)

    def record_search(self, seed: int, sampler: str, sdir: Path, info: dict, result: SearchResult) -> None:
        """Each trial's outcome next to its run (``trial.json``), ``study.json``, and the study's numbers."""
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
                **_losses(t.attrs.get("run_dir") if t.state == "COMPLETE" else None),
            }
            trials.append(rec)
            if rec["path"] and Path(rec["path"]).is_dir():  # the outcome, next to the run
                params = {k: format_value(v) for k, v in t.params.items()}
                write_json_atomic(
                    Path(rec["path"]) / "trial.json",
                    {"number": t.number, "params": params, "state": t.state, "value": t.value},
                )
        best = result.best
        trial_time = sum(float(t["wall_time_s"] or 0) for t in trials)
        states = [t.state for t in result.trials]
        counts = {"wall_clock_s": result.wall_clock_s, "trial_time_s": trial_time, "n_trials": len(trials)}
        write_json_atomic(sdir / "study.json", {**info, **counts, "best_trial": None if best is None else best.number})
        best_run = None if best is None else Path(best.attrs["run_dir"])
        self.results.studies[sampler].append(
            {
                "seed": seed,
                "folder": str(sdir),
                "budget_s": info["budget_s"],
                **counts,
                "states": {s: states.count(s) for s in sorted(set(states))},
                "best_trial": None if best is None else best.number,
                "best_params": None if best is None else best.params,
                "best": None if best_run is None else numbers(read_json(best_run / "summary.json"), best_run),
                "trials": trials,
            }
        )
        tally = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
        found = ""
        if best is not None:
            found = f"; best #{best.number} {' '.join(f'{k}={v:.3g}' for k, v in best.params.items())}, val {best.value:.4f}"
        self.say(
            f"  seed {seed}  {SAMPLERS[sampler]}: {len(trials)} trials ({tally}) in {result.wall_clock_s:.1f} s{found}"
        )

    def stopped(self, code: int) -> HoexpError:
        """The one line for a compare a signal stopped: where, and the command that continues it (exit ``code``:
        128 + the signal's number). Raised after the stop was handled, so an ordinary error, not a ``Stopped``."""
        name = signal.Signals(code - 128).name if 128 < code < 128 + 65 else "a signal"
        error = HoexpError(
            f"compare stopped by {name} in {self.where}; finished runs are kept, stopped ones continue from "
            f"their checkpoints: continue with: {continue_command(self.plan.argv, self.out)}"
        )
        error.exit_code = code
        return error

    def failed(self, e: HoexpError) -> HoexpError:
        """A run's error, its advice (for ``hoexp run``: ``hydra.run.dir=...``) replaced by compare's own."""
        kept = [c for c in str(e).split("; ") if "hydra.run.dir" not in c and "resume=" not in c]
        error = HoexpError(
            f"compare stopped in {self.where}: {'; '.join(kept)}; fix that, then continue with: "
            f"{continue_command(self.plan.argv, self.out)}"
        )
        error.exit_code = e.exit_code
        return error


def _pruner_text(s: SearchSettings) -> str:
    """How a search stops trials early, in words (study.json, the report)."""
    if SEARCHERS[s.sampler].multi_fidelity:
        return (
            f"Hyperband: steps {s.min_resource}..{s.max_resource}, reduction factor {s.reduction_factor}, "
            "over the validation losses each trial logs"
        )
    if not s.prune:
        return "none"
    return f"MedianPruner: after {s.prune_startup} finished trials, from step {s.prune_warmup}"


def _losses(run_dir: str | None) -> dict[str, Any]:
    """A finished trial's final and best validation and test losses (for the per-budget table)."""
    if run_dir is None:
        return {}
    try:
        n = numbers(read_json(Path(run_dir) / "summary.json"), Path(run_dir))
    except (OSError, ValueError):
        return {}
    return {b: {k: n[b][k] for k in ("val_loss", "test_loss")} for b in ("final", "best")}


def _finished_study(sdir: Path) -> bool:
    """An earlier start finished this search (its ``study.json`` has the final counts)."""
    try:
        return "n_trials" in read_json(sdir / "study.json")
    except Exception:  # missing or damaged: the search is continued from its journal
        return False


def _lock(out: Path):
    """One compare at a time in a folder (a second one is refused in one line)."""
    from hoexp.engine import rundir

    lock = rundir.RunLock(out)
    try:
        lock.__enter__()
    except HoexpError:
        raise ConfigError(
            f"--out {out} is in use by another hoexp compare; wait for it to end, or choose another --out"
        ) from None
    return lock


def run_compare(plan: Plan, console: Console | None = None) -> dict[str, Any]:
    """Run every contender on every seed into ``plan.out`` (continuing an earlier start of the same
    compare there), write compare.json and the report."""
    from hoexp.config.run import Preempted, preemption_signals
    from hoexp.tools.outdir import make_out_dir
    from hoexp.tools.report import build_report

    c = _Compare(plan, console or Console())
    make_out_dir(c.out)
    lock = _lock(c.out)
    try:
        started = time.time()
        write_json_atomic(c.out / ARGUMENTS, plan_record(plan))
        c.say(
            f"hoexp compare → {c.out}{' (continued: finished runs are kept)' if plan.continues else ''}: "
            f"{len(plan.ho)} HO contender(s), baseline, {len(plan.grid)} grid point(s) of {plan.grid_key}, "
            f"search(es): {', '.join(plan.searches) or 'none'}; seeds {plan.seeds}; objective: "
            f"{plan.objective} validation loss"
        )
        try:
            with preemption_signals():
                c.warm_up()
                for seed in plan.seeds:
                    c.seed(seed)
        except (Preempted, SearchStopped) as e:
            raise c.stopped(e.exit_code) from None
        except KeyboardInterrupt:
            raise c.stopped(128 + signal.SIGINT) from None
        except HoexpError as e:
            raise c.failed(e) from None
        data = compare_json(plan, c.results, time.time() - started)
        write_json_atomic(c.out / "compare.json", data)
        c.say(f"hoexp compare: wrote {c.out / 'compare.json'}; the report:")
        build_report([c.out], c.out / "report", console=c.console, plots=plan.plots, x=plan.x)
    finally:
        lock.__exit__()
    return data
