"""The report's plots: validation loss and best-so-far against wall time, final hyperparameter histograms."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hoexp.tools.outdir import pyplot
from hoexp.tools.report.group import Group, Member
from hoexp.tools.report.load import TIME_AXES


# ----------------------------------------------------------------------------------------- plots
def _colors(n: int) -> list:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _styled(
    groups: list[Group], curves: list[tuple[Group, Member, list[tuple[float, float]]]]
) -> Iterator[tuple[Member, tuple[float, ...], tuple[float, ...], Any, str | None]]:
    """Each curve ``(row, member, points)`` with finite points, as ``(member, times, values, colour, label)``: one
    colour per row, the row's legend label on its first curve only."""
    colors = dict(zip(map(id, groups), _colors(len(groups))))
    labelled: set[int] = set()
    for g, m, pts in curves:
        pts = [(t, v) for t, v in pts if math.isfinite(t) and math.isfinite(v)]
        if pts:
            ts, vs = zip(*pts)
            yield m, ts, vs, colors[id(g)], None if id(g) in labelled else f"{g.label} [{g.tuning}]"
            labelled.add(id(g))


def plot_val_loss_vs_time(groups: list[Group], path: Path, x: str = "elapsed") -> bool:
    """Left: validation loss against wall time (``x="solver"``: solver time) for every run (a study's trials back
    to back, dots where a trial starts); right: the best validation loss so far. One colour per row."""
    plt = pyplot()

    curves = [(g, m, m.curve(x)) for g in groups for m in g.members]
    if not any(c for _, _, c in curves):
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    finals: list[float] = []
    top = -math.inf
    for m, ts, vs, c, label in _styled(groups, curves):
        ax.plot(ts, vs, color=c, lw=1.0, alpha=0.8, label=label)
        if m.is_study:  # mark where each trial starts (its first evaluation)
            offset, starts = 0.0, []
            for r in m.runs:
                rp = [(t, v) for t, v in r.curve(x) if math.isfinite(t) and math.isfinite(v)]
                if rp:
                    starts.append((offset + rp[0][0], rp[0][1]))
                spent = r.time_s(x)
                offset += spent if math.isfinite(spent) else (rp[-1][0] if rp else 0.0)
            if starts:
                ax.scatter(*zip(*starts), color=c, s=8, zorder=3)
        run_min = list(itertools.accumulate(vs, min))
        finals.append(run_min[-1])
        top = max(top, run_min[0])
        bx.step(ts, run_min, where="post", color=c, lw=1.6, label=label)
        bx.scatter([ts[-1]], [run_min[-1]], color=c, s=14, zorder=3)
    # zoom in on where the runs end up; the start (one value for all) is cut off
    _zoom_on_ends(bx, finals, min_span=0.02, above=4, top=top)
    ax.set_yscale("log")
    ax.set_title("validation loss (studies: trials back to back)")
    bx.set_title("best validation loss so far (dot: end of run / study)")
    for a in (ax, bx):
        a.set_xlabel(TIME_AXES[x][2])
        a.set_ylabel("validation loss")
        a.grid(alpha=0.3)
    _save_with_legend(fig, bx, path)
    return True


def _zoom_on_ends(ax: Any, ends: list[float], *, min_span: float, above: float, top: float = math.inf) -> None:
    """y-limits around the curves' final values: half a span below the lowest, ``above`` spans over
    the highest (not past ``top``); the span is at least ``min_span`` of the highest value."""
    if not ends:
        return
    lo, hi = min(ends), max(ends)
    span = max(hi - lo, min_span * abs(hi), 1e-12)
    ax.set_ylim(lo - 0.5 * span, min(top + 0.05 * span, hi + above * span))


def _save_with_legend(fig: Any, ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_so_far(member: Member, x: str = "elapsed") -> list[tuple[float, float]]:
    """``(wall time, best validation loss so far)`` (``x="solver"``: solver time): a run's running minimum over its
    evaluations; a study's best objective over its finished trials, at the cumulative run time of its trials."""
    if not member.is_study:
        out, best = [], math.inf
        for t, v in member.curve(x):
            if math.isfinite(t) and math.isfinite(v):
                best = min(best, v)
                out.append((t, best))
        return out
    out, best, cum = [], math.inf, 0.0
    for r in member.runs:
        spent = r.time_s(x)
        cum += spent if math.isfinite(spent) else 0.0
        best = min(best, r.objective)
        if math.isfinite(best):
            out.append((cum, best))
    return out


def plot_best_so_far(groups: list[Group], path: Path, x: str = "elapsed") -> bool:
    """One panel: every contender's best validation loss so far against wall time (``x="solver"``: solver time),
    one line per seed (study), one colour per row; grid points are left to their ``grid search`` row."""
    plt = pyplot()

    shown = [g for g in groups if g.tuning != "grid point"]
    curves = [(g, m, best_so_far(m, x)) for g in shown for m in g.members]
    if not any(c for _, _, c in curves):
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    ends = []
    for m, ts, vs, c, label in _styled(shown, curves):
        ax.step(
            ts, vs, where="post", color=c, lw=1.6, alpha=0.85, label=label, marker="o" if m.is_study else None, ms=3
        )
        ends.append(vs[-1])
    _zoom_on_ends(ax, ends, min_span=0.05, above=3)  # where the contenders end up
    ax.set_xlabel(f"{TIME_AXES[x][2]}; searches: cumulative trial time")
    ax.set_ylabel("best validation loss so far")
    ax.set_title("best validation loss so far (dots: a search's finished trials)")
    ax.grid(alpha=0.3)
    _save_with_legend(fig, ax, path)
    return True


def plot_hparams(groups: list[Group], path: Path, max_panels: int = 24) -> bool:
    """Histograms of the final hyperparameters (log10), one panel per row and family. A study shows
    the values its trials tried (grey) and its best trial's (coloured)."""
    import numpy as np

    plt = pyplot()

    panels = []
    colors = dict(zip(map(id, groups), _colors(len(groups))))
    for g in groups:
        best_vals: dict[str, list] = {}
        tried: dict[str, list] = {}
        for m in g.members:
            for fam, v in m.best.final_hparams().items():
                best_vals.setdefault(fam, []).append(v)
            if m.is_study:
                for r in m.runs:
                    for fam, v in r.final_hparams().items():
                        tried.setdefault(fam, []).append(v)
        for fam, vals in best_vals.items():
            panels.append((g, fam, np.concatenate(vals), np.concatenate(tried[fam]) if fam in tried else None))
    if not panels:
        return False
    panels = panels[:max_panels]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (g, fam, values, tried_values) in zip(axes.flat, panels):
        c = colors[id(g)]
        logv = np.log10(np.clip(values[np.isfinite(values)], 1e-300, None))
        logt = None if tried_values is None else np.log10(np.clip(tried_values, 1e-300, None))
        allv = logv if logt is None else np.concatenate([logv, logt])
        lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 41)
        if logt is not None:
            ax.hist(logt, bins=bins, color="0.75", label="trials")
        if logv.size <= 8:  # a few values (global / per-layer): lines are clearer than bars
            for x in logv:
                ax.axvline(x, color=c, lw=2)
        else:
            ax.hist(logv, bins=bins, color=c, alpha=0.85)
        med = float(np.median(values)) if values.size else math.nan
        ax.set_title(f"{g.label} [{g.tuning}]\n{fam}: {values.size:,} values, median {med:.3g}", fontsize=9)
        ax.set_xlabel(f"log10 {fam}")
        ax.grid(alpha=0.3)
        if tried_values is not None:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
