"""``hoexp check``: every applicable method's hypergradient against a reference, on the configured problem.

After ``inner_steps`` training steps from the configured initialization, the IFT methods (Neumann,
fixed-point, CG, T1-T2) are compared with the exact IFT hypergradient (a dense Hessian solve when
the model has at most ``dense_max`` weights, otherwise a long CG run, stated in the output), and
the path methods (truncated, forward) with a full unroll of ``inner_steps`` further steps. Each is
swept over its iteration count; reported: cosine similarity, relative l2 error, time, and the
memory the autograd graph holds (bytes of tensors saved for backward, peak CUDA memory on a GPU).
Output: a rich table, ``check.json`` and ``check.png`` (in the style of Lorraine et al. Fig. 3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from hoexp import tree
from hoexp.config import Spec
from hoexp.config.build import Experiment, Prebuilt, build
from hoexp.engine.metrics import write_json_atomic
from hoexp.engine.state import start
from hoexp.engine.step import PLAIN, draw
from hoexp.errors import ConfigError
from hoexp.method.forward import forward_hypergradient
from hoexp.method.ift import ift_hypergradient
from hoexp.method.solvers import AutoStep, ConjugateGradient, Exact, FixedPoint, Neumann, Solver
from hoexp.method.unrolled import unrolled_hypergradient
from hoexp.tools.outdir import pyplot
from hoexp.types import InnerState

ITERATIONS = (0, 1, 2, 5, 10, 20, 50, 100)
REFERENCE_TOL = 1e-3  # a reference whose relative residual ‖Hx − b‖/‖b‖ exceeds this is not converged


def check_options(
    iterations: str, dense_max: int, at: str | None = None, eps: float = 0.05
) -> tuple[tuple[int, ...], list[int] | None]:
    """``hoexp check``'s numeric options, each refused in one line outside its meaning: ``--iterations``
    integers >= 0, ``--dense-max`` >= 0 (0: always the CG reference), ``--at`` outer steps >= 0 (their
    upper bound, ``outer_steps``, is checked with the config), ``--eps`` finite and > 0."""

    def ints(text: str, flag: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(f"{flag} must be comma-separated integers, got '{text}'") from None
        if any(v < 0 for v in values):
            raise ConfigError(f"{flag} must be integers >= 0, got '{text}'")
        return values

    if dense_max < 0:
        raise ConfigError(f"--dense-max must be >= 0 (weights; 0: always the CG reference), got {dense_max}")
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"--eps must be a finite number > 0, got {eps}")
    return tuple(ints(iterations, "--iterations")), None if at is None else ints(at, "--at")


@dataclass
class Row:
    method: str
    iterations: int
    cosine: float
    rel_error: float
    time_s: float
    graph_mib: float
    residual: float | None = None
    info: str = ""
    against: str = "ift"  # its reference: "ift" (the exact IFT hypergradient) or "path" (the full unroll)


class GraphMemory:
    """Bytes of distinct tensor storages saved for backward while the context is active (+ CUDA peak)."""

    def __init__(self, device: torch.device, hooks: bool = True):
        self.device = device
        self.hooks = hooks
        self.seen: set[int] = set()
        self.bytes = 0

    def _pack(self, t: Tensor) -> Tensor:
        try:
            key = t.untyped_storage().data_ptr()
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. functorch wrappers without storage
            self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self) -> GraphMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t) if self.hooks else None
        if self._hooks is not None:
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = max(self.bytes, torch.cuda.max_memory_allocated() - self._base)

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def _compare(
    fn: Callable[[], tuple[dict[str, Tensor], Any]], reference: Tensor, device: torch.device, hooks: bool = True
) -> tuple[float, float, float, float, Any]:
    # torch.func transforms (forward mode) refuse saved-tensor hooks; they keep no graph between steps.
    with GraphMemory(device, hooks) as mem:
        t0 = time.perf_counter()
        hg, extra = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    flat = tree.flatten(hg.values()).double()
    ref = reference.double()
    cos = float(torch.nn.functional.cosine_similarity(flat, ref, dim=0)) if flat.norm() > 0 else 0.0
    err = float((flat - ref).norm() / ref.norm()) if ref.norm() > 0 else math.inf
    return cos, err, elapsed, mem.mib, extra


@dataclass
class _Point:
    """The configured problem after ``inner_steps`` training steps: the losses on one training batch and the
    run's validation batch, at the trained state."""

    spec: Spec
    exp: Experiment
    state: InnerState
    raw: dict[str, Tensor]
    tl: Callable[[Any, Any], Tensor]  # L_T(w, λ) on the training batch
    vl: Callable[[Any, Any], Tensor]  # L_V(w, λ) on the validation batch
    path_loss: Callable[[Any, Any, int], Tensor]  # L_T at every unrolled step: the same batch

    @property
    def device(self) -> torch.device:
        return self.exp.device


