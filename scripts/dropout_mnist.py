"""Per-unit dropout HO on an MNIST MLP against the best fixed dropout rate of {0, 0.2, 0.5}.

All runs take the same training steps (``outer_steps × inner_steps`` minibatch steps); the HO run
tunes one dropout rate per unit (inputs and hidden units) by IFT-Neumann hypergradients on
validation minibatches (Lorraine et al. 2020's setting, scaled down). Reports validation and test
loss/accuracy (final and at the best validation step), mean ± std over seeds.

    HOEXP_DATA=../shared/data python scripts/dropout_mnist.py [--seeds 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path

from rich.console import Console

from hoexp.cli import compose_spec
from hoexp.config.run import run_experiment
from hoexp.engine import rundir
from hoexp.errors import run_main

BASE = [
    "dataset=mnist",
    "dataset.batch_size=128",
    "dataset.val_batch_size=500",
    "model.width=256",
    "model.depth=2",
    "model.bias=true",
    "optim/inner=momentum",
    "optim.inner.lr=0.05",
    "hp=dropout",
    "hp.dropout.granularity=per_unit",
    "progress=false",
]
CONFIGS = {
    "fixed p=0": ["method=none", "hp.dropout.init=1e-4", "hp.dropout.min=1e-5"],
    "fixed p=0.2": ["method=none", "hp.dropout.init=0.2"],
    "fixed p=0.5": ["method=none", "hp.dropout.init=0.5"],
    "HO per-unit (neumann K=1), from 0.2": [
        "method=neumann",
        "method.terms=1",
        "method.alpha=0.05",
        "hp.dropout.init=0.2",
        "optim/outer=adam",
        "optim.outer.lr=0.05",
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--outer-steps", type=int, default=60)
    ap.add_argument("--inner-steps", type=int, default=30)
    ap.add_argument("--out", default="outputs/studies/dropout_mnist")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {}
    for name, extra in CONFIGS.items():
        for seed in range(args.seeds):
            spec, text = compose_spec(
                [
                    *BASE,
                    *extra,
                    f"seed={seed}",
                    f"outer_steps={args.outer_steps}",
                    f"inner_steps={args.inner_steps}",
                    *args.overrides,
                ]
            )
            out = Path(args.out) / name.split(",")[0].replace(" ", "_").replace("=", "") / f"seed{seed}"
            rundir.clear(out)  # a study recomputes its runs (else resume=auto would reuse them)
            s = run_experiment(spec, out, config_text=text, console=Console(file=io.StringIO()))
            rows.setdefault(name, []).append(s)
            print(
                f"{name:38s} seed {seed}: val {s['final']['val_loss']:.4f} test {s['final']['test_loss']:.4f} "
                f"acc {s['final']['test_acc']:.4f} ({s['wall_time_s']:.0f}s)",
                flush=True,
            )

    def ms(xs):
        return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"

    steps = args.outer_steps * args.inner_steps
    print(
        f"\nMNIST (shared 5,000 images: 4,000 train / 1,000 val; test 10,000), MLP 784-256-256-10, "
        f"{steps} SGD-momentum steps of batch 128, {args.seeds} seeds\n"
    )
    print("| dropout | final val loss | final test loss | final test acc | best-val step: test loss | wall s |")
    print("|---|---|---|---|---|---|")
    for name, ss in rows.items():
        print(
            f"| {name} | {ms([s['final']['val_loss'] for s in ss])} | {ms([s['final']['test_loss'] for s in ss])} "
            f"| {ms([s['final']['test_acc'] for s in ss])} | {ms([s['best']['test_loss'] for s in ss])} "
            f"| {statistics.mean(s['wall_time_s'] for s in ss):.0f} |"
        )
    ho = rows[list(CONFIGS)[-1]]
    print(
        f"\nlearned rates (HO, mean over seeds): mean {statistics.mean(s['hp_final']['mean'] for s in ho):.3f}, "
        f"min {statistics.mean(s['hp_final']['min'] for s in ho):.3f}, "
        f"max {statistics.mean(s['hp_final']['max'] for s in ho):.3f}"
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    run_main(main)
