"""Peer benchmark: one IFT hypergradient of a small problem, hoexp against hypertorch, torchopt and jaxopt.

    python scripts/bench_peers.py --peers /path/to/peers        # alone (bench.py runs it too: --peers)
    python scripts/bench_peers.py --quick                       # hoexp only unless --peers is given

The problem (the standard small one of the bilevel-optimization libraries): L2-regularized logistic
regression on ``n = 1,000`` synthetic examples with ``p = 100`` features, one decay per feature
(``L_T = mean BCE + ½ Σ_j exp(λ_j) w_j²``, ``L_V`` = mean BCE on 1,000 validation examples), float64,
one thread. The inner problem is solved to machine precision by Newton's method, so the IFT is
exact at ``w*``; the truth is a dense direct solve (``H = Xᵀ D X / n + diag(e^λ)``, formed by hand,
``torch.linalg.solve``). Each contender computes ``dL_V/dλ`` at ``w*``: CG with 10 iterations
(``CG-10``), a 10-term Neumann series with ``α = 1/λ_max(H)`` (``Neumann-10``), and hoexp's
``method=exact``; times are medians over interleaved rounds (one call of every contender per
round), errors ``‖hg − truth‖/‖truth‖``.

Peers are not dependencies: ``--peers DIR`` names a folder holding source checkouts
``DIR/hypertorch`` (github prolearner/hypertorch: its ``hypergrad`` package) and ``DIR/torchopt``
(github metaopt/torchopt, imported from source: its pure-Python parts; the C++ ops are not used), and
``DIR/site``, a ``pip install --target`` folder for what they need that this environment lacks
(``optree graphviz`` for torchopt, ``jax jaxopt`` for jaxopt). A peer that cannot be imported is
skipped with the reason.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

import hoexp
from hoexp.errors import run_main
from hoexp.method.solvers import ConjugateGradient, Exact, Neumann, Solver

K = 10


@dataclass
class LogReg:
    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    lam: torch.Tensor  # log-decays, one per feature
    w: torch.Tensor  # the inner optimum
    alpha: float  # 1/λ_max(H): the Neumann step every contender uses

    def train_loss(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return (
            torch.nn.functional.binary_cross_entropy_with_logits(self.X @ w, self.y)
            + 0.5 * (lam.exp() * w.square()).sum()
        )

    def val_loss(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(self.Xv @ w, self.yv)

    def hessian(self) -> torch.Tensor:
        s = torch.sigmoid(self.X @ self.w)
        return self.X.T @ ((s * (1 - s) / len(self.y))[:, None] * self.X) + torch.diag(self.lam.exp())

    def direct(self) -> torch.Tensor:
        """The truth: ``−diag(e^λ w) H⁻¹ ∂L_V/∂w`` with ``H`` formed by hand and a dense solve."""
        v = self.Xv.T @ (torch.sigmoid(self.Xv @ self.w) - self.yv) / len(self.yv)
        return -(self.lam.exp() * self.w) * torch.linalg.solve(self.hessian(), v)


def make_problem(n: int = 1000, p: int = 100, seed: int = 0) -> LogReg:
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    w_true = torch.randn(p, generator=g, dtype=d)
    X, Xv = torch.randn(n, p, generator=g, dtype=d), torch.randn(n, p, generator=g, dtype=d)
    y = (X @ w_true + torch.randn(n, generator=g, dtype=d) > 0).to(d)
    yv = (Xv @ w_true + torch.randn(n, generator=g, dtype=d) > 0).to(d)
    lam = torch.linspace(-3.0, 0.0, p, dtype=d)
    prob = LogReg(X, y, Xv, yv, lam, torch.zeros(p, dtype=d), 1.0)
    for _ in range(50):  # Newton to machine precision
        w = prob.w.detach().requires_grad_(True)
        (g_,) = torch.autograd.grad(prob.train_loss(w, lam), w)
        prob.w = (prob.w - torch.linalg.solve(prob.hessian(), g_)).detach()
        if float(g_.norm()) < 1e-14:
            break
    prob.alpha = 1.0 / float(torch.linalg.eigvalsh(prob.hessian())[-1])
    return prob


# ----------------------------------------------------------------------------------- peers
def add_peer_paths(folder: str | None) -> dict[str, str]:
    """Puts the peers' source folders (and ``site``) on ``sys.path``; returns ``{peer: why not}`` for
    those that cannot be imported."""
    missing: dict[str, str] = {}
    if folder:
        root = Path(folder)
        for sub in ("hypertorch", "torchopt"):
            if (root / sub).is_dir() and str(root / sub) not in sys.path:
                sys.path.insert(0, str(root / sub))
        if (root / "site").is_dir() and str(root / "site") not in sys.path:
            sys.path.append(str(root / "site"))  # after the environment: its numpy etc. win
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    for name, module in (("hypertorch", "hypergrad"), ("torchopt", "torchopt"), ("jaxopt", "jaxopt")):
        if not folder:
            missing[name] = "no --peers folder"
            continue
        try:
            __import__(module)
        except Exception as e:  # ImportError, or a peer broken against this torch
            missing[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return missing


def hypertorch_fns(prob: LogReg) -> dict[str, Callable[[], torch.Tensor]]:
    import hypergrad

    def fp_map(params: list, hparams: list) -> list:  # one gradient step: H⁻¹ through (I − ∂Φ/∂w)
        w, lam = params[0], hparams[0]
        (g,) = torch.autograd.grad(prob.train_loss(w, lam), w, create_graph=True)
        return [w - prob.alpha * g]

    def outer(params: list, hparams: list) -> torch.Tensor:
        return prob.val_loss(params[0], hparams[0])

    def run(fn: Callable[..., list], **kw: Any) -> torch.Tensor:
        lam = prob.lam.clone().requires_grad_(True)
        return fn([prob.w], [lam], K=K, fp_map=fp_map, outer_loss=outer, set_grad=False, **kw)[0]

    return {"CG-10": lambda: run(hypergrad.CG, tol=0.0), "Neumann-10": lambda: run(hypergrad.neumann, tol=0.0)}


def torchopt_fns(prob: LogReg) -> dict[str, Callable[[], torch.Tensor]]:
    import torchopt
    from torchopt.diff.implicit import custom_root

    def optimality(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:  # as torchopt's examples write it
        return torch.func.grad(prob.train_loss)(w, lam)

    def make(solve: Any) -> Callable[[], torch.Tensor]:
        @custom_root(optimality, argnums=1, solve=solve)
        def solver(w0: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            return prob.w.clone()  # the inner problem is solved already

        def run() -> torch.Tensor:
            lam = prob.lam.clone().requires_grad_(True)
            return torch.autograd.grad(prob.val_loss(solver(prob.w, lam), lam), lam)[0]

        return run

    return {
        "CG-10": make(torchopt.linear_solve.solve_cg(maxiter=K, rtol=0.0, atol=0.0)),
        "Neumann-10": make(torchopt.linear_solve.solve_inv(ns=True, maxiter=K, alpha=prob.alpha)),
    }


def jaxopt_fns(prob: LogReg) -> dict[str, Callable[[], torch.Tensor]]:
    import jax
    import jax.numpy as jnp
    from jaxopt import implicit_diff, linear_solve

    jax.config.update("jax_enable_x64", True)
    X, y, Xv, yv = (jnp.asarray(t.numpy()) for t in (prob.X, prob.y, prob.Xv, prob.yv))
    w_star, lam0 = jnp.asarray(prob.w.numpy()), jnp.asarray(prob.lam.numpy())

    def bce(z: Any, t: Any) -> Any:
        return jnp.mean(jnp.logaddexp(0.0, z) - t * z)

    def train(w: Any, lam: Any) -> Any:
        return bce(X @ w, y) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)

    def neumann(matvec: Callable[[Any], Any], b: Any) -> Any:
        def body(_: int, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            term, total = carry
            term = term - prob.alpha * matvec(term)
            return term, total + term

        return prob.alpha * jax.lax.fori_loop(0, K, body, (b, b))[1]

    def make(solve: Any) -> Callable[[], torch.Tensor]:
        @implicit_diff.custom_root(jax.grad(train), solve=solve)
        def solver(w0: Any, lam: Any) -> Any:
            return w_star

        hg = jax.jit(jax.grad(lambda lam: bce(Xv @ solver(w_star, lam), yv)))

        def run() -> torch.Tensor:
            return torch.from_numpy(jax.device_get(hg(lam0).block_until_ready()).copy())

        return run

    return {
        "CG-10": make(lambda matvec, b: linear_solve.solve_cg(matvec, b, maxiter=K, tol=0.0)),
        "Neumann-10": make(neumann),
    }


# ----------------------------------------------------------------------------------- hoexp
def hoexp_fns(prob: LogReg, compile_: str) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, Any]]:
    """hoexp's eager ``hoexp.hypergradient`` and the compiled IFT (first call timed) for ``compile_``:
    ``all``, ``cg`` or ``none``."""
    w, lam = {"w": prob.w}, {"lam": prob.lam}
    tl = lambda W, H: prob.train_loss(W["w"], H["lam"])  # noqa: E731
    vl = lambda W, H: prob.val_loss(W["w"], H["lam"])  # noqa: E731
    opts: dict[str, dict[str, Any]] = {
        "CG-10": dict(method="cg", iterations=K, tol=0.0),
        "Neumann-10": dict(method="neumann", iterations=K, alpha=prob.alpha, residual=False),
        "exact": dict(method="exact"),
    }
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    info: dict[str, Any] = {}

    def eager(o: dict[str, Any]) -> Callable[[], torch.Tensor]:
        return lambda: cast(dict, hoexp.hypergradient(tl, vl, w, lam, **o))["lam"]

    for name, o in opts.items():
        fns[name] = eager(o)
    solvers: dict[str, Solver] = {
        "CG-10": ConjugateGradient(K, 0.0),
        "Neumann-10": Neumann(K, prob.alpha, residual=False),
        "exact": Exact(),
    }
    for name, solver in solvers.items():
        if compile_ == "all" or (compile_ == "cg" and name == "CG-10"):
            from hoexp.method.ift import CompiledIFT

            # reverse-over-reverse: measured faster than forward-over-reverse compiled here (4.9 vs 10.6 ms)
            c = CompiledIFT(solver, tl, vl, hvp="rev_rev")
            t0 = time.perf_counter()
            c(w, lam)
            info[f"{name} compiled"] = {"first_call_s": time.perf_counter() - t0, "fallback": c.fallback}
            fns[f"{name} compiled"] = functools.partial(lambda c: c(w, lam)[0]["lam"], c)
    return fns, info


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, budget_s: float) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if r >= 4 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def run_peers(
    peers: str | None, quick: bool = False, compile_: str = "all", log: Callable[[str], None] = print
) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        missing = add_peer_paths(peers)
        prob = make_problem()
        truth = prob.direct()
        fns: dict[str, Callable[[], torch.Tensor]] = {"direct solve": prob.direct}
        hx, info = hoexp_fns(prob, compile_)
        fns.update({f"hoexp {k}": f for k, f in hx.items()})
        for name, make in (("hypertorch", hypertorch_fns), ("torchopt", torchopt_fns), ("jaxopt", jaxopt_fns)):
            if name in missing:
                continue
            try:
                fns.update({f"{name} {k}": f for k, f in make(prob).items()})
            except Exception as e:  # a peer broken against this environment
                missing[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        errors = {}
        for k, fn in list(fns.items()):
            try:
                errors[k] = float(torch.linalg.vector_norm(fn().detach() - truth) / torch.linalg.vector_norm(truth))
            except Exception as e:
                del fns[k]
                missing[k] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        t = interleaved(fns, rounds=10 if quick else 200, budget_s=3.0 if quick else 20.0)
        out: dict[str, Any] = {
            "n": len(prob.y),
            "p": prob.X.shape[1],
            "K": K,
            "alpha": prob.alpha,
            "times_ms": {k: 1e3 * v for k, v in t.items()},
            "rel_error": errors,
            "skipped": missing,
            "compile": info,
        }
        ratios: dict[str, float] = {}
        for solver in ("CG-10", "Neumann-10"):
            for variant in ("", " compiled"):
                mine = t.get(f"hoexp {solver}{variant}")
                if mine is None:
                    continue
                for peer in ("hypertorch", "torchopt", "jaxopt"):
                    if f"{peer} {solver}" in t:
                        ratios[f"hoexp {solver}{variant} / {peer}"] = mine / t[f"{peer} {solver}"]
        for variant in ("", " compiled"):
            if f"hoexp exact{variant}" in t:
                ratios[f"hoexp exact{variant} / direct solve"] = t[f"hoexp exact{variant}"] / t["direct solve"]
        out["ratios"] = ratios
        for k in t:
            log(f"  peers {k}: {1e3 * t[k]:.3f} ms, relative error {errors[k]:.1e}")
        for k, why in missing.items():
            log(f"  peers {k}: skipped ({why})")
        return out
    finally:
        torch.set_num_threads(threads)


def print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"Peer problem: logistic regression {res['n']:,} × {res['p']} features, one decay per "
        f"feature, float64, one thread, one hypergradient at w* (Neumann α = 1/λ_max = {res['alpha']:.3f})",
        title_justify="left",
    )
    for c in ("contender", "ms", "relative error vs direct solve"):
        t.add_column(c, justify="left" if c == "contender" else "right")
    for k, ms in res["times_ms"].items():
        err = res["rel_error"][k]
        t.add_row(k, f"{ms:.3f}", f"{err:.1e}" if math.isfinite(err) else "–")
    for k, why in res["skipped"].items():
        t.add_row(k, "skipped", why[:80])
    for k, v in res["ratios"].items():
        t.add_row(k, f"{v:.2f}×", "")
    Console(width=160).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--peers",
        default=os.environ.get("HOEXP_PEERS"),
        help="folder with hypertorch/, torchopt/ "
        "and site/ (default $HOEXP_PEERS; without it only hoexp and the direct solve run)",
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--compile",
        default="all",
        choices=("all", "cg", "none"),
        help="which of hoexp's compiled hypergradients to time (default all)",
    )
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()
    res = run_peers(args.peers, args.quick, args.compile, log=lambda m: print(m, file=sys.stderr))
    print_table(res)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    run_main(main)
