"""Data hyper-cleaning against benchopt's bilevel benchmark: its own solver code and hoexp on the same arrays.

    python scripts/bench_bilevel.py --setup                       # once: the JAX/benchopt venv and the checkout
    python scripts/bench_bilevel.py --seeds 32,33,34 --ratio 0.7 --budget 60

Run it with hoexp's Python (it builds the data with hoexp and starts ``python -m hoexp``). The other side runs in
a separate virtual environment (``--venv``, default ``~/.cache/hoexp/bench-venv``: ``jax[cpu] benchopt
scikit-learn matplotlib``; never hoexp's requirements) on a checkout of ``benchopt/benchmark_bilevel``
(``--benchmark``, cloned from ``--benchmark-url`` by ``--setup``; its commit is recorded).

**Data.** One ``.npz`` per data seed, written once by hoexp's ``dataset=mnist_cleaning`` builder (the benchmark's
``datasets/mnist.py`` rule: ``train_test_split`` with ``RandomState(seed)``, each training label redrawn with
probability ``ratio``, StandardScaler; 3,500 / 1,500 / 10,000 on the shared 5,000-image MNIST), float64, with
``noisy_train``, then checked in the venv against that rule run with scikit-learn on the raw files (``runs.json``:
``data_checks``). Both sides read these same arrays (float32 on both: JAX's default, hoexp's ``dtype``).

**benchopt side** (``--worker``, inside the venv): the benchmark's ``Objective`` (``objective.py``: w = 0,
λ = −2) and ``Solver`` classes (``solvers/saba.py``, ``soba.py``, ``amigo.py``) with the parameters of its
``config/datacleaning0_7_best_params.yml``; ``f_inner`` / ``f_outer`` are the jitted closures of
``datasets/mnist.py``'s ``get_data`` (its ``loss`` / ``weighted_loss`` imported, ``reg = 0.2``) over the npz's
arrays, since ``get_data`` itself hard-codes the full MNIST's 20,000 / 5,000 split. ``set_objective`` jit-compiles
(its warm-up, as under benchopt's runner, untimed); then ``solver.run(callback)`` is the solver's own loop, which
calls ``callback()`` every ``eval_freq`` (512) iterations. The clock runs from just before ``run`` (so ``init``
counts) and stops in each callback after ``jax.block_until_ready`` on the iterates; test/validation error, validation
loss and the F1 of flagging ``σ(λ_i) < ½`` are computed with the clock stopped; it restarts when the callback
returns, and the callback ends the run once the solver time passes the budget. This is benchopt's own
``strategy='callback'`` timing, without its runner.

**hoexp side**: ``python -m hoexp run`` on ``dataset=arrays`` with one thread, ``progress=false``. Its solver time
is the run's ``time/solver_s`` (the cumulative sum of ``time/outer_step_s``) in ``metrics.jsonl`` (training steps, hypergradient, outer update;
evaluation and logging excluded; the run's start-up excluded), read at each evaluation. The script watches the
file and sends the run SIGINT once that sum passes the budget (hoexp then saves and exits non-zero with "stopped
by SIGINT": expected here). ``hoexp-cg`` is ``experiment=mnist_hyper_cleaning method=cg`` (warm-started CG
in its double loop; figures measured before 2026-12-07 ran it with Adam on λ at lr 1: ``optim/outer=adam
optim.outer.lr=1``);
``hoexp-saba`` is ``method=saba`` with the benchmark's SABA steps (ρ = 0.01, γ = ρ / 1e-4 = 100, minibatches of
64, one joint step per outer step); ``hoexp-saba-compiled`` the same with ``method.compile=true`` (its minibatch
derivatives in one ``torch.compile``'d graph; the compile warm-up, cold: each run gets an empty inductor cache, is
logged as ``time/compile_s`` and not counted, as benchopt's jit warm-up is not); ``hoexp-amigo`` likewise with
AmIGO's.

**Fairness.** Runs go one at a time, cycling through the solvers within each seed (benchopt and hoexp alternate),
each with one thread (``OMP_NUM_THREADS=MKL_NUM_THREADS=1``, ``XLA_FLAGS`` single-threaded Eigen, hoexp
``threads=1``); the 1-minute load average is recorded at each run's start and end.

Writes ``--out``: ``data/seed<S>.npz``, ``runs/`` (hoexp run folders, worker logs), ``curves.csv`` (one row per
evaluation: seed, solver, solver_s, test_error, val_error, val_loss, f1), ``runs.json`` (settings, load, commands),
``summary.md`` (the table) and ``curves.png``. ``--summarize`` redoes the last three from ``curves.csv``/``runs.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "hoexp"
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "JAX_PLATFORMS": "cpu",
}
# benchopt/benchmark_bilevel config/datacleaning0_7_best_params.yml (step_size ρ, outer_ratio r: λ's step ρ/r).
BENCHOPT = {
    "benchopt-saba": ("saba", {"step_size": 0.01, "outer_ratio": 1e-4, "batch_size": 64, "eval_freq": 512}),
    "benchopt-soba": ("soba", {"step_size": 1.0, "outer_ratio": 1e-4, "batch_size": 64, "eval_freq": 512}),
    "benchopt-amigo": (
        "amigo",
        {"step_size": 0.001, "outer_ratio": 1e-5, "n_inner_steps": 10, "batch_size": 64, "eval_freq": 512},
    ),
}
PROBLEM = ["dataset=arrays", "model=linear", "hp=example_weights", "hp.example_weights.init=-2.0"]
PROBLEM += ["hp.example_weights.l2=0.4", "optim/inner=sgd", "optim/outer=sgd"]
HOEXP = {
    "hoexp-cg": ["experiment=mnist_hyper_cleaning", "method=cg", "dataset=arrays", "eval_every=1"],
    "hoexp-saba": PROBLEM
    + ["method=saba", "optim.inner.lr=0.01", "optim.outer.lr=100", "inner_steps=1", "eval_every=512"],
    "hoexp-amigo": PROBLEM
    + ["method=amigo", "optim.inner.lr=0.001", "optim.outer.lr=100", "inner_steps=10", "eval_every=51"],
}
HOEXP["hoexp-saba-compiled"] = [*HOEXP["hoexp-saba"], "method.compile=true"]  # derivatives in one compiled graph
SOLVERS = (*BENCHOPT, *HOEXP)
FIELDS = ("seed", "solver", "solver_s", "test_error", "val_error", "val_loss", "f1")


# ---------------------------------------------------------------- pure helpers (tests/test_bench_bilevel.py)


def f1_flagged(weights_raw: Sequence[float], noisy: Sequence[bool]) -> float:
    """F1 of flagging example i as corrupted when σ(λ_i) < ½ (λ_i < 0) against the known-noisy labels."""
    tp = sum(1 for lam, bad in zip(weights_raw, noisy, strict=True) if lam < 0 and bad)
    flagged, actual = sum(1 for lam in weights_raw if lam < 0), sum(1 for bad in noisy if bad)
    return 2 * tp / (flagged + actual) if flagged + actual else 1.0


def error_at(curve: Sequence[tuple[float, float]], t: float, end: float | None = None) -> float:
    """Test error of the last evaluation at solver time ≤ ``t`` (what the solver held at ``t``); NaN when the run
    ended before ``t`` (``end``: its solver time when it stopped, by default its last evaluation's)."""
    before = [e for s, e in curve if s <= t]
    return before[-1] if before and (curve[-1][0] if end is None else end) >= t else math.nan


def time_to(curve: Sequence[tuple[float, float]], threshold: float) -> float:
    """Solver time of the first evaluation with test error ≤ ``threshold``; inf if none reached it."""
    return next((s for s, e in curve if e <= threshold), math.inf)


def cumulative(steps: Iterable[tuple[int, float]]) -> dict[int, float]:
    """Outer step → cumulative ``time/outer_step_s`` through that step (step 0: 0)."""
    out, total = {0: 0.0}, 0.0
    for step, dt in sorted(steps):
        total += dt
        out[step] = total
    return out


def hoexp_curve(rows: Iterable[dict]) -> list[dict]:
    """Evaluations of a hoexp ``metrics.jsonl`` (its parsed lines) as ``{solver_s, test_error, val_error, val_loss,
    f1}``, solver time the run's ``time/solver_s`` where logged, else from ``cumulative`` of ``time/outer_step_s``
    (equal: both leave out compile warm-ups; only the first is right when ``log_every`` skips steps)."""
    rows = list(rows)
    clock = cumulative((r["step"], r["time/outer_step_s"]) for r in rows if "time/outer_step_s" in r)
    clock |= {r["step"]: r["time/solver_s"] for r in rows if "time/solver_s" in r}
    out = []
    for r in rows:
        if "error/test" in r and r["step"] in clock:
            out.append(
                {
                    "solver_s": clock[r["step"]],
                    "test_error": r["error/test"],
                    "val_error": 1 - r["acc/val"] if "acc/val" in r else math.nan,
                    "val_loss": r.get("loss/val", math.nan),
                    "f1": r.get("f1/flagged", math.nan),
                }
            )
    return out


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; 0 for one value) of the finite values; NaN when none (inf if any is inf)."""
    if any(math.isinf(x) for x in xs):
        return math.inf, math.nan
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def fmt(m: float, s: float, digits: int = 3) -> str:
    if math.isnan(m) or math.isinf(m):
        return "—" if math.isnan(m) else "never"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summary_table(
    curves: dict[tuple[int, str], list[dict]],
    times: Sequence[float],
    thresholds: Sequence[float],
    ref: str,
    ends: dict[tuple[int, str], float] | None = None,
) -> str:
    """Markdown: per solver, test error at each of ``times`` and final (mean ± std over seeds), final F1 and the
    times to each threshold; then the ratio of each solver's time to a threshold over ``ref``'s (per seed, mean).
    ``ends``: each run's solver time when it stopped, where later than its last evaluation."""
    solvers = list(dict.fromkeys(name for _, name in curves))
    seeds = sorted({seed for seed, _ in curves})
    ends = ends or {}
    head = [f"{t:g} s" for t in times] + ["final", "final s", "F1 flagged"] + [f"time to {h:g}" for h in thresholds]
    lines = ["| solver | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name in solvers:
        done = [s for s in seeds if (s, name) in curves]
        runs = [_pts(curves[s, name]) for s in done]
        last = [curves[s, name][-1] for s in done]
        cells = [fmt(*mean_std([error_at(c, t, ends.get((s, name))) for s, c in zip(done, runs)])) for t in times]
        cells += [fmt(*mean_std([p["test_error"] for p in last])), fmt(*mean_std([p["solver_s"] for p in last]), 1)]
        cells += [fmt(*mean_std([p["f1"] for p in last]))]
        cells += [reached([time_to(c, h) for c in runs]) for h in thresholds]
        lines.append(f"| {name} (n={len(runs)}) | " + " | ".join(cells) + " |")
    lines += ["", f"Time to reach a test error, ratio to {ref} (per seed, then mean; < 1: faster than {ref}):", ""]
    for h in thresholds:
        for name in solvers:
            if name == ref:
                continue
            both = [s for s in seeds if (s, name) in curves and (s, ref) in curves]
            pairs = [(time_to(_pts(curves[s, name]), h), time_to(_pts(curves[s, ref]), h)) for s in both]
            ratios = [a / b if math.isfinite(a) and math.isfinite(b) else math.nan for a, b in pairs]
            shown = ", ".join(
                f"{s}: {x:.2f}" if math.isfinite(x) else f"{s}: {name if math.isinf(a) else ref} never"
                for s, x, (a, _) in zip(both, ratios, pairs, strict=True)
            )
            finite = [x for x in ratios if math.isfinite(x)]
            stat = fmt(*mean_std(finite), 2)
            lines.append(f"- {h:g}: {name} / {ref} = {stat} over {len(finite)} of {len(both)} seeds ({shown})")
    return "\n".join(lines)


def reached(times: Sequence[float]) -> str:
    """Mean ± std of the finite times, and how many runs reached at all when not every one did."""
    finite = [t for t in times if math.isfinite(t)]
    if not finite:
        return "never"
    cell = fmt(*mean_std(finite), 1) + " s"
    return cell if len(finite) == len(times) else f"{cell} ({len(finite)} of {len(times)})"


def _pts(curve: list[dict]) -> list[tuple[float, float]]:
    return [(p["solver_s"], p["test_error"]) for p in curve]


# ---------------------------------------------------------------- benchopt worker (runs inside the JAX venv)


def make_problem(arrays: dict, reg: float, mnist) -> dict:
    """``datasets/mnist.py``'s ``get_data`` closures (verbatim but for the arrays' source): ``f_inner``,
    ``f_outer``, their full-batch versions and ``metrics``, over the npz's arrays."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np

    eye = np.eye(10)
    X_train, X_val, X_test = (jnp.asarray(arrays[k], dtype=jnp.float32) for k in ("X_train", "X_val", "X_test"))
    y_train, y_val, y_test = (jnp.asarray(eye[arrays[k]]) for k in ("y_train", "y_val", "y_test"))
    n_features, n_classes = X_train.shape[1], 10
    n_inner, n_outer = X_train.shape[0], X_val.shape[0]

    @partial(jax.jit, static_argnames=("batch_size"))
    def f_inner(inner_var, outer_var, start=0, batch_size=1):
        x = jax.lax.dynamic_slice(X_train, (start, 0), (batch_size, X_train.shape[1]))
        y = jax.lax.dynamic_slice(y_train, (start, 0), (batch_size, n_classes))
        outer_var_batch = jax.lax.dynamic_slice(outer_var, (start,), (batch_size,))
        res = mnist.weighted_loss(inner_var, outer_var_batch, x, y)
        res += reg * np.sum(inner_var**2)
        return res

    @partial(jax.jit, static_argnames=("batch_size"))
    def f_outer(inner_var, outer_var, start=0, batch_size=1):
        x = jax.lax.dynamic_slice(X_val, (start, 0), (batch_size, X_val.shape[1]))
        y = jax.lax.dynamic_slice(y_val, (start, 0), (batch_size, n_classes))
        return mnist.loss(inner_var, outer_var, x, y)

    @jax.jit
    def error(inner_var, X, y):
        return jnp.mean(jnp.argmax(X @ inner_var.reshape(n_features, n_classes), axis=1) != y.argmax(axis=1))

    def metrics(inner_var, outer_var):
        return {
            "test_error": float(error(inner_var, X_test, y_test)),
            "val_error": float(error(inner_var, X_val, y_val)),
            "val_loss": float(f_outer(inner_var, outer_var, 0, n_outer)),
        }

    return {
        "pb_inner": (f_inner, n_inner, n_features * n_classes, partial(f_inner, start=0, batch_size=n_inner)),
        "pb_outer": (f_outer, n_outer, n_inner, partial(f_outer, start=0, batch_size=n_outer)),
        "metrics": metrics,
    }


def check_data(npz: Path, raw: Path, seed: int, ratio: float) -> dict:
    """The benchmark's own rule (``datasets/mnist.py``: ``train_test_split`` with ``RandomState(seed)``, labels
    redrawn, ``StandardScaler``) on the raw MNIST idx files under ``raw``, against the npz hoexp wrote: the largest
    feature difference and whether labels and noise agree exactly."""
    import numpy as np
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    def idx(name: str, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer((raw / name).read_bytes(), np.uint8, offset=offset).reshape(*shape)

    x, y = idx("train-images-idx3-ubyte", 16, (-1, 784)), idx("train-labels-idx1-ubyte", 8, (-1,)).copy()
    x_test, y_test = idx("t10k-images-idx3-ubyte", 16, (-1, 784)), idx("t10k-labels-idx1-ubyte", 8, (-1,))
    with np.load(npz) as d:
        got = {k: d[k] for k in d.files}
    rng = np.random.RandomState(seed)
    n_train, n_val = len(got["y_train"]), len(got["y_val"])
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=n_val, train_size=n_train, random_state=rng)
    clean = y_train.copy()
    corrupted = rng.rand(n_train) < ratio
    y_train[corrupted] = rng.randint(0, 10, int(np.sum(corrupted)))
    scaler = StandardScaler()
    xs = {
        "X_train": scaler.fit_transform(x_train),
        "X_val": scaler.transform(x_val),
        "X_test": scaler.transform(x_test),
    }
    ys = {"y_train": y_train, "y_val": y_val, "y_test": y_test}
    return {
        "max_abs_feature_diff": max(float(np.abs(got[k] - v).max()) for k, v in xs.items()),
        "labels_equal": all(bool((got[k] == v).all()) for k, v in ys.items()),
        "noisy_equal": bool((got["noisy_train"] == (y_train != clean)).all()),
    }


def _load_module(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(benchmark: Path, data: Path, solver: str, params: dict, budget: float, random_state: int) -> list[dict]:
    """One benchopt solver on ``data`` for ``budget`` seconds of solver time (module docstring); its curve."""
    import jax
    import numpy as np

    sys.path.insert(0, str(benchmark))  # the solvers import benchmark_utils
    mnist = _load_module("bench_mnist", benchmark / "datasets" / "mnist.py")
    objective = _load_module("bench_objective", benchmark / "objective.py").Objective.get_instance()
    with np.load(data) as npz:
        arrays = {k: npz[k] for k in npz.files}
    problem = make_problem(arrays, 0.2, mnist)
    objective.set_data(**problem)
    cls = _load_module(f"bench_{solver}", benchmark / "solvers" / f"{solver}.py").Solver
    s = cls.get_instance(**params, random_state=random_state)
    s.set_objective(**objective.get_objective())  # jit-compiles (benchopt's warm-up): untimed
    jax.block_until_ready((s.inner_var, s.outer_var))  # the warm-up's epochs were dispatched asynchronously
    curve: list[dict] = []
    clock = {"solver_s": 0.0, "t0": 0.0}

    def callback() -> bool:
        jax.block_until_ready((s.inner_var, s.outer_var))
        clock["solver_s"] += time.perf_counter() - clock["t0"]
        clock["cpu_s"] += time.process_time() - clock["c0"]
        lam = np.asarray(s.outer_var)
        point = {"solver_s": clock["solver_s"], "cpu_s": clock["cpu_s"]}
        point |= problem["metrics"](s.inner_var, s.outer_var)
        point["f1"] = f1_flagged(lam.tolist(), arrays["noisy_train"].tolist())
        curve.append(point)
        go = clock["solver_s"] < budget and bool(np.isfinite(lam).all())
        clock["t0"], clock["c0"] = time.perf_counter(), time.process_time()
        return go

    clock["cpu_s"] = 0.0  # the process's CPU time over the same intervals: how much of the wall time it ran
    clock["t0"], clock["c0"] = time.perf_counter(), time.process_time()
    s.run(callback)
    return curve


# ---------------------------------------------------------------- driver (hoexp's Python)


def write_data(path: Path, seed: int, ratio: float) -> None:
    """The npz of one data seed from hoexp's ``mnist_cleaning`` (benchmark's rule), float64, with ``noisy_train``."""
    import numpy as np
    import torch

    from hoexp.components import DataContext
    from hoexp.dataset.cleaning import mnist_cleaning

    sp = mnist_cleaning(DataContext(seed=seed, dtype=torch.float64), ratio=ratio, split_seed=seed)
    assert sp.noisy is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"X_{k}": getattr(sp, k).x.numpy() for k in ("train", "val", "test")}
    arrays |= {f"y_{k}": getattr(sp, k).y.numpy().astype(np.int64) for k in ("train", "val", "test")}
    np.savez(path, **arrays, noisy_train=sp.noisy.numpy().astype(bool))


def run_hoexp(name: str, data: Path, run_dir: Path, budget: float, seed: int) -> tuple[list[dict], list[str]]:
    """``python -m hoexp run`` with the solver's overrides, SIGINT once its solver time passes ``budget``."""
    cmd = [sys.executable, "-m", "hoexp", "run", *HOEXP[name], f"dataset.path={data}", f"seed={seed}"]
    cmd += ["outer_steps=1000000", "threads=1", "progress=false", "checkpoint_every=0", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir.parent / f"{run_dir.name}.inductor")  # method.compile: a cold compile
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics, total, seen = run_dir / "metrics.jsonl", 0.0, 0
    while proc.poll() is None:
        time.sleep(0.5)
        if metrics.is_file():
            text = metrics.read_text()
            complete = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
            for line in complete[seen:]:
                total += json.loads(line).get("time/outer_step_s", 0.0)
            seen = len(complete)
        if total >= budget:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    log.close()
    if not metrics.is_file():
        raise RuntimeError(f"{name} logged nothing; see {run_dir}.log")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return hoexp_curve(rows), cmd


