"""``hoexp report PATH...``: compare finished runs in one table, Markdown, CSV and PNG plots.

A *run* is any folder holding a ``summary.json`` (folders are searched recursively, so a run, a
multirun folder or a whole ``outputs/`` tree all work). Runs are gathered into *rows*:

* runs whose composed configs (``.hydra/config.yaml``) are equal except for ``seed`` (and cosmetic
  keys such as ``progress``) form one row, numbers given as mean ± std over the seeds;
* the trials of a black-box study form one *study*, standing for its best trial (the lowest
  validation loss it minimized, never the test loss), and its wall time is the sum of its trials'
  wall times (the budget it spent). Studies of the same search on other seeds form one row, mean ±
  std over the studies. Studies are the searches and grids of ``hoexp compare`` (a folder with
  ``study.json`` whose trial folders hold ``trial.json``; its ``objective`` says which validation
  loss, ``best`` or ``final``, was minimized) and, from older outputs, multiruns of a Hydra sweeper
  other than the basic one (the Optuna sweepers, best validation loss). Each point of a
  ``hoexp compare`` grid is also a row of its own (``grid point``).

So "HO methods vs random search vs TPE at equal budget" reads as rows with a ``tuning`` column
(``hypergradients``, ``fixed``, ``grid point``, ``grid search``, ``random search``, ``TPE``) and a
``wall time`` column. Written to ``--out``: ``report.md`` (the table, one table per study and, for a
``hoexp compare`` folder, its budgets and when each search matched HO, from ``compare.json``),
``report.csv`` (one line per row), ``runs.csv`` (one line per run: every trial of every study, with
its searched values), ``val_loss_vs_time.png`` (validation loss and best validation loss so far
against wall time, the trials of a study back to back, so for trials run in parallel the axis is
compute time), ``best_so_far.png`` (one panel: each contender's best validation loss so far against
wall time; runs from their metrics.jsonl, studies as the best objective of their finished trials
over cumulative trial time) and ``hparams.png`` (final hyperparameter histograms, log10).

The YAML files Hydra writes are read as plain YAML; only the jobs a sweep should have (to list the
missing ones) are expanded with Hydra's override parser, through ``hoexp.cli.expand_sweeps``.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hoexp.errors import HoexpError
from hoexp.metrics import read_json, read_jsonl
from hoexp.resume import RUN_CONTROL_KEYS

__all__ = ["RunInfo", "Member", "Group", "Report", "gather", "group_runs", "build_report", "METRICS"]

# (summary block, key, column title, format)
METRICS: list[tuple[str, str, str, str]] = [
    ("best", "val_loss", "val loss (best)", ".4f"),
    ("final", "val_loss", "val loss (final)", ".4f"),
    ("best", "test_loss", "test loss @best val", ".4f"),
    ("best", "test_acc", "test acc @best val", ".3f"),
    ("final", "test_loss", "test loss (final)", ".4f"),
    ("final", "test_acc", "test acc (final)", ".3f"),
]
# Also in the CSV files.
CSV_METRICS: list[tuple[str, str]] = [(b, k) for b in ("best", "final")
                                      for k in ("step", "val_loss", "val_acc", "test_loss", "test_acc",
                                                "train_loss", "train_acc")]
LOWER_IS_BETTER = {"val_loss", "test_loss", "train_loss"}
# Config keys that never split runs into different rows (seed: rows aggregate over seeds; the others
# change how a run is executed or stored, not what it computes).
IGNORED_KEYS = {"seed", *RUN_CONTROL_KEYS}
TUNING_ORDER = {"hypergradients": 0, "fixed": 1, "grid point": 2, "grid search": 3, "random search": 4,
                "quasi-random search": 5, "TPE": 6}
SAMPLERS = {"RandomSampler": "random search", "TPESampler": "TPE", "CmaEsSampler": "CMA-ES",
            "GridSampler": "grid search", "NSGAIISampler": "NSGA-II", "MOTPESampler": "MOTPE",
            "QMCSampler": "quasi-random search"}


# ------------------------------------------------------------------------------------- gathering
def _yaml(path: Path) -> Any:
    import yaml  # PyYAML, a dependency of omegaconf

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(node, list):
        node = tuple(repr(v) if isinstance(v, (dict, list)) else v for v in node)
    return {prefix[:-1]: node}


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class RunInfo:
    """One run folder: its summary, composed config and (for multirun jobs) its sweep."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # flattened .hydra/config.yaml
    overrides: list[str] = field(default_factory=list)  # the job's task overrides
    sweeper: str | None = None  # None: a single run or a basic (grid) multirun; else e.g. "TPE"
    study: Path | None = None  # the sweep folder of a black-box study
    study_info: dict[str, Any] = field(default_factory=dict)  # study_name, n_trials, searched keys
    trial: int | None = None  # hydra.job.num
    params: dict[str, str] = field(default_factory=dict)  # searched values of a trial (set by group_runs)
    sweep: Path | None = None  # the multirun folder of a job of a basic (grid) sweep

    @property
    def method(self) -> str:
        return str(self.summary.get("method", self.config.get("method.name", "?")))

    @property
    def family(self) -> str:
        """The hp family (families) with granularities, e.g. ``weight_decay (per_weight)``."""
        names = str(self.summary.get("hp", "?")).split("+")
        parts = []
        for n in names:
            gran = self.config.get(f"hp.{n}.granularity")
            if gran is None and self.config.get("hp.name") == n:  # the one-family schema: hp.granularity
                gran = self.config.get("hp.granularity")
            parts.append(f"{n} ({gran})" if gran else n)
        return " + ".join(parts)

    @property
    def num_hparams(self) -> int:
        return int(self.summary.get("num_hparams", 0) or 0)

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "?"))

    @property
    def wall_time_s(self) -> float:
        return _num(self.summary.get("wall_time_s"))

    @property
    def hypergradients(self) -> int:
        return int(self.summary.get("hypergradients", 0) or 0)

    def metric(self, block: str, key: str) -> float:
        return _num((self.summary.get(block) or {}).get(key))

    @property
    def objective(self) -> float:
        """What the study minimized: the best validation loss (a Hydra sweeper's, the default) or the
        final one (``objective`` in a compare study.json); +inf when not finite or the run was stopped
        early (pruned, failed)."""
        if self.status in ("pruned", "failed", "interrupted", "stopped"):
            return math.inf
        v = self.metric(str(self.study_info.get("objective") or "best"), "val_loss")
        return v if math.isfinite(v) else math.inf

    def curve(self) -> list[tuple[float, float]]:
        """``(time/elapsed_s, loss/val)`` from ``metrics.jsonl`` (empty if missing)."""
        try:
            lines = read_jsonl(self.path / "metrics.jsonl")
        except (OSError, ValueError):
            return []
        return [(_num(ln["time/elapsed_s"]), _num(ln["loss/val"])) for ln in lines
                if "time/elapsed_s" in ln and "loss/val" in ln]

    def final_hparams(self) -> dict[str, Any]:
        """Final constrained hyperparameters by family (``final.pt``), as flat float64 numpy arrays."""
        import numpy as np
        import torch

        try:
            state = torch.load(self.path / "final.pt", weights_only=True, map_location="cpu")
        except Exception:  # noqa: BLE001 - missing or unreadable: no histogram for this run
            return {}
        by_family: dict[str, list] = {}
        for k, v in (state.get("hparams") or {}).items():
            by_family.setdefault(k.split(":")[0], []).append(v.detach().double().reshape(-1).numpy())
        return {k: np.concatenate(v) for k, v in by_family.items()}


