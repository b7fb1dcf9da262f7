"""One command: per-weight-decay HO methods against random search and TPE on one global weight decay,
on the reference Iris problem, at an equal wall-clock budget, ending in ``hoexp report``.

1. HO: ``experiment=iris_per_weight_decay`` (17,280 decays) with each of ``--methods``, one run each.
2. Budget B per black-box search = ``--budget-s``, or ``--budget-factor`` × the slowest HO run.
3. One ``method=none`` run at the preset's initial decay (the *fixed* baseline) measures the cost t
   of one black-box trial, which trains exactly as long as an HO run.
4. Random search and TPE (``experiment=iris_blackbox_wd``, ``hydra/sweeper=random_search|tpe``)
   with ``n_trials = clamp(floor(B / t), --min-trials, --max-trials)``: hydra-optuna-sweeper has no
   wall-time limit, so the budget is given in trials, computed from the measured trial time.
5. ``hoexp report`` over all of it (table, report.md, CSV, PNG plots), plus ``budget.json``.

Every run uses the same seed, hence the same data split and initialization. Wall times are the
runs' own (``summary.json``: ``wall_time_s``); the sum over a study's trials is its spent budget.
One HO run costs about one training run, so at ``--budget-factor 1`` the black-box searches get
only a trial or two (``--min-trials``); raise the factor to ask how many training runs' worth of
black-box search it takes to match HO.

    python scripts/compare_iris.py                                    # the reference (several minutes)
    python scripts/compare_iris.py --outer-steps 20 --inner-steps 50 --budget-factor 5   # quick
    python scripts/compare_iris.py --space wd_lr device=cpu           # 2-D search; extra overrides for all runs
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACES = {"wd": "iris_blackbox_wd", "wd_lr": "iris_blackbox_wd_lr", "wd_dropout_lr": "iris_blackbox_wd_dropout_lr"}


def hoexp(args: list[str], *, echo: bool = True) -> float:
    """Run ``python -m hoexp ...``; print hoexp's own lines; return the elapsed seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hoexp", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if echo and (line.startswith("hoexp: done") or line.startswith("hoexp: error") or "Best value" in line):
            print("   ", line.rstrip(), flush=True)
        elif not echo:
            print(line, end="", flush=True)
    if proc.wait() != 0:
        sys.stderr.write("".join(lines[-40:]))
        sys.exit(f"compare_iris: `hoexp {' '.join(args)}` failed with exit code {proc.returncode}")
    return time.perf_counter() - t0


