"""``hoexp.hypergradient(..., compile=True)`` against eager on the peer problem (``bench_peers.make_problem``).

    python scripts/bench_api_compile.py [--rounds 30] [--json out.json]

The peer problem (logistic regression, n = 1,000, p = 100, float64, one thread); Neumann-10 with
``α = 1/λ_max`` and CG-10, called as a user calls the API: the same two loss functions every call.
Reports the median call time of each, wall clock and this thread's CPU time (the one to compare on a
shared machine), after one warm-up call (which compiles), the compiled cache's
size, and Dynamo's counters over the timed calls (frames converted, graphs compiled: 0 expected).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import K, make_problem  # noqa: E402

import hoexp  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    prob = make_problem()
    w, lam = {"w": prob.w}, {"lam": prob.lam}
    tl = lambda W, H: prob.train_loss(W["w"], H["lam"])  # noqa: E731
    vl = lambda W, H: prob.val_loss(W["w"], H["lam"])  # noqa: E731
    cases: dict[str, dict[str, Any]] = {
        "Neumann-10": dict(method="neumann", iterations=K, alpha=prob.alpha, residual=False),
        "CG-10": dict(method="cg", iterations=K, tol=0.0),
    }
    from torch._dynamo.utils import counters

    from hoexp import api

    out: dict = {}
    for name, opts in cases.items():
        for compiled in (False, True):
            call = lambda: hoexp.hypergradient(tl, vl, w, lam, compile=compiled, **opts)  # noqa: E731
            t0 = time.perf_counter()
            call()  # warm-up (compiles)
            first = time.perf_counter() - t0
            counters.clear()
            times, cpu = [], []
            for _ in range(args.rounds):
                t0, c0 = time.perf_counter(), time.thread_time()
                call()
                times.append(time.perf_counter() - t0)
                cpu.append(time.thread_time() - c0)
            key = f"{name} {'compiled' if compiled else 'eager'}"
            out[key] = {
                "median_ms": 1e3 * statistics.median(times),
                "median_cpu_ms": 1e3 * statistics.median(cpu),  # this thread's CPU time: robust to a shared machine
                "first_call_s": first,
                "frames_converted": counters["frames"][
                    "total"
                ],  # Dynamo compiles (or re-compiles) during the timed calls
                "graphs": counters["stats"]["unique_graphs"],
                "cache_entries": len(api._COMPILED),
            }
            print(
                f"{key:22s} {out[key]['median_ms']:7.2f} ms wall, {out[key]['median_cpu_ms']:7.2f} ms CPU  (first call {first:.2f} s, "
                f"frames converted {out[key]['frames_converted']}, graphs {out[key]['graphs']}, cache {len(api._COMPILED)})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