def _trained_point(spec: Spec, prebuilt: Prebuilt | None = None) -> _Point:
    """Build the run, take its start (weights, hyperparameters, streams) and its first outer step of plain training
    (``inner_steps`` steps); the losses are on the next training batch and that step's validation batch."""
    exp: Experiment = build(spec, prebuilt=prebuilt)
    problem = exp.problem
    start_state = start(exp)  # the runner's start: weights, hyperparameters, streams
    raw = start_state.raw
    # The engine's outer step; its validation batch is the run's: the whole split (classification,
    # val_batch_size 0), a seeded minibatch, or a BPTT window of validation text (language models).
    step = draw(exp, PLAIN, start_state.inner, raw, start_state.train, start_state.val)
    state, val_batch, train_batch = PLAIN(step).inner, step.val, next(start_state.train)

    def tl(w, h):
        return problem.train_loss(w, h, train_batch)

    def vl(w, h):
        return problem.val_loss(w, h, val_batch)

    def path_loss(w, h, t):
        return problem.train_loss(w, h, train_batch)

    return _Point(spec, exp, state, raw, tl, vl, path_loss)


def _ift_rows(
    pt: _Point, alpha: float, iterations: tuple[int, ...], dense_max: int, reference_cg: int, console: Console
) -> tuple[list[Row], str, str | None]:
    """The IFT methods (Neumann, fixed-point, CG over ``iterations``; T1-T2) against the exact IFT
    hypergradient: ``(rows, the reference's name, why it is not the answer or None)``."""
    tl, vl, w, raw, dev = pt.tl, pt.vl, pt.state.params, pt.raw, pt.device
    n_params = tree.numel(w)
    if n_params <= dense_max:
        ref_name = f"exact dense solve ({n_params:,}×{n_params:,} Hessian)"
        ref_solver: Solver = Exact(max_params=dense_max)
    else:
        ref_name = f"CG, {reference_cg} iterations ({n_params:,} weights > --dense-max {dense_max:,})"
        ref_solver = ConjugateGradient(reference_cg, tol=0.0)
    t0 = time.perf_counter()
    ref_hg, ref_stats = ift_hypergradient(tl, vl, w, raw, ref_solver)
    ref_time = time.perf_counter() - t0
    ift_ref = tree.flatten(ref_hg.values())
    console.print(
        f"IFT reference: {ref_name}, {ref_time:.1f}s, residual {ref_stats.residual:.2e}, "
        f"inner gradient norm {ref_stats.inner_grad_norm:.3e}",
        highlight=False,
    )
    ref_problem = _reference_problem(ref_stats.residual, ift_ref, ref_stats.info, n_params, dense_max)
    solvers: list[tuple[str, Callable[[int], Any]]] = [
        ("neumann", lambda k: Neumann(k, alpha)),
        ("fixed_point", lambda k: FixedPoint(k, alpha)),
        ("cg", lambda k: ConjugateGradient(k, tol=0.0)),
    ]
    rows: list[Row] = []
    for name, make in solvers:
        for k in iterations:
            cos, err, el, mib, stats = _compare(lambda: ift_hypergradient(tl, vl, w, raw, make(k)), ift_ref, dev)
            rows.append(Row(name, k, cos, err, el, mib, stats.residual, stats.info))
    cos, err, el, mib, stats = _compare(
        lambda: ift_hypergradient(tl, vl, w, raw, Neumann(0, alpha, residual=False)), ift_ref, dev
    )
    rows.append(Row("t1t2", 0, cos, err, el, mib, None, ""))
    return rows, ref_name, ref_problem


