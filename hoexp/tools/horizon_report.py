"""What ``hoexp check --horizon`` writes and reads: ``horizon.json`` (and an earlier one's truths: ``--truth``), the table
(stdout) and ``horizon.png``."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import Tensor

from hoexp import tree
from hoexp.config import Spec
from hoexp.errors import ConfigError
from hoexp.tools.horizon_truth import Smoothing
from hoexp.tools.outdir import pyplot


@dataclass
class HorizonResult:
    at: list[int]
    eps: float
    truth: dict[int, list[float]]
    hypergradients: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    smoothing: Smoothing | None = None
    smoothed: dict[int, list[float]] = field(default_factory=dict)  # ∇ E L_V(λ + σε), per checkpoint
    smoothed_stderr: dict[int, list[float]] = field(default_factory=dict)
    smoothed_scores: dict[str, dict[str, float]] = field(default_factory=dict)


def fingerprint(spec: Spec, eps: float) -> dict:
    """What the truth depends on: the whole configuration except the method (and where it is written)."""
    raw = {k: v for k, v in spec.raw.items() if k not in ("method", "name", "hydra")}
    return {"config": raw, "eps": eps}


def to_json(result: HorizonResult, spec: Spec, raw: dict[str, Tensor], base_final: float) -> dict[str, Any]:
    """``horizon.json``: the truths, every contender's hypergradients and scores, and what they were measured on."""

    def keyed(d: dict[int, Any]) -> dict[str, Any]:
        return {str(k): v for k, v in d.items()}

    sm = result.smoothing
    return {
        "at": result.at,
        "eps": result.eps,
        "num_hparams": tree.numel(raw),
        "base_final_val_loss": base_final,
        "fingerprint": fingerprint(spec, result.eps),
        "truth": keyed(result.truth),
        "smoothing": None if sm is None else asdict(sm),
        "smoothed_truth": keyed(result.smoothed),
        "smoothed_stderr": keyed(result.smoothed_stderr),
        "hypergradients": {m: keyed(d) for m, d in result.hypergradients.items()},
        "scores": result.scores,
        "smoothed_scores": result.smoothed_scores,
        "errors": result.errors,
        "seconds": result.seconds,
        "hp_layout": {k: list(v.shape) for k, v in raw.items()},
    }


def known_truth(
    truth_from: Path | None, spec: Spec, eps: float, smoothing: Smoothing | None = None
) -> dict[str, dict[int, list[float]]]:
    """The truths of an earlier ``horizon.json`` (``--truth``) measured on this configuration and ``eps``:
    ``truth`` (±ε), and ``smoothed`` with its ``smoothed_stderr`` when it was measured with ``smoothing``."""
    none: dict[str, dict[int, list[float]]] = {"truth": {}, "smoothed": {}, "smoothed_stderr": {}}
    if truth_from is None:
        return none
    try:
        old = json.loads(Path(truth_from).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--truth {truth_from}: cannot read it ({e}); pass a horizon.json") from None
    if old.get("fingerprint") != json.loads(json.dumps(fingerprint(spec, eps))):
        raise ConfigError(
            f"--truth {truth_from} was measured on another configuration or --eps; drop --truth to measure it again"
        )
    out = {"truth": {int(k): v for k, v in old.get("truth", {}).items()}, "smoothed": {}, "smoothed_stderr": {}}
    if smoothing is not None and old.get("smoothing") == asdict(smoothing):
        for key, name in (("smoothed", "smoothed_truth"), ("smoothed_stderr", "smoothed_stderr")):
            out[key] = {int(k): v for k, v in old.get(name, {}).items()}
    return out


def fmt(v: Sequence[float]) -> str:
    """A vector's first 8 entries, signed, 3 digits."""
    return "[" + ", ".join(f"{x:+.3g}" for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"


def _title(result: HorizonResult) -> str:
    title = f"hypergradient vs long-horizon truth (central differences, ε = {result.eps:g}"
    if result.smoothing is not None:
        sm = result.smoothing
        title += f"; smoothed: σ = {sm.sigma:g}, {sm.pairs} antithetic pairs"
    return title + f"; checkpoints {result.at})"


def table(result: HorizonResult, console: Console) -> None:
    """One row per contender: sign agreement and cosines with the ±ε truth, and with the smoothed one (its
    sign agreement also over the coordinates it resolves, ``|g*| > 2 SE``) where it was measured."""
    smoothed = result.smoothing is not None
    numbers = ["sign ±ε", "cos ±ε (mean)", *(f"cos@{s}" for s in result.at), "rel. error"]
    numbers += ["sign σ", "sign σ (resolved)", "cos σ (mean)", "time s"] if smoothed else ["time s"]
    t = Table(title=_title(result))
    t.add_column("method")
    for col in numbers:
        t.add_column(col, justify="right")
    for label, sc in result.scores.items():
        extra = []
        if smoothed:
            sm = result.smoothed_scores[label]
            n = int(sm["resolved"])
            extra = [f"{sm['sign']:.2f}", f"{sm['sign_resolved']:.2f} of {n}" if n else "-", f"{sm['cosine']:+.3f}"]
        t.add_row(
            label,
            f"{sc['sign']:.2f}",
            f"{sc['cosine']:+.3f}",
            *[f"{sc[f'cosine@{s}']:+.2f}" for s in result.at],
            f"{sc['rel_error']:.3g}",
            *extra,
            f"{result.seconds.get(label, math.nan):.1f}",
        )
    for label, err in result.errors.items():
        t.add_row(label, *["-"] * len(numbers), err[:60])
    console.print(t)


def _short(label: str) -> str:
    """A contender's label for plots: without the ``method.`` prefixes, wrapped."""
    return "\n".join(textwrap.wrap(label.replace("method.", ""), 28, break_on_hyphens=False)) or label


def plot(result: HorizonResult, path: Path) -> None:
    """Cosine per checkpoint (solid: ±ε truth; dashed: smoothed truth) and pooled sign agreement (bars)."""
    plt = pyplot()

    labels = list(result.scores)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.45 * max(len(labels), 4)), layout="constrained")
    for label in labels:
        sc = result.scores[label]
        (line,) = ax1.plot(result.at, [sc[f"cosine@{s}"] for s in result.at], marker="o", label=_short(label))
        if label in result.smoothed_scores:
            sm = result.smoothed_scores[label]
            ax1.plot(result.at, [sm[f"cosine@{s}"] for s in result.at], ls="--", marker="x", color=line.get_color())
    ax1.axhline(0, color="grey", lw=0.5)
    ax1.set_xlabel("outer step of the checkpoint")
    ax1.set_ylabel("cosine with the long-horizon truth")
    ax1.set_ylim(-1.05, 1.05)
    ax1.set_title(_title(result).split("(", 1)[1].rstrip(")") + " (dashed: smoothed)", fontsize=8)
    width = 0.4 if result.smoothed_scores else 0.8
    ys = range(len(labels))
    ax2.barh([y - width / 2 for y in ys], [result.scores[m]["sign"] for m in labels], height=width, label="±ε")
    if result.smoothed_scores:
        ax2.barh([y + width / 2 for y in ys], [result.smoothed_scores[m]["sign"] for m in labels], height=width,
                 label="smoothed")  # fmt: skip
        ax2.legend(fontsize=7)
    ax2.set_yticks(list(ys), [_short(m) for m in labels], fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.axvline(0.5, color="grey", lw=0.5)
    ax2.set_xlabel("sign agreement (all checkpoints and coordinates)")
    fig.legend(loc="outside lower center", ncol=min(len(labels), 3), fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
