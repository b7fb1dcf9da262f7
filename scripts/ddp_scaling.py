"""One HO run on 1 process and on N processes (torchrun): time per outer step and whether the results match.

    python scripts/ddp_scaling.py                                   # MNIST MLP preset, 1 vs 2 processes, CPU
    python scripts/ddp_scaling.py --procs 1,2,4 outer_steps=5 method=cg
    python scripts/ddp_scaling.py --out outputs/ddp device=cuda precision=bf16

Every other argument is a ``hoexp run`` override (default: ``experiment=mnist_per_weight_decay
outer_steps=6 progress=false``). Per process count: the median of ``time/outer_step_s`` over the outer
steps after the first (which pays for warm-up), the final validation loss, and the largest difference from
the 1-process run's logged values (``metrics.jsonl``, every outer step). A float32 run on N processes adds
the N shards' gradients in another order than one process adds the whole batch's: the results agree to
rounding at first and drift apart slowly; with ``dtype=float64`` they agree to ~1e-12.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hoexp.errors import HoexpError, run_main

DEFAULTS = ["experiment=mnist_per_weight_decay", "outer_steps=6", "progress=false"]


def _run(procs: int, overrides: list[str], folder: Path) -> dict:
    base = (
        [sys.executable, "-m", "hoexp", "run"]
        if procs == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "hoexp",
            "run",
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    r = subprocess.run([*base, *overrides, f"hydra.run.dir={folder}"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-1:] or ["?"]
        raise HoexpError(f"the {procs}-process run failed: {tail[0]}")
    lines = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [ln["time/outer_step_s"] for ln in lines if "time/outer_step_s" in ln]
    return {
        "procs": procs,
        "outer_step_s": statistics.median(steps[1:] or steps),
        "wall_s": wall,
        "final_val_loss": lines[-1].get("loss/val"),
        "metrics": lines,
    }


def _max_diff(a: list[dict], b: list[dict]) -> float:
    """The largest relative difference between two runs' logged values (time and counters left out)."""
    worst = 0.0
    for x, y in zip(a, b):
        for k, v in x.items():
            if k.startswith("time/") or not isinstance(v, float) or not isinstance(y.get(k), float):
                continue
            worst = max(worst, abs(v - y[k]) / max(abs(v), 1e-12))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(prog="ddp_scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,2", help="process counts (comma-separated; the first is the reference)")
    ap.add_argument("--out", default="outputs/ddp_scaling", help="folder for the runs and ddp_scaling.json")
    ns, overrides = ap.parse_known_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*DEFAULTS, *overrides]
    rows: list[dict] = []
    for procs in (int(p) for p in ns.procs.split(",")):
        row = _run(procs, overrides, out / f"procs{procs}_{time.strftime('%H%M%S')}")
        row["max_rel_diff"] = _max_diff(rows[0]["metrics"], row["metrics"]) if rows else 0.0
        rows.append(row)
        print(
            f"{procs} process(es): {row['outer_step_s'] * 1000:8.1f} ms per outer step (median), wall "
            f"{row['wall_s']:.1f} s, final val loss {row['final_val_loss']:.6f}, largest relative difference "
            f"from the first run {row['max_rel_diff']:.2e}",
            flush=True,
        )
    (out / "ddp_scaling.json").write_text(
        json.dumps(
            {"overrides": overrides, "rows": [{k: v for k, v in r.items() if k != "metrics"} for r in rows]}, indent=2
        )
    )


if __name__ == "__main__":
    run_main(main, "ddp_scaling")