def _study_folder(run_dir: Path, subdir_template: Any) -> Path:
    """The sweep folder: ``run_dir`` minus as many levels as ``hydra.sweep.subdir`` has."""
    depth = len([p for p in str(subdir_template).split("/") if p]) if subdir_template else 1
    return run_dir.parents[min(max(depth, 1), len(run_dir.parents)) - 1]


def _sweeper_label(hydra: dict[str, Any]) -> str | None:
    """``None`` for single runs and Hydra's basic sweeper; else the search's name (``TPE``...)."""
    if str(hydra.get("mode", "")).upper() != "MULTIRUN":
        return None
    sweeper = hydra.get("sweeper") or {}
    target = str(sweeper.get("_target_", ""))
    if not target or target.endswith("BasicSweeper"):
        return None
    sampler = str((sweeper.get("sampler") or {}).get("_target_", ""))
    if sampler:
        cls = sampler.rsplit(".", 1)[-1]
        return SAMPLERS.get(cls, cls)
    choice = ((hydra.get("runtime") or {}).get("choices") or {}).get("hydra/sweeper")
    return str(choice or target.rsplit(".", 1)[-1])


def _compare_trial(info: RunInfo) -> bool:
    """A trial of a ``hoexp compare`` grid or search: ``trial.json`` here, ``study.json`` one folder up."""
    trial, study = info.path / "trial.json", info.path.parent / "study.json"
    if not (trial.is_file() and study.is_file()):
        return False
    t, st = read_json(trial), read_json(study)
    if not (isinstance(t, dict) and isinstance(st, dict)):
        return False
    info.sweeper = str(st.get("label") or st.get("sampler") or "search")
    info.study = info.path.parent
    info.trial = int(t.get("number", 0))
    info.overrides = [f"{k}={v}" for k, v in (t.get("params") or {}).items()]
    info.study_info = {"study_name": info.path.parent.name, "n_trials": None, "direction": "minimize",
                       "space": {str(k): str(v) for k, v in (st.get("space") or {}).items()},
                       "objective": st.get("objective", "best"), "each_row": st.get("kind") == "grid",
                       "budget_s": st.get("budget_s"), "wall_clock_s": st.get("wall_clock_s")}
    return True