def _path_rows(pt: _Point, iterations: tuple[int, ...]) -> tuple[list[Row], str | None]:
    """The path methods (truncated over ``iterations``, forward mode) against the full unroll of
    ``inner_steps`` further steps: ``(rows, why the reference is not the answer or None)``."""
    spec, exp, state, raw, vl, path_loss = pt.spec, pt.exp, pt.state, pt.raw, pt.vl, pt.path_loss
    T = spec.run.inner_steps
    overrides = exp.problem.family.optimizer_overrides
    path = (path_loss, vl, exp.inner_opt, state.params, state.opt_state, raw, T)  # the path methods' arguments
    full = unrolled_hypergradient(*path, overrides=overrides)
    unroll_ref = tree.flatten(full.hypergrad.values())
    path_problem = None if unroll_ref.norm() > 0 else "is zero: cosines and relative errors against it mean nothing"
    rows: list[Row] = []
    for k in sorted({k for k in iterations if 0 < k <= T} | {T}):
        truncated = lambda: (unrolled_hypergradient(*path, truncate=k, overrides=overrides).hypergrad, None)  # noqa: E731
        cos, err, el, mib, _ = _compare(truncated, unroll_ref, pt.device)
        rows.append(Row("truncated" if k < T else "unrolled", k, cos, err, el, mib, against="path"))
    if tree.numel(raw) <= getattr(spec.method, "max_hparams", 64):
        forward = lambda: (forward_hypergradient(*path, overrides=overrides).hypergrad, None)  # noqa: E731
        cos, err, el, mib, _ = _compare(forward, unroll_ref, pt.device, hooks=False)
        rows.append(Row("forward", T, cos, err, el, mib, info="no graph kept across steps", against="path"))
    return rows, path_problem


