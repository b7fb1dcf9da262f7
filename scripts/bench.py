"""The hoexp benchmark suite: what hypergradients cost, relative to training, on three problems.

    python scripts/bench.py                        # full suite: console tables + outputs/bench/bench.json
    python scripts/bench.py --quick                # small sizes, a smoke test (about a minute or two)
    python scripts/bench.py --only iris,mnist --device cuda --out outputs/bench/gpu.json
    make bench ARGS="--only ptb"

Problems (presets composed in-process with ``compose_spec``):

* ``iris``: ``experiment=iris_per_weight_decay``, a 4→128→128→3 MLP, 17,280 weights and per-weight decays;
* ``mnist``: ``experiment=mnist_per_weight_decay model.width=1280 model.depth=1
  hp.weight_decay.granularity=per_weight``, a 784→1280→10 MLP,
  1,017,610 weights and 1,016,320 per-weight decays (more than a million hyperparameters);
* ``ptb``: ``experiment=ptb_lstm_dropout_gaussian``, the small shared PTB language model (2-layer, 200-unit tied
  LSTM) with per-unit dropout and per-weight DropConnect (320,600 rates), Adam inside.

Methods: ``neumann`` (K=5 terms, with its residual as configured by default, and ``neumann-nores``
without: K HVPs exactly; ``neumann-fused``: ``method.fuse_step=true``, whose hypergradient takes the last
inner step's gradient, so it is timed as the outer step minus T plain steps, as a path method), ``cg`` and
``fixed_point`` (5 iterations), ``t1t2``, ``truncated`` (the last k=5 of T steps), ``unrolled`` (all T
steps), ``forward`` (where the preset's family exceeds ``method.max_hparams``, as the per-weight and
per-unit ones do, a per-layer-decay variant of the problem stands in; none on ptb) and ``none``. T (inner steps per hypergradient) is 10 everywhere.

Every figure is a ratio of two times (or memories) measured in the same process, so figures move
less between machines than the milliseconds do. Times are medians over interleaved rounds (the
numerator and its denominator measured side by side, so load changes affect both):

* ``hvp/grad``: one Hessian-vector product (a backward pass through the kept ``create_graph`` gradient)
  over one gradient of the training loss (forward + backward);
* ``floor``: what a K-term IFT hypergradient cannot avoid, the validation gradient + the
  ``create_graph`` training gradient + K HVPs, over one gradient (the validation batch may be larger
  than the training batch: 500 against 128 images on mnist); the Neumann rows' ``hg/floor`` is their
  time over the floor for their number of HVPs;
* ``hg/step`` and ``hg/grad``: one hypergradient over one inner training step (gradient + optimizer
  update) and over one gradient. IFT methods: an outer step with no inner steps. Path methods
  (unrolled, truncated, forward), whose hypergradient is entangled with the T steps: the outer step
  with T steps minus T plain steps;
* ``mem``: peak memory of one outer step (T inner steps, the hypergradient, the outer update) over
  that of a ``none`` outer step with the same T steps. Memory counts the tensors that persist
  (weights, inner optimizer state, hyperparameters, the outer optimizer's state) plus the peak of
  everything allocated on top of them during the step; the process, libraries and data sets are
  left out (they are the same for both). CPU: each measurement runs in a fresh process with glibc's
  mmap threshold fixed at 64 KiB (every tensor buffer is mapped on allocation and unmapped when
  freed, so resident memory follows live tensors); after setup and one warm-up step the peak RSS is
  reset (``/proc/self/clear_refs``) and the working memory is ``VmHWM − VmRSS`` at that point.
  CUDA: ``max_memory_allocated − memory_allocated``, also in a fresh process;
* ``run`` and ``wall`` (``neumann`` and ``t1t2``, the rows the run-time targets name; the other methods'
  cost is in ``hg/step``): a whole ``hoexp`` run of the method (``run_experiment``, T inner steps per
  outer step) over a ``method=none`` run with the same steps started right after it. ``run``
  compares the runner's own per-outer-step times (``time/outer_step_s``: inner steps,
  hypergradient, outer update; the median over the outer steps after the first, which pays
  one-time costs such as lazy initialisation and the first double backward); ``wall`` the runs'
  whole wall times (``summary.json``: setup, that first step, evaluation at the first and last step
  and logging included);
* ``compiled step/step`` (title line): ``compile=true``'s training step (``torch.compile`` of the pure step
  function) over the eager step, for the problems in ``--compile`` (iris and mnist by default);
* ptb: training throughput in tokens per second, from the runs' median outer step (the JSON also
  has it from the step timings, ``tokens_per_s_from_timings``).

The runner's thread policy applies (``threads=0``: one thread below 1M weights on CPU); ``--threads N``
sets ``threads=N`` for every measurement instead.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hoexp import tree
from hoexp.cli import compose_spec
from hoexp.config.build import build, build_method
from hoexp.config.run import thread_policy
from hoexp.engine.runtime import Runtime
from hoexp.engine.state import start
from hoexp.errors import run_main
from hoexp.method.base import InnerState, train_inner
from hoexp.method.base import outer_step as method_step
from hoexp.method.functional import FunctionalOperator, hvp_fwd_rev
from hoexp.method.ift import HessianOperator

ROOT = Path(__file__).resolve().parent.parent

# name → (preset overrides, extra overrides for --quick, outer steps of the whole runs (full, quick))
PROBLEMS: dict[str, tuple[list[str], list[str], tuple[int, int]]] = {
    "iris": (["experiment=iris_per_weight_decay"], [], (20, 4)),
    "mnist": (
        [
            "experiment=mnist_per_weight_decay",
            "model.width=1280",
            "model.depth=1",
            "hp.weight_decay.granularity=per_weight",
        ],  # the preset moved to layer_and_weight: keep the 1M decays
        ["model.width=64"],
        (10, 2),
    ),
    # the long-unroll memory section only (not in --only's default): the MNIST preset, T = LONG_T
    "mnist_preset": (["experiment=mnist_per_weight_decay"], ["model.width=64"], (0, 0)),
    "ptb": (
        # the preset moved to one Gaussian rate (docs/results.md): keep the 320,600 per-unit / DropConnect rates measured here
        [
            "experiment=ptb_lstm_dropout_gaussian",
            "hp.dropout.granularity=per_unit",
            "hp.dropout.relaxation=concrete",
            "dataset.val_batch_size=0",
            "warmup=0",
            "optim/outer=adam",
            "hp.dropout.init=0.05",
        ],
        ["model.embed_dim=24", "model.hidden=24", "dataset.bptt=8", "dataset.eval_batch_size=40"],
        (3, 0),
    ),
}
INNER_STEPS = 10
K = 5
LONG_T = 100  # inner steps of the long-unroll memory section (unrolled vs checkpointed on the MNIST preset)


@dataclass(frozen=True)
class MethodRow:
    name: str
    overrides: tuple[str, ...]
    kind: str  # "ift", "path" or "none"
    problem_overrides: tuple[str, ...] = ()  # a variant of the problem (forward's per-layer stand-in)
    note: str = ""
    runs: bool = True  # also measured by memory (not only timed)
    whole_run: bool = False  # also a whole hoexp run, paired with a none run (the run-time targets' rows)


def method_rows(problem: str, only: str | None = None) -> list[MethodRow]:
    if problem == "mnist_preset":  # T = LONG_T: the stored trajectory against checkpoints every √T steps
        return [
            MethodRow("unrolled", ("method=unrolled",), "path", note=f"T={LONG_T}"),
            MethodRow(
                "unrolled-ckpt",
                ("method=unrolled", "method.checkpoint_every=10"),
                "path",
                note=f"T={LONG_T}, checkpoint_every=10",
            ),
            MethodRow("none", ("method=none",), "none"),
        ]
    rows = [
        MethodRow("neumann", ("method=neumann", f"method.terms={K}"), "ift", note=f"K={K} + residual", whole_run=True),
        MethodRow(
            "neumann-nores",
            ("method=neumann", f"method.terms={K}", "method.residual=false"),
            "ift",
            note=f"K={K}",
            runs=False,
        ),
        MethodRow(  # timed as a path method: T steps with the fused one, minus T plain steps
            "neumann-fused",
            ("method=neumann", f"method.terms={K}", "method.fuse_step=true"),
            "path",
            note=f"K={K} + residual, fused with the last of T={INNER_STEPS} steps",
            runs=False,
        ),
        MethodRow("cg", ("method=cg", f"method.iterations={K}", "method.tol=0"), "ift", note=f"K={K}"),
        MethodRow("fixed_point", ("method=fixed_point", f"method.iterations={K}"), "ift", note=f"K={K} + residual"),
        MethodRow("t1t2", ("method=t1t2",), "ift", whole_run=True),
        MethodRow(
            "truncated",
            ("method=truncated", f"method.k={INNER_STEPS // 2}"),
            "path",
            note=f"k={INNER_STEPS // 2} of T={INNER_STEPS}",
        ),
        MethodRow("unrolled", ("method=unrolled",), "path", note=f"T={INNER_STEPS}"),
        MethodRow(
            "unrolled-ckpt",
            ("method=unrolled", "method.checkpoint_every=3"),
            "path",
            note=f"T={INNER_STEPS}, checkpoint_every=3",
            runs=True,
        ),
    ]
    if problem in ("iris", "mnist"):
        rows.append(
            MethodRow(
                "forward",
                ("method=forward",),
                "path",
                ("hp.weight_decay.granularity=per_layer",),
                note="per-layer decays",
            )
        )
    rows.append(MethodRow("none", ("method=none",), "none", whole_run=True))
    if only:
        wanted = {m.strip() for m in only.split(",")} | {"none"}  # none: every ratio's reference
        rows = [r for r in rows if r.name in wanted]
    return rows


# ------------------------------------------------------------------------------------ set-up
def spec_for(problem: str, quick: bool, device: str, threads: int, *extra: str):
    base, small, _ = PROBLEMS[problem]
    overrides = [
        *base,
        *(small if quick else []),
        f"device={device}",
        f"threads={threads}",
        "progress=false",
        f"inner_steps={INNER_STEPS}",
        *extra,
    ]
    return compose_spec(overrides)[0]


@dataclass
class Context:
    """A problem ready to measure: a trained-a-little inner state, batch streams, threads set."""

    spec: Any
    exp: Any
    state: InnerState
    raw: dict[str, torch.Tensor]
    train: Any
    val: Any
    threads: int = 0
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def device(self) -> torch.device:
        return self.exp.device


def setup(problem: str, quick: bool, device: str, threads: int, problem_overrides: tuple[str, ...] = ()) -> Context:
    spec = spec_for(problem, quick, device, threads, *problem_overrides)
    exp = build(spec)
    st = start(exp)  # the runner's start: weights, hyperparameters, streams
    params = st.inner.params
    ctx = Context(spec, exp, st.inner, st.raw, st.train, None)
    ctx.val = st.val
    ctx.threads = ctx.stack.enter_context(thread_policy(spec.run.threads, exp.device, tree.numel(params)))
    ctx.state, _, _ = train_inner(exp.problem, exp.inner_opt, ctx.state, ctx.raw, ctx.train, 3)  # off the init
    return ctx


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rounds(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds of each function over interleaved rounds (one call of each per round), after ``warmup``
    rounds; at least ``min_rounds``, then more while the time budget lasts, at most ``max_rounds``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while True:
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
        n = len(times[next(iter(fns))])
        if n >= max_rounds or (n >= min_rounds and time.perf_counter() - start > budget_s):
            return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------------- time ratios
def time_problem(problem: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    quick = args.quick
    budget = 2.0 if quick else args.budget
    ctx = setup(problem, quick, args.device, args.threads)
    exp, prob = ctx.exp, ctx.exp.problem
    batch = next(ctx.train)
    val_batch = next(ctx.val)
    out: dict[str, Any] = {
        "num_params": tree.numel(ctx.state.params),
        "num_hparams": tree.numel(ctx.raw),
        "threads": ctx.threads,
        "device": str(ctx.device),
        "inner_steps": INNER_STEPS,
        "inner_optimizer": ctx.spec.inner_optim.name,
        "overrides": PROBLEMS[problem][0] + (PROBLEMS[problem][1] if quick else []),
    }

    def step():
        train_inner(prob, exp.inner_opt, ctx.state, ctx.raw, iter([batch]), 1)

    def gradient(create_graph: bool = False):
        w = tree.detached(ctx.state.params, True)
        loss = prob.train_loss(w, ctx.raw, batch)
        return torch.autograd.grad(loss, list(w.values()), create_graph=create_graph), w

    def val_gradient():
        wv = tree.detached(ctx.state.params, True)
        return torch.autograd.grad(prob.val_loss(wv, ctx.raw, val_batch), list(wv.values()), allow_unused=True)

    g, w = gradient(create_graph=True)
    op = HessianOperator(tree.flatten(g), list(w.values()))
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(0), dtype=op.grad_flat.dtype).to(ctx.device)
    raw_c = tree.detached(ctx.raw)
    fr_op = FunctionalOperator(
        lambda w_, lam_, u_: hvp_fwd_rev(lambda a, b: prob.train_loss(a, b, batch), w_, lam_, u_),
        tree.detached(ctx.state.params),
        raw_c,
    )
    fns: dict[str, Callable[[], Any]] = {
        "step": step,
        "grad": gradient,
        "grad_create_graph": lambda: gradient(create_graph=True),
        "val_grad": val_gradient,
        "hvp": functools.partial(op.matvec, v),
        "hvp_fwd_rev": functools.partial(fr_op.matvec, v),
    }
    if problem in args.compile.split(","):  # compile=true's training step, timed beside the eager one
        fn = Runtime(compile=True).compiled_step(prob, exp.inner_opt)
        raw = tree.detached(ctx.raw)
        overrides = prob.family.optimizer_overrides(raw, 0)
        t0 = time.perf_counter()
        fn(ctx.state.params, ctx.state.opt_state, raw, batch, overrides)
        sync(ctx.device)
        out["compile_s"] = time.perf_counter() - t0
        fns["step_compiled"] = lambda: fn(ctx.state.params, ctx.state.opt_state, raw, batch, overrides)
    t = rounds(
        fns,
        ctx.device,
        min_rounds=3 if quick else (5 if problem == "ptb" else 15),
        max_rounds=5 if quick else 300,
        budget_s=budget,
    )
    del fns, g, w, op, fr_op  # frees the create_graph gradient the HVPs differentiate
    base = {k: med(x) for k, x in t.items()}
    out["times_ms"] = {k: 1e3 * x for k, x in base.items()}
    out["hvp_over_grad"] = base["hvp"] / base["grad"]
    # forward-over-reverse (torch.func.jvp of grad, eager) against the kept-graph reverse-over-reverse product
    out["hvp_fwd_rev_over_grad"] = base["hvp_fwd_rev"] / base["grad"]
    out["fwd_rev_over_rev_rev"] = base["hvp_fwd_rev"] / base["hvp"]
    out["step_over_grad"] = base["step"] / base["grad"]
    out["val_grad_over_grad"] = base["val_grad"] / base["grad"]
    if "step_compiled" in base:
        out["compiled_step_over_step"] = base["step_compiled"] / base["step"]
    # The passes a K-term IFT hypergradient cannot avoid: the validation gradient, the create_graph
    # training gradient and K HVPs (the mixed-term pass comes on top: a few elementwise operations for
    # weight decay, about one HVP for dropout unless it rides along with the solve's HVPs).
    floor = base["val_grad"] + base["grad_create_graph"] + K * base["hvp"]
    out["ift_floor_K_ms"] = 1e3 * floor
    out["ift_floor_K_over_grad"] = floor / base["grad"]
    if ctx.device.type == "cuda":
        out["cuda_peak_note"] = "memory from max_memory_allocated"
    log(
        f"  {problem}: step {base['step'] * 1e3:.2f} ms, gradient {base['grad'] * 1e3:.2f} ms, "
        f"HVP {base['hvp'] * 1e3:.2f} ms (HVP/grad {out['hvp_over_grad']:.2f}; forward-over-reverse "
        f"{out['hvp_fwd_rev_over_grad']:.2f}), threads={ctx.threads}"
        + (
            f", compiled step {base['step_compiled'] * 1e3:.2f} ms after {out['compile_s']:.0f} s of compiling"
            if "step_compiled" in base
            else ""
        )
    )

    variants: dict[tuple[str, ...], Context] = {(): ctx}
    methods: dict[str, Any] = {}
    for row in method_rows(problem, args.methods):
        vctx = variants.get(row.problem_overrides)
        if vctx is None:
            vctx = variants[row.problem_overrides] = setup(
                problem, quick, args.device, args.threads, row.problem_overrides
            )
        spec_m = spec_for(problem, quick, args.device, args.threads, *row.problem_overrides, *row.overrides)
        entry: dict[str, Any] = {
            "kind": row.kind,
            "note": row.note,
            "overrides": list(row.overrides),
            "problem_overrides": list(row.problem_overrides),
            "num_hparams": tree.numel(vctx.raw),
        }
        methods[row.name] = entry
        if row.name == "forward" and tree.numel(vctx.raw) > spec_m.method.max_hparams:
            entry["skipped"] = f"{tree.numel(vctx.raw):,} hyperparameters > method.max_hparams"
            continue
        if row.kind == "none":
            entry.update(hg_ms=0.0, hg_over_step=0.0, hg_over_grad=0.0)
            continue
        method = build_method(spec_m)
        vprob, vexp = vctx.exp.problem, vctx.exp
        vbatch = next(vctx.train)

        def vstep(vctx=vctx, vprob=vprob, vexp=vexp, vbatch=vbatch):
            train_inner(vprob, vexp.inner_opt, vctx.state, vctx.raw, iter([vbatch]), 1)

        def vgrad(vctx=vctx, vprob=vprob, vbatch=vbatch):
            wv = tree.detached(vctx.state.params, True)
            return torch.autograd.grad(vprob.train_loss(wv, vctx.raw, vbatch), list(wv.values()))

        steps = 0 if row.kind == "ift" else INNER_STEPS
        stats_box: dict[str, Any] = {}

        def hypergradient(method=method, vctx=vctx, vprob=vprob, vexp=vexp, steps=steps, stats_box=stats_box):
            stats_box["stats"] = method_step(
                method,
                vprob,
                vexp.inner_opt,
                vctx.state,
                vctx.raw,
                vctx.train,
                val_batch if vctx is ctx else next(vctx.val),
                steps,
            )[2]

        heavy = row.kind == "path"
        vfns: dict[str, Callable[[], Any]] = {"step": vstep, "grad": vgrad, "hg": hypergradient}
        if heavy:  # the same T plain steps (method=none), timed beside the path method's outer step
            plain = build_method(
                spec_for(problem, quick, args.device, args.threads, *row.problem_overrides, "method=none")
            )

            def plain_steps(plain=plain, vctx=vctx, vprob=vprob, vexp=vexp):
                return method_step(plain, vprob, vexp.inner_opt, vctx.state, vctx.raw, vctx.train, None, INNER_STEPS)

            vfns["plain"] = plain_steps
        t = rounds(
            vfns,
            vctx.device,
            min_rounds=2 if quick else (5 if (heavy or problem == "ptb") else 11),
            max_rounds=3 if quick else 200,
            budget_s=budget * (2 if heavy else 1),
            warmup=1 if quick else 2,
        )
        step_s, grad_s, outer_s = med(t["step"]), med(t["grad"]), med(t["hg"])
        # Path methods: the outer step minus the plain steps, paired round by round.
        hg_s = med([a - b for a, b in zip(t["hg"], t["plain"])]) if heavy else outer_s
        stats = stats_box.get("stats")
        entry.update(
            hg_ms=1e3 * hg_s,
            outer_step_ms=1e3 * outer_s,
            step_ms=1e3 * step_s,
            grad_ms=1e3 * grad_s,
            hg_over_step=hg_s / step_s,
            hg_over_grad=hg_s / grad_s,
            rounds=len(t["hg"]),
            hvps=None if stats is None or "solver/hvps" not in stats else int(stats["solver/hvps"]),
            info="",
        )
        if row.name.startswith("neumann"):  # against the floor of its HVPs (K, or K + 1 with the residual),
            # both in gradients, each measured beside its own gradient
            floor = (base["val_grad"] + base["grad_create_graph"] + (entry["hvps"] or 0) * base["hvp"]) / base["grad"]
            entry["floor_over_grad"] = floor
            entry["hg_over_floor"] = (hg_s / grad_s) / floor
        if entry["info"] and entry["info"] not in ("max iterations",):
            entry["note"] = f"{row.note}; {entry['info']}" if row.note else entry["info"]
        log(
            f"  {problem} {row.name}: hypergradient {hg_s * 1e3:.1f} ms = {hg_s / step_s:.2f} steps = "
            f"{hg_s / grad_s:.2f} gradients ({len(t['hg'])} rounds)"
        )
    for c in reversed(list(variants.values())):  # last opened first: each restores its predecessor's threads
        c.stack.close()
    out["methods"] = methods
    return out


# ------------------------------------------------------------------------------------ memory
def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def child_memory(problem: str, row_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: peak memory (bytes) of one outer step of ``row_name`` (see the module doc)."""
    row = next(r for r in method_rows(problem) if r.name == row_name)
    ctx = setup(problem, args.quick, args.device, args.threads, row.problem_overrides)
    exp, prob = ctx.exp, ctx.exp.problem
    spec_m = spec_for(problem, args.quick, args.device, args.threads, *row.problem_overrides, *row.overrides)
    method = build_method(spec_m)
    ho = row.kind != "none"
    outer_state = exp.outer_opt.init(ctx.raw) if ho else {}

    def outer_step():
        hg, new_state, _ = method_step(
            method, prob, exp.inner_opt, ctx.state, ctx.raw, ctx.train, next(ctx.val), INNER_STEPS
        )
        if hg is not None:
            with torch.no_grad():
                exp.outer_opt.update(ctx.raw, hg, outer_state)
        sync(ctx.device)

    outer_step()  # warm-up: lazy initialisations, first-use caches
    gc.collect()
    _malloc_trim()
    persistent = _nbytes(ctx.state.params) + _nbytes(ctx.state.opt_state) + _nbytes(ctx.raw) + _nbytes(outer_state)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        outer_step()
        elapsed = time.perf_counter() - t0
        working = torch.cuda.max_memory_allocated() - base
        how = "cuda max_memory_allocated"
    else:
        base = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            how = "VmHWM after clear_refs"
        except OSError:
            how = "ru_maxrss (peak not reset: an upper bound)"
        t0 = time.perf_counter()
        outer_step()
        elapsed = time.perf_counter() - t0
        working = _status_kib("VmHWM") * 1024 - base
    ctx.stack.close()
    return {"persistent_bytes": persistent, "working_bytes": max(working, 0), "how": how, "outer_step_s": elapsed}