def run_benchopt(name: str, data: Path, out: Path, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    solver, params = BENCHOPT[name]
    spec = json.dumps({"solver": solver, "params": params, "data": str(data), "budget": args.budget})
    result = out.parent / f"{out.name}.json"
    cmd = [str(Path(args.venv) / "bin" / "python"), __file__, "--worker", spec, "--benchmark", str(args.benchmark)]
    cmd += ["--out", str(result)]
    env = {**os.environ, **ONE_THREAD}
    with (out.parent / f"{out.name}.log").open("w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=args.budget * 5 + 600)
    return json.loads(result.read_text()), cmd


def run_check(data: Path, seed: int, args: argparse.Namespace) -> dict:
    """:func:`check_data` in the venv (scikit-learn), on the data root's raw MNIST files."""
    from hoexp.dataset.root import data_root

    spec = {"data": str(data), "raw": str(data_root() / "mnist" / "MNIST" / "raw"), "seed": seed, "ratio": args.ratio}
    cmd = [str(Path(args.venv) / "bin" / "python"), __file__, "--check-data", json.dumps(spec)]
    r = subprocess.run(cmd, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_all(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    curves_path, meta_path = out / "curves.csv", out / "runs.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"runs": []}
    meta["benchmark_commit"] = _git_head(Path(args.benchmark))
    new = not curves_path.is_file()
    with curves_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        for seed in args.seeds:
            data = out / "data" / f"seed{seed}_ratio{args.ratio}.npz"
            if not data.is_file():
                write_data(data, seed, args.ratio)
            if data.name not in meta.setdefault("data_checks", {}):
                meta["data_checks"][data.name] = run_check(data, seed, args)
                print(f"{data.name} against the benchmark's rule: {meta['data_checks'][data.name]}", flush=True)
            for name in args.solvers:
                if any(r["seed"] == seed and r["solver"] == name for r in meta["runs"]):
                    continue  # done in an earlier call with this --out
                tag = f"seed{seed}_{name}_{time.strftime('%H%M%S')}"
                load0 = os.getloadavg()[0]
                print(f"{tag}: budget {args.budget:g} s, load {load0:.1f}", flush=True)
                if name in BENCHOPT:
                    curve, cmd = run_benchopt(name, data, out / "runs" / tag, args)
                else:
                    curve, cmd = run_hoexp(name, data, out / "runs" / tag, args.budget, seed)
                for p in curve:
                    writer.writerow({"seed": seed, "solver": name, **{k: p[k] for k in FIELDS[2:]}})
                f.flush()
                last = curve[-1]
                print(f"  final: {last['solver_s']:.1f} s, test error {last['test_error']:.4f}, F1 {last['f1']:.3f}")
                meta["runs"].append({"tag": tag, "seed": seed, "solver": name, "load_start": load0,
                                     "load_end": os.getloadavg()[0], "command": cmd})  # fmt: skip
                meta_path.write_text(json.dumps(meta, indent=1))
    summarize(out, args)


def _git_head(repo: Path) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip()


def read_curves(path: Path) -> dict[tuple[int, str], list[dict]]:
    curves: dict[tuple[int, str], list[dict]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            key = (int(row["seed"]), row["solver"])
            curves.setdefault(key, []).append({k: float(row[k]) for k in FIELDS[2:]})
    return curves


def run_details(out: Path, run: dict) -> tuple[float | None, str]:
    """A run's solver time at its stop (hoexp: every logged outer step's, also past its last evaluation) and a
    line: its load, and for benchopt the share of the timed wall clock the process spent on the CPU."""
    base, end, share = out / "runs" / run["tag"], None, ""
    if (base / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines() if line.strip()]
        end = sum(r.get("time/outer_step_s", 0.0) for r in rows)
        compiling = sum(r.get("time/compile_s", 0.0) for r in rows)
        share = f", compile warm-up {compiling:.1f} s (not solver time)" if compiling else ""
    elif base.with_suffix(".json").is_file():
        last = json.loads(base.with_suffix(".json").read_text())[-1]
        end = last["solver_s"]
        share = f", CPU {last['cpu_s'] / last['solver_s']:.0%} of it" if "cpu_s" in last else ""
    load = f"load {run['load_start']:.1f} → {run['load_end']:.1f}"
    return end, f"- {run['tag']}: {load}, stopped at {end or math.nan:.1f} s of solver time{share}"


def summarize(out: Path, args: argparse.Namespace) -> None:
    """``summary.md`` and ``curves.png`` from ``curves.csv``, ``runs.json`` and the runs' own files."""
    curves = read_curves(out / "curves.csv")
    meta = json.loads((out / "runs.json").read_text())
    details = {(r["seed"], r["solver"]): run_details(out, r) for r in meta["runs"]}
    ends = {k: end for k, (end, _) in details.items() if end is not None}
    table = summary_table(curves, (5, 15, 60), (0.16, 0.155), "benchopt-saba", ends)
    loads = [r[k] for r in meta["runs"] for k in ("load_start", "load_end")]
    note = f"1-minute load average during the runs: {min(loads):.1f}-{max(loads):.1f} (2 cores)" if loads else ""
    runs = "\n".join(line for _, line in details.values())
    text = f"{table}\n\n{note}; benchmark_bilevel commit {meta.get('benchmark_commit')}\n\n{runs}\n"
    (out / "summary.md").write_text(text)
    print(text)
    plot(curves, out / "curves.png")


def plot(curves: dict[tuple[int, str], list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    first = min(s for s, _ in curves)
    for (seed, name), curve in sorted(curves.items()):
        color = colors.setdefault(name, f"C{len(colors)}")
        pts = [p for p in curve if p["solver_s"] > 0.05]  # not benchopt's point at init (0.9 error at ~5 ms)
        xs, ys = [p["solver_s"] for p in pts], [p["test_error"] for p in pts]
        ax.plot(xs, ys, color=color, alpha=0.8, lw=1.2, label=name if seed == first else None)
    ax.set(xscale="log", xlabel="solver time (s, one thread)", ylabel="test error", ylim=(0.15, 0.2))
    for h in (0.16, 0.155):
        ax.axhline(h, color="grey", lw=0.5, ls=":")
    ax.legend()
    ax.set_title("MNIST hyper-cleaning (ratio 0.7, 3,500 train), one line per data seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def setup(args: argparse.Namespace) -> None:
    venv = Path(args.venv)
    if not (venv / "bin" / "python").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "jax[cpu]", "benchopt", "scikit-learn", "matplotlib", "numpy"], check=True)
    if not Path(args.benchmark).is_dir():
        subprocess.run(["git", "clone", "-q", args.benchmark_url, str(args.benchmark)], check=True)
    print(f"venv {venv}; benchmark {args.benchmark} at {_git_head(Path(args.benchmark))}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[32])
    p.add_argument("--ratio", type=float, default=0.7)
    p.add_argument("--budget", type=float, default=60.0, help="solver seconds per run")
    p.add_argument("--solvers", type=lambda s: s.split(","), default=["benchopt-saba", "hoexp-cg", "hoexp-saba"])
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench_bilevel"))
    p.add_argument("--venv", default=str(CACHE / "bench-venv"))
    p.add_argument("--benchmark", type=Path, default=CACHE / "benchmark_bilevel")
    p.add_argument("--benchmark-url", default="https://github.com/benchopt/benchmark_bilevel")
    p.add_argument("--setup", action="store_true", help="create --venv and clone --benchmark, then stop")
    p.add_argument("--summarize", action="store_true", help="redo summary.md and curves.png from --out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--check-data", help=argparse.SUPPRESS)
    p.add_argument("--random-state", type=int, default=1, help="the benchopt solvers' sampler seed")
    args = p.parse_args(argv)
    unknown = [s for s in args.solvers if s not in SOLVERS]
    if unknown:
        p.error(f"unknown solver(s) {', '.join(unknown)}; choose from {', '.join(SOLVERS)}")
    if args.worker:
        spec = json.loads(args.worker)
        curve = worker(
            args.benchmark, Path(spec["data"]), spec["solver"], spec["params"], spec["budget"], args.random_state
        )
        Path(args.out).write_text(json.dumps(curve))
    elif args.check_data:
        spec = json.loads(args.check_data)
        print(json.dumps(check_data(Path(spec["data"]), Path(spec["raw"]), spec["seed"], spec["ratio"])))
    elif args.setup:
        setup(args)
    elif args.summarize:
        summarize(Path(args.out), args)
    else:
        run_all(args)


if __name__ == "__main__":
    try:  # the JAX venv's workers run this file without hoexp installed
        from hoexp.errors import run_main
    except ImportError:
        main()
    else:
        run_main(main)  # bad input or missing data: one line, its exit code
