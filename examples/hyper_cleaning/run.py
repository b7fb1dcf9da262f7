"""Measure data hyper-cleaning against its two baselines, over seeds, from Python (docs/bring-your-own.md).

    PYTHONPATH=examples/hyper_cleaning python examples/hyper_cleaning/run.py [--seeds 0,1,2] [--outer-steps 60]

Contenders, each with the same inner training (logistic regression, full-batch gradient descent):
* ``corrupted``: train on all 2,500 examples, half of them mislabeled (method=none, every weight 0.5);
* ``clean``: the oracle, train on the clean half only (method=none dataset.keep=clean);
* ``hyper-cleaning``: one weight per example tuned by IFT (cg_warm) on the 2,500 clean validation images.
Prints test accuracy (mean ± std) at the end and at the outer step of lowest validation loss (early stopping
on validation), wall time, and how well the learned weights separate the corrupted
examples (mean weight of clean / corrupted ones, and the F1 of "weight < 0.5" as a corruption detector).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cleaning import KEY, corrupted_mnist
from rich.console import Console

from hoexp.cli import compose_spec
from hoexp.components import DataContext
from hoexp.config.run import run_experiment

CONF = Path(__file__).resolve().parent / "conf"
CONTENDERS = {"corrupted": ["method=none"], "clean": ["method=none", "dataset.keep=clean"], "hyper-cleaning": []}


def run(overrides: list[str], out: Path) -> tuple[dict, float]:
    spec, text = compose_spec(["experiment=hyper_cleaning", "progress=false", *overrides], config_dir=CONF)
    t0 = time.perf_counter()
    summary = run_experiment(spec, out, config_text=text, console=Console(file=io.StringIO()))
    return summary, time.perf_counter() - t0


def separation(out: Path, seed: int) -> tuple[float, float, float]:
    """Mean weight of clean and corrupted examples, and the F1 of ``weight < 0.5`` as a corruption detector."""
    weights = torch.load(out / "final.pt", weights_only=True)["hparams"][KEY]
    corrupted = corrupted_mnist(DataContext(seed)).corrupted
    assert corrupted is not None
    flagged = weights < 0.5
    tp = float((flagged & corrupted).sum())
    precision, recall = tp / max(float(flagged.sum()), 1.0), tp / max(float(corrupted.sum()), 1.0)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return float(weights[~corrupted].mean()), float(weights[corrupted].mean()), f1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--outer-steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=5)
    ns = ap.parse_args()
    seeds = [int(s) for s in ns.seeds.split(",")]
    rows: dict[str, list[tuple[float, float, float, tuple | None]]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name, overrides in CONTENDERS.items():
                out = Path(tmp) / f"{name}_{seed}"
                summary, wall = run(
                    [*overrides, f"seed={seed}", f"outer_steps={ns.outer_steps}", f"eval_every={ns.eval_every}"], out
                )
                sep = separation(out, seed) if name == "hyper-cleaning" else None
                final, best = summary["final"]["test_acc"], summary["best"]["test_acc"]
                rows[name].append((final, best, wall, sep))
                print(
                    f"seed {seed} {name:15s} test acc {final:.4f} (at best val {best:.4f})  {wall:5.1f}s"
                    + (f"  weights clean {sep[0]:.3f} corrupted {sep[1]:.3f} F1 {sep[2]:.3f}" if sep else "")
                )

    def ms(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"

    print(
        f"\n| contender (seeds {ns.seeds}) | test accuracy, final | at the best validation loss | wall time (s) |"
        "\n|---|---|---|---|"
    )
    for name, r in rows.items():
        print(
            f"| {name} | {ms([r_[0] for r_ in r])} | {ms([r_[1] for r_ in r])} | "
            f"{statistics.mean(r_[2] for r_ in r):.1f} |"
        )
    seps = [r_[3] for r_ in rows["hyper-cleaning"] if r_[3]]
    print(
        f"\nhyper-cleaning weights: clean {ms([s[0] for s in seps])}, corrupted {ms([s[1] for s in seps])}, "
        f"detection F1 {ms([s[2] for s in seps])}"
    )


if __name__ == "__main__":
    main()