def load_run(path: Path) -> RunInfo:
    """One run folder (holding ``summary.json``)."""
    summary = read_json(path / "summary.json")
    if not isinstance(summary, dict):
        raise ValueError("summary.json is not an object")
    cfg = _yaml(path / ".hydra" / "config.yaml")
    hydra_file = _yaml(path / ".hydra" / "hydra.yaml")
    hydra = hydra_file.get("hydra", {}) if isinstance(hydra_file, dict) else {}
    info = RunInfo(path=path, summary=summary, config=_flatten(cfg) if isinstance(cfg, dict) else {})
    if info.config:  # .hydra/ keeps the config a run started with; a resume may have extended it
        for resume in summary.get("resumes") or []:
            info.config.update({k: v[1] for k, v in (resume.get("changes") or {}).items()})
    if _compare_trial(info):
        return info
    info.overrides = [str(o) for o in ((hydra.get("overrides") or {}).get("task") or [])]
    num = (hydra.get("job") or {}).get("num")
    info.trial = int(num) if isinstance(num, int) else None
    info.sweeper = _sweeper_label(hydra)
    if info.sweeper is None and str(hydra.get("mode", "")).upper() == "MULTIRUN" and info.trial is not None:
        info.sweep = _study_folder(path, (hydra.get("sweep") or {}).get("subdir"))
    if info.sweeper is not None:
        sweep = hydra.get("sweep") or {}
        sweeper = hydra.get("sweeper") or {}
        info.study = _study_folder(path, sweep.get("subdir"))
        info.study_info = {
            "study_name": sweeper.get("study_name"),
            "n_trials": sweeper.get("n_trials"),
            "direction": sweeper.get("direction"),
            "space": {str(k): str(v) for k, v in (sweeper.get("params") or {}).items()},
        }
    return info


def gather(paths: Iterable[str | Path], *, console: Console | None = None) -> list[RunInfo]:
    """Every run (folder with ``summary.json``) at or under ``paths``, each once, in path order."""
    paths = list(paths)
    found: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise HoexpError(f"report: no such file or folder: {p}")
        if p.is_file():
            if p.name != "summary.json":
                raise HoexpError(f"report: {p} is not a summary.json or a folder of runs")
            found[p.parent.resolve()] = None
        else:
            for s in sorted(p.rglob("summary.json")):
                found[s.parent.resolve()] = None
    runs = []
    for d in sorted(found):
        try:
            runs.append(load_run(d))
        except (OSError, ValueError) as e:
            if console is not None:
                console.print(f"hoexp report: skipping {d}: unreadable summary.json ({e})", markup=False,
                              highlight=False)
    if not runs:
        raise HoexpError(f"report: no runs (summary.json) under {', '.join(map(str, paths))}")
    return runs


def missing_jobs(runs: Sequence[RunInfo]) -> list[tuple[Path, int, list[str]]]:
    """Jobs of the (basic) sweeps that ``runs`` come from which have no summary here: ``(sweep folder,
    number of jobs, ["#<num> <overrides>", ...])`` for each sweep with missing jobs. The jobs are the
    combinations of the task overrides in the sweep's ``multirun.yaml``, in Hydra's order."""
    from hoexp.config.compose import MAX_VALIDATED_JOBS, expand_sweeps

    found: dict[Path, set[int]] = {}
    for r in runs:
        if r.sweep is not None and r.trial is not None:
            found.setdefault(r.sweep, set()).add(r.trial)
    out = []
    for folder, nums in sorted(found.items()):
        multirun = _yaml(folder / "multirun.yaml")
        if not isinstance(multirun, dict):
            continue
        hydra = multirun.get("hydra") or {}
        task = [str(o) for o in ((hydra.get("overrides") or {}).get("task") or [])]
        try:
            jobs = expand_sweeps(task)
        except Exception:  # noqa: BLE001 - an override hoexp cannot expand: nothing to list
            continue
        if len(jobs) >= MAX_VALIDATED_JOBS:
            continue
        missing = [f"#{i} {' '.join(j)}" for i, j in enumerate(jobs) if i not in nums]
        if missing:
            out.append((folder, len(jobs), missing))
    return out


