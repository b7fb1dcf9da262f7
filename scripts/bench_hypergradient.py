"""Benchmark: hypergradient cost relative to training, on the reference Iris experiment.

All figures are ratios measured in the same process (times) or in fresh subprocesses started the
same way (peak memory), so they transfer across machines better than absolute numbers:

* HVP / gradient: one Hessian-vector product (reusing the create_graph gradient) over one gradient.
* hypergradient / inner step: one hypergradient of each method over one training step.
* peak memory: the peak resident-set growth while computing one hypergradient, over that of a
  training step (CPU: ru_maxrss in a fresh process; CUDA: max_memory_allocated).
* run wall time: a whole HO run over a `method=none` run with the same inner steps.

    python scripts/bench_hypergradient.py               # table on the console + outputs/bench/iris.json
    python scripts/bench_hypergradient.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hoexp import tree
from hoexp.build import build, build_method
from hoexp.cli import compose_spec
from hoexp.method.base import InnerState, train_inner
from hoexp.method.ift import HessianOperator
from hoexp.problem import FullBatch
from hoexp.runner import run_experiment, thread_policy

METHODS = {
    "neumann K=5": ["method=neumann", "method.terms=5"],
    "neumann K=20": ["method=neumann", "method.terms=20"],
    "fixed_point K=5": ["method=fixed_point", "method.iterations=5"],
    "cg K=20": ["method=cg", "method.iterations=20", "method.tol=0"],
}


def setup(device: str, overrides: list[str] = ()):
    spec, _ = compose_spec(["experiment=iris_per_weight_decay", f"device={device}", "progress=false", *overrides])
    exp = build(spec)
    params = {k: v.detach().clone() for k, v in exp.model.named_parameters()}
    raw = exp.problem.family.init(params)
    state = InnerState(params, exp.inner_opt.init(params))
    batches = FullBatch(exp.data.train)
    state, _, _ = train_inner(exp.problem, exp.inner_opt, state, raw, batches, 100)  # a trained point
    return spec, exp, state, raw, batches


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_times(device: str, repeat: int) -> dict[str, float]:
    spec, exp, state, raw, batches = setup(device)
    dev = exp.device
    with thread_policy(spec.run.threads, dev, tree.numel(state.params)):
        problem = exp.problem
        batch = next(batches)
        out: dict[str, float] = {}
        out["inner step"] = timeit(lambda: train_inner(problem, exp.inner_opt, state, raw, batches, 1), dev, repeat)

        def gradient(create_graph=False):
            w = tree.detached(state.params, True)
            loss = problem.train_loss(w, raw, batch)
            return torch.autograd.grad(loss, list(w.values()), create_graph=create_graph), w

        out["gradient"] = timeit(gradient, dev, repeat)
        g, w = gradient(create_graph=True)
        op = HessianOperator(tree.flatten(g), list(w.values()))
        v = torch.randn(op.n, device=dev)
        out["HVP"] = timeit(lambda: op.matvec(v), dev, repeat)
        for name, overrides in METHODS.items():
            spec_m, _ = compose_spec(["experiment=iris_per_weight_decay", f"device={device}", *overrides])
            method = build_method(spec_m)
            val = (exp.data.val.x, exp.data.val.y)
            out[f"hypergradient {name}"] = timeit(
                lambda: method.outer_step(problem, exp.inner_opt, state, raw, batches, val, 0),
                dev, max(5, repeat // 4))
            stats = method.outer_step(problem, exp.inner_opt, state, raw, batches, val, 0)[2]
            out[f"hvps {name}"] = stats.hvps
            out[f"info {name}"] = stats.info
    return out


def measure_memory(mode: str, device: str) -> float:
    """Peak memory growth (MiB) of one training step or one hypergradient, in this fresh process."""
    spec, exp, state, raw, batches = setup(device)
    dev = exp.device
    problem = exp.problem
    if mode == "inner step":
        def fn():
            train_inner(problem, exp.inner_opt, state, raw, batches, 1)
    else:
        spec_m, _ = compose_spec(["experiment=iris_per_weight_decay", f"device={device}", *METHODS[mode]])
        method = build_method(spec_m)

        def fn():
            method.outer_step(problem, exp.inner_opt, state, raw, batches, (exp.data.val.x, exp.data.val.y), 0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak - base, 0) / 2**20


def measure_runs(device: str, outer_steps: int, inner_steps: int) -> dict[str, float]:
    out = {}
    for name, overrides in {"none": ["method=none"], "neumann K=5": ["method=neumann", "method.terms=5"]}.items():
        spec, text = compose_spec(["experiment=iris_per_weight_decay", f"device={device}", "progress=false",
                                   f"outer_steps={outer_steps}", f"inner_steps={inner_steps}", *overrides])
        summary = run_experiment(spec, Path("outputs/bench/runs") / name.replace(" ", "_"),
                                 console=Console(file=open("/dev/null", "w")))
        out[name] = summary["wall_time_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="outputs/bench/iris.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_memory(args.child, args.device)))
        return

    times = measure_times(args.device, args.repeat)
    memory = {}
    for mode in ["inner step", *METHODS]:
        r = subprocess.run([sys.executable, __file__, "--child", mode, "--device", args.device],
                           capture_output=True, text=True, check=True)
        memory[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    runs = {k: measure_runs(args.device, outer_steps=20, inner_steps=k) for k in (10, 100)}

    table = Table(title=f"Iris reference experiment (17,280 weights and decays), device={args.device}")
    for col in ("measure", "time (ms)", "ratio", "peak memory (MiB)", "memory ratio"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    step, grad = times["inner step"], times["gradient"]
    table.add_row("inner training step", f"{step * 1e3:.3f}", "1.0 (÷ step)", f"{memory['inner step']:.2f}", "1.0")
    table.add_row("gradient of L_T", f"{grad * 1e3:.3f}", f"{grad / step:.2f} (÷ step)", "", "")
    table.add_row("HVP", f"{times['HVP'] * 1e3:.3f}", f"{times['HVP'] / grad:.2f} (÷ gradient)", "", "")
    for name in METHODS:
        t = times[f"hypergradient {name}"]
        mem = memory[name]
        info = f" ({times[f'hvps {name}']} HVPs{', ' + times[f'info {name}'] if times[f'info {name}'] else ''})"
        table.add_row(f"hypergradient, {name}{info}", f"{t * 1e3:.3f}", f"{t / step:.1f} (÷ step), {t / grad:.1f} (÷ grad)",
                      f"{mem:.2f}", f"{mem / max(memory['inner step'], 1e-9):.1f}")
    for k, r in runs.items():
        table.add_row(f"HO run (Neumann K=5) / none run, 20 outer × {k} inner steps", f"{r['neumann K=5'] * 1e3:.0f}",
                      f"{r['neumann K=5'] / r['none']:.2f}", "", "")
    Console(width=140).print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "times_s": times, "peak_memory_mib": memory,
                               "run_wall_s": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
