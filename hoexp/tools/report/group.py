"""Grouping runs into report rows: seeds of one configuration (:class:`Member`), studies of one search, grid
points; labels and the tuning column."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hoexp.tools.report.load import IGNORED_KEYS, TUNING_ORDER, RunInfo, _num


# -------------------------------------------------------------------------------------- grouping
def _split_override(o: str) -> tuple[str, str]:
    key, _, value = o.partition("=")
    return key.lstrip("+~"), value


@dataclass
class Member:
    """One run, or one black-box study standing for its best trial."""

    runs: list[RunInfo]  # one run; or a study's trials in trial order
    best: RunInfo  # the run whose numbers the member reports
    study: Path | None = None

    @property
    def is_study(self) -> bool:
        return self.study is not None

    @property
    def wall_time_s(self) -> float:
        """The time the member spent: a run's wall time, or the sum over a study's trials."""
        return math.fsum(r.wall_time_s for r in self.runs if math.isfinite(r.wall_time_s))

    @property
    def hypergradients(self) -> int:
        return sum(r.hypergradients for r in self.runs)

    def metric(self, block: str, key: str) -> float:
        return self.best.metric(block, key)

    def curve(self, x: str = "elapsed") -> list[tuple[float, float]]:
        """Validation loss against wall time (``x="solver"``: solver time); a study's trials back to back (each
        offset by the time of the trials before it)."""
        out: list[tuple[float, float]] = []
        offset = 0.0
        for r in self.runs:
            pts = r.curve(x)
            out.extend((offset + t, v) for t, v in pts)
            spent = r.time_s(x)
            offset += spent if math.isfinite(spent) else (pts[-1][0] if pts else 0.0)
        return out


@dataclass
class Group:
    """One row of the report: members that differ only by seed."""

    label: str  # method plus what distinguishes it from the other rows
    tuning: str  # hypergradients | fixed | random search | TPE | ...
    members: list[Member]
    searched: list[str] = field(default_factory=list)  # keys a study searched

    @property
    def first(self) -> RunInfo:
        return self.members[0].best

    @property
    def runs(self) -> list[RunInfo]:
        return [r for m in self.members for r in m.runs]

    def values(self, block: str, key: str) -> list[float]:
        return [m.metric(block, key) for m in self.members]

    def mean_std(self, values: Sequence[float]) -> tuple[float, float]:
        vals = [v for v in values if math.isfinite(v)]
        if not vals:
            return math.nan, math.nan
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan)

    @property
    def count(self) -> str:
        """e.g. ``3 seeds``, ``20 trials``, ``2 studies × 20 trials`` (with failures noted)."""
        n = len(self.members)
        if self.members[0].is_study:
            trials = sorted({len(m.runs) for m in self.members})
            t = "/".join(map(str, trials))
            text = f"{t} trials" if n == 1 else f"{n} studies × {t} trials"
        else:
            seeds = {str(m.best.seed) for m in self.members}
            text = "1 run" if n == 1 else (f"{n} seeds" if len(seeds) == n else f"{n} runs")
        bad = [r.status for r in self.runs if r.status != "completed"]
        if bad:
            text += " (" + ", ".join(f"{bad.count(s)} {s}" for s in sorted(set(bad))) + ")"
        return text

    @property
    def best_params(self) -> str:
        """The searched values of the best trial (one study), e.g. ``weight_decay.init=3.2e-04``."""
        if not self.members[0].is_study or len(self.members) != 1:
            return ""
        return " ".join(f"{_short_key(k)}={_fmt_value(v)}" for k, v in self.members[0].best.params.items())


def _short_key(key: str) -> str:
    return key[3:] if key.startswith("hp.") else key


def _fmt_value(v: Any) -> str:
    x = _num(v)
    if not math.isfinite(x) or isinstance(v, bool):
        return str(v)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def _tuning(run: RunInfo) -> str:
    if run.sweeper is not None:
        return run.sweeper
    return "fixed" if run.method == "none" else "hypergradients"


def _config_key(run: RunInfo, drop: set[str]) -> tuple:
    cfg = run.config or {
        f"summary.{k}": v
        for k, v in run.summary.items()
        if k in ("method", "hp", "dataset", "model", "outer_steps", "inner_steps", "num_hparams")
    }
    return tuple(sorted((k, repr(v)) for k, v in cfg.items() if k not in IGNORED_KEYS and k not in drop))


def group_runs(runs: Sequence[RunInfo]) -> list[Group]:
    """Rows: runs equal but for the seed; studies (one per sweep folder) equal but for the seed."""
    # 1. black-box studies: their trials, searched keys and best trial
    studies: dict[Path, list[RunInfo]] = {}
    singles: list[RunInfo] = []
    for r in runs:
        (studies.setdefault(r.study, []) if r.study is not None else singles).append(r)
    members: list[tuple[tuple, str, Member, list[str]]] = []
    for folder, trials in studies.items():
        trials.sort(key=lambda r: (r.trial if r.trial is not None else 1 << 30, str(r.path)))
        by_key: dict[str, set[str]] = {}
        for r in trials:
            for k, v in map(_split_override, r.overrides):
                by_key.setdefault(k, set()).add(v)
        searched = [k for k in trials[0].study_info.get("space", {})]
        searched += [k for k, vs in by_key.items() if len(vs) > 1 and k not in searched]
        for r in trials:
            ov = dict(map(_split_override, r.overrides))
            r.params = {k: ov[k] for k in searched if k in ov}
        best = min(trials, key=lambda r: r.objective)
        info = trials[0].study_info
        key = (
            "study",
            trials[0].sweeper,
            info.get("n_trials"),
            tuple(sorted(info.get("space", {}).items())),
            tuple(searched),
            _config_key(best, set(searched)),
        )
        members.append((key, _tuning(best), Member(runs=trials, best=best, study=folder), searched))
        if info.get("each_row"):  # a grid: each point is also a row (over seeds)
            for r in trials:
                members.append(
                    (("run", "grid point", _config_key(r, set())), "grid point", Member(runs=[r], best=r), [])
                )
    for r in singles:
        members.append((("run", _tuning(r), _config_key(r, set())), _tuning(r), Member(runs=[r], best=r), []))

    groups: dict[tuple, Group] = {}
    for key, tuning, m, searched in members:
        if key not in groups:
            groups[key] = Group(label=m.best.method, tuning=tuning, members=[], searched=searched)
        groups[key].members.append(m)
    out = list(groups.values())
    for g in out:
        g.members.sort(key=lambda m: (str(m.best.seed), str(m.best.path)))
    _label(out)
    out.sort(
        key=lambda g: (
            TUNING_ORDER.get(g.tuning, len(TUNING_ORDER)),
            g.tuning,
            [_num(v) for v in g.first.params.values()] if g.tuning == "grid point" else [],
            g.label,
        )
    )
    return out


def _label(groups: list[Group]) -> None:
    """Add to each row's method the config values that tell it apart from comparable rows.

    A key is shown when another row of the same method has it too with another value (so
    ``method.terms`` shows for two Neumann rows, not for Neumann against CG, and the grid value for
    the ``none`` rows of a grid); keys a study searched and the hp granularities (the ``family``
    column) are not.
    """
    labels = [g.label for g in groups]
    for i, g in enumerate(groups):
        cfg = g.first.config
        same_method = [h for j, h in enumerate(groups) if j != i and h.label == g.label]
        skip = {*IGNORED_KEYS, *g.searched, "method.name"}
        parts = [
            f"{_short_key(k)}={_fmt_value(cfg[k])}"
            for k in sorted(cfg)
            if not (k in skip or k.endswith(".granularity") or k.startswith("hydra."))
            and any(k in h.first.config and k not in h.searched and h.first.config[k] != cfg[k] for h in same_method)
        ]
        if parts:
            labels[i] = f"{g.label} ({', '.join(parts)})"
    for g, label in zip(groups, labels):
        g.label = label