def missing_lines(missing: list[tuple[Path, int, list[str]]]) -> list[str]:
    """One line per sweep with missing jobs, and the command that runs them."""
    return [f"sweep {folder}: {len(jobs)} of {n} jobs have no summary.json (never run, or stopped): "
            f"{'; '.join(jobs[:8])}{' ...' if len(jobs) > 8 else ''}; run them with the sweep's command plus "
            f"hydra.sweep.dir={folder}" for folder, n, jobs in missing]


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

    def curve(self) -> list[tuple[float, float]]:
        """Validation loss against wall time; a study's trials back to back (each offset by the
        wall time of the trials before it)."""
        out: list[tuple[float, float]] = []
        offset = 0.0
        for r in self.runs:
            pts = r.curve()
            out.extend((offset + t, v) for t, v in pts)
            offset += r.wall_time_s if math.isfinite(r.wall_time_s) else (pts[-1][0] if pts else 0.0)
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
    cfg = run.config or {f"summary.{k}": v for k, v in run.summary.items()
                         if k in ("method", "hp", "dataset", "model", "outer_steps", "inner_steps", "num_hparams")}
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
        key = ("study", trials[0].sweeper, info.get("n_trials"), tuple(sorted(info.get("space", {}).items())),
               tuple(searched), _config_key(best, set(searched)))
        members.append((key, _tuning(best), Member(runs=trials, best=best, study=folder), searched))
        if info.get("each_row"):  # a grid: each point is also a row (over seeds)
            for r in trials:
                members.append((("run", "grid point", _config_key(r, set())), "grid point",
                                Member(runs=[r], best=r), []))
    for r in singles:
        members.append((("run", _tuning(r), _config_key(r, set())), _tuning(r), Member(runs=[r], best=r), []))

    groups: dict[tuple, Group] = {}
    for key, tuning, m, searched in members:
        g = groups.get(key)
        if g is None:
            groups[key] = Group(label=m.best.method, tuning=tuning, members=[m], searched=searched)
        else:
            g.members.append(m)
    out = list(groups.values())
    for g in out:
        g.members.sort(key=lambda m: (str(m.best.seed), str(m.best.path)))
    _label(out)
    out.sort(key=lambda g: (TUNING_ORDER.get(g.tuning, len(TUNING_ORDER)), g.tuning,
                            [_num(v) for v in g.first.params.values()] if g.tuning == "grid point" else [],
                            g.label))
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
        parts = []
        for k in sorted(cfg):
            if (k in IGNORED_KEYS or k in g.searched or k == "method.name" or k.endswith(".granularity")
                    or k.startswith("hydra.")):
                continue
            for j, h in enumerate(groups):
                if (j != i and h.label == g.label and k in h.first.config and k not in h.searched
                        and h.first.config[k] != cfg[k]):
                    parts.append(f"{_short_key(k)}={_fmt_value(cfg[k])}")
                    break
        if parts:
            labels[i] = f"{g.label} ({', '.join(parts)})"
    for g, label in zip(groups, labels):
        g.label = label


# ---------------------------------------------------------------------------------------- output
def _fmt(mean: float, std: float, spec: str, sep: str = " ± ") -> str:
    if not math.isfinite(mean):
        return "—" if math.isnan(mean) else str(mean)
    text = format(mean, spec)
    return f"{text}{sep}{format(std, spec)}" if math.isfinite(std) else text


def _bests(groups: list[Group]) -> dict[int, set[int]]:
    """Metric column → the rows whose mean is the best as printed (ties included); only with 2+ rows."""
    out: dict[int, set[int]] = {}
    if len(groups) < 2:
        return out
    for c, (block, key, _, spec) in enumerate(METRICS):
        means = [g.mean_std(g.values(block, key))[0] for g in groups]
        finite = [m for m in means if math.isfinite(m)]
        if len(finite) >= 2:
            best = format(min(finite) if key in LOWER_IS_BETTER else max(finite), spec)
            out[c] = {i for i, m in enumerate(means) if math.isfinite(m) and format(m, spec) == best}
    return out