def summaries(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("**/summary.json"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. device=cpu)")
    ap.add_argument("--methods", default="neumann,cg", help="HO methods, comma-separated (default: neumann,cg)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outer-steps", type=int, default=None, help="default: the preset's (100)")
    ap.add_argument("--inner-steps", type=int, default=None, help="default: the preset's (100)")
    ap.add_argument("--space", choices=sorted(SPACES), default="wd",
                    help="black-box search space: wd (global weight decay), wd_lr (+ inner lr), wd_dropout_lr")
    ap.add_argument("--budget-s", type=float, default=None, help="budget per black-box search in seconds")
    ap.add_argument("--budget-factor", type=float, default=1.0,
                    help="without --budget-s: the budget is this times the slowest HO run (default 1)")
    ap.add_argument("--min-trials", type=int, default=2)
    ap.add_argument("--max-trials", type=int, default=500)
    ap.add_argument("--out", default=None, help="output folder (default: outputs/compare/<date>_<time>)")
    ns = ap.parse_args()
    if ns.min_trials < 1 or ns.max_trials < ns.min_trials:
        sys.exit("compare_iris: need 1 <= --min-trials <= --max-trials")

    out = Path(ns.out or ROOT / "outputs" / "compare" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"compare_iris: {out} is not empty; choose another --out")
    common = [f"seed={ns.seed}", "progress=false", *ns.overrides]
    if ns.outer_steps is not None:
        common.append(f"outer_steps={ns.outer_steps}")
    if ns.inner_steps is not None:
        common.append(f"inner_steps={ns.inner_steps}")

    print(f"[1/5] HO, per-weight decay: method={ns.methods} → {out / 'ho'}", flush=True)
    hoexp(["run", "-m", "experiment=iris_per_weight_decay", f"method={ns.methods}", *common,
           f"hydra.sweep.dir={out / 'ho'}"])
    ho = summaries(out / "ho")
    if not ho:
        sys.exit("compare_iris: the HO runs wrote no summary.json")
    slowest = max(s["wall_time_s"] for s in ho)
    budget = ns.budget_s if ns.budget_s is not None else ns.budget_factor * slowest
    print(f"[2/5] budget per black-box search: {budget:.1f} s "
          + ("(--budget-s)" if ns.budget_s is not None else f"({ns.budget_factor:g} × the slowest HO run, {slowest:.1f} s)"),
          flush=True)

    experiment = SPACES[ns.space]
    print(f"[3/5] one black-box trial at the initial decay (the fixed baseline) → {out / 'fixed'}", flush=True)
    hoexp(["run", f"experiment={experiment}", *common, f"hydra.run.dir={out / 'fixed'}"])
    (fixed,) = summaries(out / "fixed")
    per_trial = fixed["wall_time_s"]
    n_trials = int(min(max(math.floor(budget / per_trial), ns.min_trials), ns.max_trials))
    note = "" if n_trials * per_trial <= budget * 1.0001 else f" (at least --min-trials={ns.min_trials}: over budget)"
    print(f"      one trial: {per_trial:.2f} s → n_trials={n_trials}{note}", flush=True)

    elapsed = {}
    for i, sweeper in enumerate(("random_search", "tpe")):
        print(f"[4/5] {sweeper}: {n_trials} trials of experiment={experiment} → {out / sweeper}", flush=True)
        elapsed[sweeper] = hoexp(["run", "-m", f"experiment={experiment}", f"hydra/sweeper={sweeper}",
                                  f"hydra.sweeper.n_trials={n_trials}", *common, f"hydra.sweep.dir={out / sweeper}"])

    spent = {k: sum(s["wall_time_s"] for s in summaries(out / k)) for k in ("random_search", "tpe")}
    info = {"budget_s": budget, "budget_source": "budget_s" if ns.budget_s is not None else "budget_factor",
            "budget_factor": ns.budget_factor, "slowest_ho_run_s": slowest,
            "ho_runs": {s["method"]: s["wall_time_s"] for s in ho}, "per_trial_s": per_trial, "n_trials": n_trials,
            "spent_s": spent, "process_elapsed_s": elapsed, "seed": ns.seed, "space": experiment,
            "overrides": common}
    (out / "budget.json").write_text(json.dumps(info, indent=2) + "\n")

    print(f"[5/5] hoexp report → {out / 'report'}", flush=True)
    hoexp(["report", str(out / "ho"), str(out / "fixed"), str(out / "random_search"), str(out / "tpe"),
           "--out", str(out / "report")], echo=False)
    md = out / "report" / "report.md"
    ho_text = ", ".join(f"{m} {t:.1f} s" for m, t in info["ho_runs"].items())
    md.write_text(md.read_text() + "\n## Budget\n\n"
                  f"Equal wall-clock budget per search: **{budget:.1f} s** "
                  + (f"(given)" if ns.budget_s is not None else f"({ns.budget_factor:g} × the slowest HO run)")
                  + f". HO runs: {ho_text}. One black-box trial (the `fixed` row): {per_trial:.2f} s, so "
                  f"n_trials = {n_trials}; spent: random search {spent['random_search']:.1f} s, "
                  f"TPE {spent['tpe']:.1f} s (sums of the trials' run times; with Hydra's per-trial overhead the "
                  f"sweeps took {elapsed['random_search']:.1f} s and {elapsed['tpe']:.1f} s including start-up). "
                  f"Seed {ns.seed} everywhere (one data split). Details: `../budget.json`.\n")
    print(f"compare_iris: done: {md}", flush=True)


if __name__ == "__main__":
    from hoexp.errors import run_main

    run_main(main)