def run_check(
    spec: Spec,
    out_dir: Path,
    *,
    iterations: tuple[int, ...] = ITERATIONS,
    dense_max: int = 20_000,
    reference_cg: int = 2000,
    console: Console | None = None,
    prebuilt: Prebuilt | None = None,
) -> dict[str, Any]:
    """Compare every applicable method with a reference; write check.json / check.png into ``out_dir``.
    ``prebuilt``: what the checks of ``spec`` built (:func:`~hoexp.config.build.preflight`), not built again."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    pt = _trained_point(spec, prebuilt)
    alpha = getattr(spec.method, "alpha", 0.01)
    if alpha == "auto":  # 1/λ_max(H) at the trained weights, by power iteration
        alpha = ift_hypergradient(pt.tl, pt.vl, pt.state.params, pt.raw, AutoStep(Neumann(0)))[1].extra["solver/alpha"]
    rows: list[Row] = []
    ref_name, ref_problem = "(IFT methods do not apply to this family)", None
    if pt.exp.problem.family.moves_optimum:
        rows, ref_name, ref_problem = _ift_rows(pt, alpha, iterations, dense_max, reference_cg, console)
    path_rows, path_problem = _path_rows(pt, iterations)
    rows += path_rows
    report: dict[str, Any] = {
        "problem": {
            "dataset": spec.dataset.name,
            "model": spec.model.name,
            "hp": spec.hp_name,
            "granularity": ",".join(str(getattr(h, "granularity", "")) for h in spec.hp),
            "num_params": tree.numel(pt.state.params),
            "num_hparams": tree.numel(pt.raw),
            "inner_steps": spec.run.inner_steps,
            "alpha": alpha,
            "device": str(pt.device),
        },
        "ift_reference": ref_name,
        "ift_reference_problem": ref_problem,  # None: converged
        "path_reference": f"full unroll of {spec.run.inner_steps} steps of {spec.inner_optim.name}",
        "path_reference_problem": path_problem,
    }
    _write(rows, report, out_dir, console)
    return report


def _write(rows: list[Row], report: dict[str, Any], out_dir: Path, console: Console) -> None:
    """Note on each row whose reference is not the answer, then write check.json, check.png and the table."""
    for r in rows:
        row_problem = report["path_reference_problem"] if r.against == "path" else report["ift_reference_problem"]
        if row_problem:
            note = "reference " + row_problem.split(":")[0]  # "reference not converged" / "reference is zero"
            r.info = f"{r.info}; {note}" if r.info else note
    report["rows"] = [asdict(r) for r in rows]
    write_json_atomic(out_dir / "check.json", report)
    _plot(rows, out_dir / "check.png", report["ift_reference"])
    _table(rows, report, console)
    console.print(f"wrote {out_dir / 'check.json'} and {out_dir / 'check.png'}", highlight=False)


def _reference_problem(residual: float | None, ref: Tensor, info: str, n_params: int, dense_max: int) -> str | None:
    """Why the IFT reference is not the exact hypergradient, as ``"not converged: ..."`` (a relative residual
    above :data:`REFERENCE_TOL`) or ``"is zero: ..."`` (cosines and relative errors are then undefined); None
    when it is."""
    if not bool(ref.norm() > 0):
        return "is zero: cosines and relative errors against it mean nothing"
    if residual is not None and math.isfinite(residual) and residual <= REFERENCE_TOL:
        return None
    fix = (
        f"pass --dense-max {n_params} (or more) for an exact dense solve"
        if n_params > dense_max
        else "the Hessian is singular or indefinite here: train longer (inner_steps) toward a minimum"
    )
    return (
        f"not converged: relative residual {residual if residual is not None else math.nan:.3g} > {REFERENCE_TOL:g}"
        + (f" ({info})" if info else "")
        + f"; the IFT rows compare with an unconverged reference: {fix}"
    )


def _table(rows: list[Row], report: dict, console: Console) -> None:
    p = report["problem"]
    table = Table(
        title=f"hoexp check: {p['dataset']} / {p['model']} ({p['num_params']:,} weights), "
        f"hp={p['hp']} ({p['num_hparams']:,}), α={p['alpha']}"
    )
    for col in ("method", "iterations", "cosine", "rel. l2 error", "time (ms)", "graph (MiB)", "residual", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in rows:
        table.add_row(
            r.method,
            str(r.iterations),
            f"{r.cosine:.4f}",
            f"{r.rel_error:.3g}",
            f"{r.time_s * 1e3:.1f}",
            f"{r.graph_mib:.2f}",
            "" if r.residual is None else f"{r.residual:.3g}",
            r.info,
        )
    console.print(table)
    console.print(
        f"IFT methods vs {report['ift_reference']}; truncated/forward vs {report['path_reference']}", highlight=False
    )
    for key, what in (("ift_reference_problem", "IFT"), ("path_reference_problem", "truncated/forward")):
        if report.get(key):
            console.print(f"{what} reference {report[key]}", highlight=False, markup=False)


def _plot(rows: list[Row], path: Path, ref_name: str) -> None:
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for method in ("neumann", "fixed_point", "cg", "truncated"):
        pts = [(r.iterations, r.cosine, r.rel_error) for r in rows if r.method == method]
        if not pts:
            continue
        ks, cos, err = zip(*pts)
        xs = [k + 1 for k in ks]  # log axis: iterations + 1
        label = f"{method} (vs full unroll)" if method == "truncated" else method
        ax1.plot(xs, cos, marker="o", label=label)
        ax2.plot(xs, err, marker="o", label=label)
    ax1.set_xscale("log"), ax2.set_xscale("log"), ax2.set_yscale("log")
    ax1.set_xlabel("iterations + 1"), ax2.set_xlabel("iterations + 1")
    ax1.set_ylabel("cosine similarity to reference"), ax2.set_ylabel("relative l2 error")
    ax1.legend(fontsize=8)
    fig.suptitle(f"IFT methods vs {ref_name}; truncated vs the full unroll", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