def table_rows(groups: list[Group], sep: str = " ± ") -> tuple[list[str], list[list[str]]]:
    """The report's table as text cells (rich and Markdown render the same rows)."""
    header = ["method", "tuning", "family", "#hp", "runs", *(m[2] for m in METRICS), "wall time (s)",
              "hypergradients", "best trial"]
    rows = []
    for g in groups:
        metrics = [_fmt(*g.mean_std(g.values(b, k)), spec, sep) for b, k, _, spec in METRICS]
        nh = sorted({r.num_hparams for r in g.runs})
        rows.append([
            g.label, g.tuning, g.first.family, "/".join(f"{n:,}" for n in nh), g.count, *metrics,
            _fmt(*g.mean_std([m.wall_time_s for m in g.members]), ".1f", sep),
            _fmt(*g.mean_std([float(m.hypergradients) for m in g.members]), ".0f", sep),
            g.best_params,
        ])
    return header, rows


# Console columns left out, in this order, until the table fits the terminal (report.md has them all).
NARROW_DROPS = ("hypergradients", "test acc (final)", "test acc @best val", "val loss (final)", "#hp", "family",
                "wall time (s)", "tuning", "test loss (final)")


def print_table(groups: list[Group], console: Console, title: str = "hoexp report") -> None:
    """The table on the console; the best trials of studies are listed below it. On a narrow terminal
    the least important columns are left out (the method column never is) and named below the table."""
    header, rows = table_rows(groups, sep="±")
    header, rows = header[:-1], [r[:-1] for r in rows]
    keep = list(range(len(header)))
    dropped: list[str] = []
    for name in NARROW_DROPS:
        if _table_width(header, rows, keep) <= console.width:
            break
        keep.remove(header.index(name))
        dropped.append(name)
    console.print(_console_table(groups, header, rows, keep, title))
    if dropped:
        console.print(f"  (left out at this width: {', '.join(dropped)}; report.md has every column)",
                      markup=False, highlight=False, soft_wrap=True)
    for g in groups:
        for m in g.members:
            if m.is_study:
                params = " ".join(f"{_short_key(k)}={_fmt_value(v)}" for k, v in m.best.params.items())
                console.print(f"  {g.tuning} ({g.label}): best of {len(m.runs)} trials: #{m.best.trial} {params} "
                              f"(val loss {m.best.metric('best', 'val_loss'):.4f}) in {m.study}",
                              markup=False, highlight=False, soft_wrap=True)


def _table_width(header: list[str], rows: list[list[str]], keep: list[int]) -> int:
    """Columns the console table of ``keep`` takes unwrapped (cells as laid out by :func:`_console_table`:
    headers split before ``(`` and ``@``, family terms one per line), with padding and borders."""
    from rich.cells import cell_len

    def lines(i: int, text: str) -> list[str]:
        if i == 2:
            return text.split(" + ")
        if i >= 5:
            return text.replace(" (", "\n(").replace(" @", "\n@").replace("hypergradients", "hyper-\ngradients").split("\n")
        return [text]

    widths = [max(cell_len(ln) for cell in [header[i], *(r[i] for r in rows)] for ln in lines(i, cell)) for i in keep]
    return sum(widths) + 3 * len(keep) + 1


def _console_table(groups: list[Group], header: list[str], rows: list[list[str]], keep: list[int],
                   title: str) -> Table:
    """The rich table of the columns ``keep`` (indices into ``header``); best means in bold green."""
    bests = _bests(groups)
    table = Table(title=title, title_justify="left", header_style="bold")
    for i in keep:
        h = header[i]
        if i >= 5:
            h = h.replace(" (", "\n(").replace(" @", "\n@").replace("hypergradients", "hyper-\ngradients")
        table.add_column(h, justify="right" if i == 3 or i >= 5 else "left", no_wrap=i not in (0, 2),
                         min_width=min(24, max(len(r[0]) for r in rows)) if i == 0 and rows else None)
    for r, row in enumerate(rows):
        cells = [c.replace(" + ", " +\n") if i == 2 else c for i, c in enumerate(row)]
        table.add_row(*(f"[bold green]{escape(cells[i])}[/]" if 5 <= i < 5 + len(METRICS) and r in bests.get(i - 5, ())
                        else escape(cells[i]) for i in keep))
    return table