def measure_memory(problem: str, row_name: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-memory",
        f"{problem}:{row_name}",
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--inner-steps",
        str(INNER_STEPS),
    ] + (["--quick"] if args.quick else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(r.stdout.strip().splitlines()[-1])


def long_unroll_times(args: argparse.Namespace) -> dict[str, Any]:
    """The stored-trajectory and the checkpointed unroll of T = LONG_T steps on the MNIST preset, timed in
    one process over interleaved rounds (one outer step each; the memory rows time a single step apiece)."""
    global INNER_STEPS
    saved, INNER_STEPS = INNER_STEPS, LONG_T
    ctx = setup("mnist_preset", False, args.device, args.threads)
    try:
        prob, exp = ctx.exp.problem, ctx.exp
        fns: dict[str, Callable[[], Any]] = {}
        for row in method_rows("mnist_preset"):
            if row.kind != "path":
                continue
            method = build_method(spec_for("mnist_preset", False, args.device, args.threads, *row.overrides))
            fns[row.name] = functools.partial(
                method_step, method, prob, exp.inner_opt, ctx.state, ctx.raw, ctx.train, next(ctx.val), LONG_T
            )
        t = rounds(fns, ctx.device, min_rounds=3, max_rounds=5, budget_s=args.budget, warmup=1)
    finally:
        ctx.stack.close()  # restores the thread count
        INNER_STEPS = saved
    med_s = {k: med(v) for k, v in t.items()}
    return {
        "outer_step_s": med_s,
        "rounds": len(t["unrolled"]),
        "ckpt_time_over_stored": med_s["unrolled-ckpt"] / med_s["unrolled"],
    }


# ------------------------------------------------------------------------------- whole runs
def whole_run(problem: str, row: MethodRow, args: argparse.Namespace, outer_steps: int) -> dict[str, Any]:
    from rich.console import Console

    from hoexp.config.run import run_experiment

    spec = spec_for(
        problem,
        args.quick,
        args.device,
        args.threads,
        *row.problem_overrides,
        *row.overrides,
        f"outer_steps={outer_steps}",
        f"eval_every={outer_steps}",
        f"histogram_every={outer_steps}",
    )
    out_dir = Path(args.runs_dir) / problem / row.name
    shutil.rmtree(out_dir, ignore_errors=True)
    summary = run_experiment(spec, out_dir, console=Console(file=io.StringIO()))
    loop = []
    with contextlib.suppress(OSError):
        for line in (out_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("step", 0) > 0 and "time/outer_step_s" in rec:
                loop.append(rec["time/outer_step_s"])
    complete = len(loop) == outer_steps
    return {
        "wall_s": summary["wall_time_s"],
        "loop_s": sum(loop) if complete else None,
        # without the first outer step, which pays one-time costs (lazy initialisation, first use of
        # double backward / torch.func): what a long run's steps cost
        "steady_loop_s": sum(loop[1:]) if complete and outer_steps > 1 else None,
        "steady_median_s": statistics.median(loop[1:]) if complete and outer_steps > 1 else None,
        "outer_step_s": loop,
        "status": summary.get("status"),
        "outer_steps": outer_steps,
        "inner_steps": INNER_STEPS,
        "final_val_loss": summary.get("final", {}).get("val_loss"),
    }


# -------------------------------------------------------------------------------------- main
def fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def tokens_per_step(problem: str, quick: bool, device: str, threads: int) -> int:
    spec = spec_for(problem, quick, device, threads)
    return spec.dataset.bptt * spec.dataset.batch_size


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, p in result["problems"].items():
        m = p["methods"]
        out.append({"problem": name, "target": "HVP ≤ 2.5× gradient", "value": p["hvp_over_grad"], "limit": 2.5})
        if name == "ptb":
            out.append(
                {
                    "problem": name,
                    "target": "LSTM HVP ≤ 1.5× gradient (best of rev_rev, fwd_rev)",
                    "value": min(p["hvp_over_grad"], p["hvp_fwd_rev_over_grad"]),
                    "limit": 1.5,
                }
            )
        for key, label in (
            ("neumann-nores", f"Neumann K={K} hypergradient ≤ (K+3)× gradient"),
            ("neumann", f"Neumann K={K} + residual hypergradient ≤ (K+3)× gradient"),
            ("neumann-fused", "… fused with the last inner step (what it adds to T steps) ≤ (K+3)× gradient"),
        ):
            if "hg_over_grad" in m.get(key, {}):
                out.append({"problem": name, "target": label, "value": m[key]["hg_over_grad"], "limit": K + 3})
        if m.get("neumann", {}).get("run_ratio") is not None:
            out.append(
                {
                    "problem": name,
                    "target": f"HO run (K={K}, hypergradient every {INNER_STEPS} steps) ≤ 1.3× "
                    "training without HO (training loop)",
                    "value": m["neumann"]["run_ratio"],
                    "limit": 1.3,
                }
            )
        if name == "mnist" and m.get("neumann", {}).get("mem_ratio") is not None:
            out.append(
                {
                    "problem": name,
                    "target": "million-hyperparameter run ≤ 3× the memory of plain training (Neumann)",
                    "value": m["neumann"]["mem_ratio"],
                    "limit": 3.0,
                }
            )
    long = result.get("long_unroll") or {}
    if "unrolled-ckpt" in long.get("mem_ratio", {}):
        out.append(
            {
                "problem": "mnist preset",
                "target": f"unrolled T={LONG_T}, checkpointed: memory ≤ 2× plain training",
                "value": long["mem_ratio"]["unrolled-ckpt"],
                "limit": 2.0,
            }
        )
    if "ckpt_time_over_stored" in long:
        out.append(
            {
                "problem": "mnist preset",
                "target": f"unrolled T={LONG_T}, checkpointed: time ≤ 1.5× stored trajectory",
                "value": long["ckpt_time_over_stored"],
                "limit": 1.5,
            }
        )
    peers = result.get("peers") or {}
    ratios = peers.get("ratios", {})
    for key, limit in (
        ("hoexp CG-10 / hypertorch", 0.5),
        ("hoexp Neumann-10 / hypertorch", 0.5),
        ("hoexp CG-10 compiled / hypertorch", 0.5),
        ("hoexp Neumann-10 compiled / hypertorch", 0.5),
        ("hoexp CG-10 / jaxopt", 2.0),
        ("hoexp Neumann-10 / jaxopt", 2.0),
        ("hoexp CG-10 compiled / jaxopt", 2.0),
        ("hoexp Neumann-10 compiled / jaxopt", 2.0),
        ("hoexp exact / direct solve", 3.0),
        ("hoexp exact compiled / direct solve", 3.0),
    ):
        if key in ratios:
            out.append({"problem": "peers", "target": f"{key} ≤ {limit}", "value": ratios[key], "limit": limit})
    for t in out:
        t["met"] = bool(t["value"] <= t["limit"])
    return out


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for name, p in result["problems"].items():
        tm = p["times_ms"]
        title = (
            f"{name}: {p['num_params']:,} weights, {p['num_hparams']:,} hyperparameters, "
            f"device={p['device']}, threads={p['threads']}, T={p['inner_steps']} — step {tm['step']:.2f} ms, "
            f"gradient {tm['grad']:.2f} ms, HVP {tm['hvp']:.2f} ms: HVP/grad {p['hvp_over_grad']:.2f} "
            f"(forward-over-reverse {p['hvp_fwd_rev_over_grad']:.2f}), "
            f"step/grad {p['step_over_grad']:.2f}, validation gradient/grad {p['val_grad_over_grad']:.2f}, "
            f"K={K} IFT floor/grad {p['ift_floor_K_over_grad']:.2f}"
            + (
                f", compiled step/step {p['compiled_step_over_step']:.2f} (compile=true)"
                if "compiled_step_over_step" in p
                else ""
            )
        )
        table = Table(title=title, title_justify="left")
        cols = ["method", "note", "HVPs", "hg (ms)", "hg/step", "hg/grad", "hg/floor", "peak MiB", "mem", "run", "wall"]
        if name == "ptb":
            cols.append("tokens/s")
        for c in cols:
            table.add_column(c, justify="left" if c in ("method", "note") else "right")
        for mname, m in p["methods"].items():
            if "skipped" in m:
                table.add_row(mname, f"skipped: {m['skipped']}", *[""] * (len(cols) - 2))
                continue
            row = [
                mname,
                m.get("note", ""),
                fmt(m.get("hvps"), "d") if m.get("hvps") is not None else "",
                fmt(m.get("hg_ms"), ".1f"),
                fmt(m.get("hg_over_step")),
                fmt(m.get("hg_over_grad")),
                fmt(m.get("hg_over_floor")),
                fmt(m.get("mem_peak_mib"), ".1f"),
                fmt(m.get("mem_ratio")),
                fmt(m.get("run_ratio")),
                fmt(m.get("wall_ratio")),
            ]
            if len(cols) > 11:
                row.append(fmt(m.get("tokens_per_s"), ",.0f"))
            table.add_row(*row)
        console.print(table)
    t = Table(title="Targets", title_justify="left")
    for c in ("problem", "target", "value", "limit", "met"):
        t.add_column(c, justify="left" if c in ("problem", "target") else "right")
    for x in result["targets"]:
        t.add_row(x["problem"], x["target"], f"{x['value']:.2f}", f"{x['limit']:.1f}", "yes" if x["met"] else "no")
    console.print(t)


def main() -> None:
    global INNER_STEPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke test")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    ap.add_argument("--only", default="iris,mnist,ptb", help="comma-separated problems (iris, mnist, ptb)")
    ap.add_argument("--out", default="outputs/bench/bench.json", help="the JSON result")
    ap.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of methods (none is always run): "
        "neumann, neumann-nores, neumann-fused, cg, fixed_point, t1t2, truncated, unrolled, forward",
    )
    ap.add_argument("--threads", type=int, default=0, help="threads=N for every measurement (0: runner's policy)")
    ap.add_argument(
        "--budget",
        type=float,
        default=5.0,
        help="seconds of timing per measurement before stopping once the minimum rounds are done (default 5)",
    )
    ap.add_argument(
        "--compile",
        default=None,
        help="problems whose compile=true training step is also timed "
        "(default iris,mnist; none with --quick; '' for none)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    ap.add_argument("--no-runs", action="store_true", help="skip the whole-run comparisons")
    ap.add_argument("--runs-dir", default="outputs/bench/runs", help="where the whole runs write")
    ap.add_argument(
        "--peers",
        default=os.environ.get("HOEXP_PEERS"),
        help="folder with the peers' sources (hypertorch/, torchopt/) and a pip --target site/ for their "
        "needs (scripts/bench_peers.py); without it the peer problem runs hoexp and the direct solve only",
    )
    ap.add_argument("--no-peers", action="store_true", help="skip the peer problem")
    ap.add_argument(
        "--no-long-unroll",
        action="store_true",
        help=f"skip the T={LONG_T} unrolling memory section "
        "(the MNIST preset: stored trajectory against checkpointing; not run with --quick)",
    )
    ap.add_argument("--child-memory", help=argparse.SUPPRESS)
    ap.add_argument("--inner-steps", type=int, default=INNER_STEPS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    INNER_STEPS = args.inner_steps
    if args.compile is None:
        args.compile = "" if args.quick else "iris,mnist"
    if args.child_memory:
        problem, row = args.child_memory.split(":", 1)
        print(json.dumps(child_memory(problem, row, args)))
        return
    problems = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in problems if p not in PROBLEMS]
    if unknown:
        ap.error(f"unknown problem(s) {', '.join(unknown)}; choose from {', '.join(PROBLEMS)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    result: dict[str, Any] = {
        "meta": {
            "quick": args.quick,
            "device_requested": args.device,
            "threads_requested": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "inner_steps": INNER_STEPS,
            "K": K,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "statistic": "median over interleaved rounds",
        },
        "problems": {},
    }
    for problem in problems:
        log(f"[{time.perf_counter() - started:6.0f}s] {problem}: timing")
        p = time_problem(problem, args, log)
        result["problems"][problem] = p
        rows = [r for r in method_rows(problem, args.methods) if r.runs and "skipped" not in p["methods"][r.name]]
        if not args.no_memory:
            log(f"[{time.perf_counter() - started:6.0f}s] {problem}: memory, one fresh process per method")
            # --quick: the rows whose memory this suite is about (each is a fresh process: seconds apiece)
            mem_rows = [r for r in rows if not args.quick or r.name in ("neumann", "unrolled", "unrolled-ckpt", "none")]
            mem = {r.name: measure_memory(problem, r.name, args) for r in mem_rows}
            ref = mem.get("none", {})
            ref_peak = ref.get("persistent_bytes", 0) + ref.get("working_bytes", 0) if "error" not in ref else None
            for r in mem_rows:
                m, entry = mem[r.name], p["methods"][r.name]
                if "error" in m:
                    entry["mem_error"] = m["error"]
                    continue
                peak = m["persistent_bytes"] + m["working_bytes"]
                entry.update(
                    mem_peak_mib=peak / 2**20,
                    mem_persistent_mib=m["persistent_bytes"] / 2**20,
                    mem_working_mib=m["working_bytes"] / 2**20,
                    mem_how=m["how"],
                    mem_ratio=peak / ref_peak if ref_peak else None,
                )
        outer = PROBLEMS[problem][2][1 if args.quick else 0]
        if not args.no_runs and outer > 0:
            log(
                f"[{time.perf_counter() - started:6.0f}s] {problem}: whole runs, {outer} outer × {INNER_STEPS} "
                "inner steps, each paired with a none run"
            )
            none_row = next(r for r in rows if r.name == "none")
            refs: list[dict[str, Any]] = []
            for r in [r for r in rows if r.whole_run and r.name != "none"] + [none_row]:
                # Each method's run is paired with a `none` run right after it, so that a change of the
                # machine's load between runs does not enter the ratio (the shared CPUs here change a lot);
                # the none row's own entry is the first such reference.
                if r.name == "none":
                    run = ref = refs[0] if refs else whole_run(problem, none_row, args, outer)
                else:
                    run = whole_run(problem, r, args, outer)
                    ref = whole_run(problem, none_row, args, outer)
                    refs.append(ref)
                entry = p["methods"][r.name]
                entry["run"], entry["run_reference"] = run, ref
                if run.get("steady_median_s") and ref.get("steady_median_s"):
                    entry["run_ratio"] = run["steady_median_s"] / ref["steady_median_s"]
                if run.get("loop_s") and ref.get("loop_s"):
                    entry["run_ratio_all_steps"] = run["loop_s"] / ref["loop_s"]
                entry["wall_ratio"] = run["wall_s"] / ref["wall_s"]
        if problem == "ptb":
            tokens = tokens_per_step(problem, args.quick, args.device, args.threads)
            p["tokens_per_step"] = tokens
            step_ms = p["times_ms"]["step"]
            for r in method_rows(problem, args.methods):
                entry = p["methods"][r.name]
                if "skipped" in entry:
                    continue
                run = entry.get("run")
                if run and run.get("steady_median_s"):
                    entry["tokens_per_s"] = tokens * INNER_STEPS / run["steady_median_s"]
                # From the timings: T steps plus one hypergradient per outer step.
                per_outer_ms = INNER_STEPS * step_ms + entry.get("hg_ms", 0.0)
                entry["tokens_per_s_from_timings"] = tokens * INNER_STEPS / (per_outer_ms / 1e3)
                entry.setdefault("tokens_per_s", None)
    if "mnist" in problems and not args.quick and not args.no_long_unroll and not args.no_memory:
        log(f"[{time.perf_counter() - started:6.0f}s] long unroll: T={LONG_T} on the MNIST preset, memory and time")
        saved, INNER_STEPS = INNER_STEPS, LONG_T
        mem = {r.name: measure_memory("mnist_preset", r.name, args) for r in method_rows("mnist_preset")}
        INNER_STEPS = saved
        long: dict[str, Any] = {"inner_steps": LONG_T, "rows": mem}
        peak = {k: m["persistent_bytes"] + m["working_bytes"] for k, m in mem.items() if "error" not in m}
        if "none" in peak:
            long["mem_ratio"] = {k: v / peak["none"] for k, v in peak.items()}
        long.update(long_unroll_times(args))
        result["long_unroll"] = long
        log(
            f"  long unroll: memory / plain training {long.get('mem_ratio')}, checkpointed time / stored "
            f"{long.get('ckpt_time_over_stored')}"
        )
    if not args.no_peers:
        from bench_peers import print_table as print_peers
        from bench_peers import run_peers

        log(f"[{time.perf_counter() - started:6.0f}s] peer problem (logistic regression 1,000 × 100, float64)")
        result["peers"] = run_peers(
            args.peers, args.quick, compile_="cg" if args.quick else "all", log=lambda m: log(m)
        )
    result["targets"] = targets(result)
    result["meta"]["bench_wall_s"] = time.perf_counter() - started
    print_tables(result)
    if result.get("peers"):
        print_peers(result["peers"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out} ({result['meta']['bench_wall_s']:.0f} s)")


if __name__ == "__main__":
    run_main(main)
