"""The reference Iris experiment over several seeds: no HO against Neumann HO (and CG).

Each seed has its own 60/60/30 split and initialization. Prints a Markdown table of test loss and
accuracy (mean ± std over seeds) and of where the learned decays went, and writes the raw numbers
to outputs/studies/iris_study.json.

    python scripts/iris_study.py --seeds 5
    python scripts/iris_study.py --seeds 2 --configs none "neumann terms=5 alpha=0.01"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from rich.console import Console

from hoexp.cli import compose_spec
from hoexp.config.run import run_experiment
from hoexp.engine import rundir
from hoexp.errors import run_main

DEFAULT_CONFIGS = [
    "none",
    "neumann terms=0 alpha=0.01",
    "neumann terms=5 alpha=0.01",
    "neumann terms=20 alpha=0.01",
    "neumann terms=5 alpha=0.05",
    "cg iterations=20",
]


def overrides_for(config: str) -> list[str]:
    method, *opts = config.split()
    return [f"method={method}", *(f"method.{o}" for o in opts)]


def decay_distribution(run_dir: Path) -> dict[str, float]:
    state = torch.load(run_dir / "final.pt", weights_only=True)
    out: dict[str, float] = {}
    all_values = []
    for name, lam in state["hparams"].items():
        layer = name.split(":")[-1]
        out[f"median[{layer}]"] = float(lam.median())
        all_values.append(lam.flatten())
    lam = torch.cat(all_values).double()
    out["moved"] = float(((lam - 1e-3).abs() / 1e-3 > 0.01).double().mean())
    out["up"] = float((lam > 1.01e-3).double().mean())
    out["down"] = float((lam < 0.99e-3).double().mean())
    out["at_floor"] = float((lam <= 1e-11).double().mean())
    out["at_ceiling"] = float((lam >= 9.99).double().mean())
    out["mean"] = float(lam.mean())
    out["median"] = float(lam.median())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS)
    ap.add_argument("--extra", nargs="*", default=[], help="overrides applied to every run")
    ap.add_argument("--out", default="outputs/studies/iris_study")
    args = ap.parse_args()
    console = Console(stderr=True)
    out = Path(args.out)
    results: dict[str, list[dict]] = {}
    for config in args.configs:
        for seed in range(args.seeds):
            overrides = [
                "experiment=iris_per_weight_decay",
                f"seed={seed}",
                "progress=false",
                *overrides_for(config),
                *args.extra,
            ]
            spec, text = compose_spec(overrides)
            run_dir = out / config.replace(" ", "_").replace("=", "") / f"seed{seed}"
            rundir.clear(run_dir)  # a study recomputes its runs (else resume=auto would reuse them)
            summary = run_experiment(spec, run_dir, config_text=text, console=Console(file=open("/dev/null", "w")))
            row = {
                "seed": seed,
                "final": summary["final"],
                "best": summary["best"],
                "wall_time_s": summary["wall_time_s"],
                "decays": decay_distribution(run_dir),
            }
            results.setdefault(config, []).append(row)
            console.print(
                f"{config:32s} seed {seed}: test_loss={summary['final']['test_loss']:.4f} "
                f"test_acc={summary['final']['test_acc']:.3f} ({summary['wall_time_s']:.1f}s)"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.json").write_text(json.dumps(results, indent=1))

    def ms(xs):
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"

    print(f"\nIris, {args.seeds} seeds (each its own split), final values after all outer steps\n")
    print("| method | test loss | test acc | val loss | best-val step's test loss | wall time (s) |")
    print("|---|---|---|---|---|---|")
    for config, rows in results.items():
        print(
            f"| {config} | {ms([r['final']['test_loss'] for r in rows])} | {ms([r['final']['test_acc'] for r in rows])} "
            f"| {ms([r['final']['val_loss'] for r in rows])} | {ms([r['best']['test_loss'] for r in rows])} "
            f"| {ms([r['wall_time_s'] for r in rows])} |"
        )
    print("\nLearned decays (initial value 1e-3; mean over seeds)\n")
    keys = [k for k in results[args.configs[-1]][0]["decays"]]
    print("| method | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for config, rows in results.items():
        print(
            f"| {config} | " + " | ".join(f"{statistics.mean(r['decays'][k] for r in rows):.3g}" for k in keys) + " |"
        )
    plot_decays(out, [c for c in args.configs if c != "none"])
    sys.stdout.flush()


def plot_decays(out: Path, configs: list[str]) -> None:
    """Histogram of log10(learned decay) per layer, seed 0, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(configs), figsize=(4 * len(configs), 3.2), squeeze=False, sharey=True)
    for ax, config in zip(axes[0], configs):
        state = torch.load(out / config.replace(" ", "_").replace("=", "") / "seed0" / "final.pt", weights_only=True)
        for name, lam in state["hparams"].items():
            ax.hist(torch.log10(lam.flatten().double()).numpy(), bins=60, alpha=0.6, label=name.split(":")[-1])
        ax.axvline(-3, color="k", lw=0.8, ls="--")
        ax.set_title(config, fontsize=9)
        ax.set_xlabel("log10 λ (initial: -3)")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_decays.png", dpi=110)
    print(f"\nwrote {out.parent / (out.name + '_decays.png')}")


if __name__ == "__main__":
    run_main(main)