def _md_escape(text: str) -> str:
    return text.replace("|", r"\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def write_markdown(groups: list[Group], path: Path, sources: Sequence[str], plots: Sequence[Path],
                   missing: Sequence[str] = ()) -> None:
    header, rows = table_rows(groups)
    for c, best_rows in _bests(groups).items():
        for i in best_rows:
            rows[i][5 + c] = f"**{rows[i][5 + c]}**"
    nruns = len({r.path for g in groups for r in g.runs})  # a grid's runs are in two rows
    lines = ["# hoexp report", "",
             f"{nruns} run(s) from {', '.join(f'`{s}`' for s in sources)}; {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             *_md_table(header, rows), "",
             "Mean ± std over seeds (or over studies). A black-box study stands for its best trial (the lowest "
             "best validation loss, which the sweeper minimized); its wall time is the sum of its trials' wall "
             "times, the budget it spent. `@best val`: at the outer step with the lowest validation loss. "
             "Best mean of each column in bold. Every run: `runs.csv`.", ""]
    if missing:
        lines += ["## Missing jobs", "", *(f"- {_md_escape(m)}" for m in missing), ""]
    studies = [(g, m) for g in groups for m in g.members if m.is_study]
    if studies:
        lines += ["## Studies", ""]
        for g, m in studies:
            lines += [f"### {g.tuning}: `{m.study}`", "",
                      f"{len(m.runs)} trials, {m.wall_time_s:.1f} s in all; search space: "
                      + (", ".join(f"`{k}: {v}`" for k, v in m.runs[0].study_info.get("space", {}).items())
                         or ", ".join(f"`{k}`" for k in g.searched) or "—")
                      + f"; best trial #{m.best.trial}.", ""]
            th = ["trial", *(_short_key(k) for k in g.searched), "val loss (best)", "test loss @best val",
                  "test acc @best val", "wall time (s)", "status"]
            tr = []
            for r in m.runs:
                mark = " ★" if r is m.best else ""
                tr.append([f"{r.trial}{mark}", *(_fmt_value(r.params.get(k, "")) for k in g.searched),
                           _fmt(r.metric("best", "val_loss"), math.nan, ".4f"),
                           _fmt(r.metric("best", "test_loss"), math.nan, ".4f"),
                           _fmt(r.metric("best", "test_acc"), math.nan, ".3f"),
                           _fmt(r.wall_time_s, math.nan, ".1f"), r.status])
            lines += [*_md_table(th, tr), ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _csv_num(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return ""
    return str(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else repr(v)


def write_csv(groups: list[Group], path: Path) -> None:
    """One line per row: means, stds and the member folders."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        cols = [f"{b}_{k}" for b, k in CSV_METRICS if k != "step"]
        w.writerow(["label", "tuning", "method", "family", "num_hparams", "members", "runs", "count",
                    *(c for col in cols for c in (col, f"{col}_std")), "wall_time_s", "wall_time_s_std",
                    "hypergradients", "best_params", "folders"])
        for g in groups:
            stats: list[str] = []
            for b, k in CSV_METRICS:
                if k != "step":
                    stats.extend(map(_csv_num, g.mean_std(g.values(b, k))))
            w.writerow([g.label, g.tuning, g.first.method, g.first.family, g.first.num_hparams, len(g.members),
                        len(g.runs), g.count, *stats,
                        *map(_csv_num, g.mean_std([m.wall_time_s for m in g.members])),
                        _csv_num(g.mean_std([float(m.hypergradients) for m in g.members])[0]),
                        g.best_params, ";".join(str(m.study or m.best.path) for m in g.members)])


def write_runs_csv(groups: list[Group], path: Path) -> None:
    """One line per run (every trial of every study), with its searched values as ``param:<key>``."""
    keys = sorted({k for g in groups for k in g.searched})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "tuning", "study", "trial", "best_of_study", "seed", "method", "family", "num_hparams",
                    "status", *(f"param:{k}" for k in keys), *(f"{b}_{k}" for b, k in CSV_METRICS),
                    "wall_time_s", "hypergradients", "path"])
        for g in groups:
            for m in g.members:
                for r in m.runs:
                    w.writerow([g.label, g.tuning, m.study or "", "" if r.trial is None else r.trial,
                                int(m.is_study and r is m.best), r.seed, r.method, r.family, r.num_hparams,
                                r.status, *(r.params.get(k, "") for k in keys),
                                *(_csv_num(r.metric(b, k)) for b, k in CSV_METRICS),
                                _csv_num(r.wall_time_s), r.hypergradients, r.path])


# ----------------------------------------------------------------------------------------- plots
def _colors(n: int) -> list:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_val_loss_vs_time(groups: list[Group], path: Path) -> bool:
    """Left: validation loss against wall time for every run (a study's trials back to back, dots
    where a trial starts); right: the best validation loss so far. One colour per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(g, m, m.curve()) for g in groups for m in g.members]
    if not any(c for _, _, c in curves):
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = dict(zip(map(id, groups), _colors(len(groups))))
    labelled: set[int] = set()
    finals: list[float] = []
    top = -math.inf
    for g, m, pts in curves:
        pts = [(t, v) for t, v in pts if math.isfinite(t) and math.isfinite(v)]
        if not pts:
            continue
        c = colors[id(g)]
        label = None if id(g) in labelled else f"{g.label} [{g.tuning}]"
        labelled.add(id(g))
        ts, vs = zip(*pts)
        ax.plot(ts, vs, color=c, lw=1.0, alpha=0.8, label=label)
        if m.is_study:  # mark where each trial starts (its first evaluation)
            offset, starts = 0.0, []
            for r in m.runs:
                rp = [(t, v) for t, v in r.curve() if math.isfinite(t) and math.isfinite(v)]
                if rp:
                    starts.append((offset + rp[0][0], rp[0][1]))
                offset += r.wall_time_s if math.isfinite(r.wall_time_s) else (rp[-1][0] if rp else 0.0)
            if starts:
                ax.scatter(*zip(*starts), color=c, s=8, zorder=3)
        run_min, best = [], math.inf
        for v in vs:
            best = min(best, v)
            run_min.append(best)
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
        a.set_xlabel("wall time (s)")
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


def best_so_far(member: Member) -> list[tuple[float, float]]:
    """``(wall time, best validation loss so far)``: a run's running minimum over its evaluations;
    a study's best objective over its finished trials, at the cumulative run time of its trials."""
    if not member.is_study:
        out, best = [], math.inf
        for t, v in member.curve():
            if math.isfinite(t) and math.isfinite(v):
                best = min(best, v)
                out.append((t, best))
        return out
    out, best, cum = [], math.inf, 0.0
    for r in member.runs:
        cum += r.wall_time_s if math.isfinite(r.wall_time_s) else 0.0
        best = min(best, r.objective)
        if math.isfinite(best):
            out.append((cum, best))
    return out


def plot_best_so_far(groups: list[Group], path: Path) -> bool:
    """One panel: every contender's best validation loss so far against wall time, one line per
    seed (study), one colour per row; grid points are left to their ``grid search`` row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [g for g in groups if g.tuning != "grid point"]
    curves = [(g, m, best_so_far(m)) for g in shown for m in g.members]
    if not any(c for _, _, c in curves):
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = dict(zip(map(id, shown), _colors(len(shown))))
    labelled: set[int] = set()
    ends = []
    for g, m, pts in curves:
        if not pts:
            continue
        c = colors[id(g)]
        label = None if id(g) in labelled else f"{g.label} [{g.tuning}]"
        labelled.add(id(g))
        ts, vs = zip(*pts)
        ax.step(ts, vs, where="post", color=c, lw=1.6, alpha=0.85, label=label,
                marker="o" if m.is_study else None, ms=3)
        ends.append(vs[-1])
    _zoom_on_ends(ax, ends, min_span=0.05, above=3)  # where the contenders end up
    ax.set_xlabel("wall time (s); searches: cumulative trial time")
    ax.set_ylabel("best validation loss so far")
    ax.set_title("best validation loss so far (dots: a search's finished trials)")
    ax.grid(alpha=0.3)
    _save_with_legend(fig, ax, path)
    return True


def plot_hparams(groups: list[Group], path: Path, max_panels: int = 24) -> bool:
    """Histograms of the final hyperparameters (log10), one panel per row and family. A study shows
    the values its trials tried (grey) and its best trial's (coloured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
        allv = logv if tried_values is None else \
            np.concatenate([logv, np.log10(np.clip(tried_values, 1e-300, None))])
        lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 41)
        if tried_values is not None:
            ax.hist(np.log10(np.clip(tried_values, 1e-300, None)), bins=bins, color="0.75", label="trials")
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
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------- hoexp compare
def _compare_files(paths: Sequence[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for p in paths:
        f = Path(p) / "compare.json"
        if f.is_file():
            try:
                data = read_json(f)
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "contenders" in data:
                out.append((f, data))
    return out


def compare_lines(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Markdown lines for a ``compare.json`` (budgets; when each search matched each HO contender)
    and the short summary lines printed on the console."""
    obj = data.get("objective", "best")
    budget = data.get("budget") or {}
    per_seed = budget.get("per_seed") or {}
    md = [f"Objective of the grid and the searches: the **{obj}** validation loss (test loss is never used to "
          f"choose). Search budget per seed: {budget.get('rule', '?')}"
          + (": " + ", ".join(f"seed {k}: {v:.1f} s" for k, v in per_seed.items()) if per_seed else "")
          + f"; {data.get('workers', 1)} worker(s) per search; pruning "
          + ("on (MedianPruner)" if data.get("prune") else "off") + ".", ""]
    studies = [(c["name"], s) for c in data.get("contenders", []) if c.get("kind") == "search" for s in c["studies"]]
    if studies:
        rows = []
        for name, s in studies:
            states = ", ".join(f"{n} {k.lower()}" for k, n in (s.get("states") or {}).items())
            params = " ".join(f"{_short_key(k)}={_fmt_value(v)}" for k, v in (s.get("best_params") or {}).items())
            rows.append([name, str(s["seed"]), f"{s['budget_s']:.1f}", f"{s['wall_clock_s']:.1f}",
                         f"{s['trial_time_s']:.1f}", f"{s['n_trials']} ({states})",
                         "—" if s.get("best_trial") is None else f"#{s['best_trial']} {params}"])
        md += _md_table(["search", "seed", "budget (s)", "spent: wall clock (s)", "spent: trial time (s)", "trials",
                         "best trial"], rows) + [""]
    match = data.get("match") or []
    short: list[str] = []
    if match:
        rows = []
        for m in match:
            worth = m.get("fixed_runs")
            worth_text = "—" if worth is None else f"{worth:.2f}"
            if m["matched"]:
                rows.append([m["search"], m["ho"], str(m["seed"]), f"{m['target']:.4f}", "yes", str(m["trials"]),
                             f"{m['time_s']:.1f}", worth_text])
            else:
                rows.append([m["search"], m["ho"], str(m["seed"]), f"{m['target']:.4f}",
                             f"no, not in its {m['trials']} trials ({worth_text} fixed runs' worth)",
                             "—", "—", "—"])
        md += ["When each search's best-so-far validation loss first reached the HO run's (same seed), in trials, "
               "cumulative trial time and fixed runs' worth (that time / the `method=none` baseline run's "
               "wall time):", ""]
        md += _md_table(["search", "HO", "seed", "HO val loss", "matched", "trials", "trial time (s)",
                         "fixed runs' worth"], rows) + [""]
        for key in dict.fromkeys((m["search"], m["ho"]) for m in match):
            ms = [m for m in match if (m["search"], m["ho"]) == key]
            hit = [m["fixed_runs"] for m in ms if m["matched"] and m.get("fixed_runs") is not None]
            text = f"{key[0]} matched {key[1]}'s {obj} validation loss on {len(hit)}/{len(ms)} seed(s)"
            if hit:
                mean = statistics.fmean(hit)
                text += f", after {mean:.2f}" + (f" ± {statistics.stdev(hit):.2f}" if len(hit) > 1 else "") + \
                        " fixed runs' worth of wall time"
            short.append(text)
        md += [f"- {t}" for t in short] + [""]
    return md, short


# ---------------------------------------------------------------------------------------- report
@dataclass
class Report:
    runs: list[RunInfo]
    groups: list[Group]
    out_dir: Path
    files: list[Path]


def build_report(paths: Sequence[str | Path], out_dir: str | Path, *, console: Console | None = None,
                 plots: bool = True) -> Report:
    """Gather the runs under ``paths``, print the table and write the report files into ``out_dir``."""
    console = console or Console()
    runs = gather(paths, console=console)
    groups = group_runs(runs)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HoexpError(f"report: cannot create the output folder {out} ({e.strerror}); choose another with "
                         "--out <folder>") from None
    files: list[Path] = []
    pngs: list[Path] = []
    if plots:
        for name, fn in (("val_loss_vs_time.png", plot_val_loss_vs_time), ("best_so_far.png", plot_best_so_far),
                         ("hparams.png", plot_hparams)):
            if fn(groups, out / name):
                pngs.append(out / name)
    write_csv(groups, out / "report.csv")
    write_runs_csv(groups, out / "runs.csv")
    missing = missing_lines(missing_jobs(runs))
    write_markdown(groups, out / "report.md", [str(p) for p in paths], pngs, missing)
    summary_lines: list[str] = []
    for f, data in _compare_files(paths):
        md, short = compare_lines(data)
        summary_lines += short
        with open(out / "report.md", "a", encoding="utf-8") as fh:
            fh.write("\n".join([f"## hoexp compare: `{f}`", "", *md]))
    files = [out / "report.md", out / "report.csv", out / "runs.csv", *pngs]
    print_table(groups, console, title=f"hoexp report: {len(runs)} run(s), {len(groups)} row(s)")
    for text in summary_lines:
        console.print(f"  {text}", markup=False, highlight=False, soft_wrap=True)
    for text in missing:
        console.print(f"hoexp report: {text}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"hoexp report: wrote {', '.join(f.name for f in files)} → {out}", markup=False,
                  highlight=False, soft_wrap=True)
    return Report(runs=runs, groups=groups, out_dir=out, files=files)
