"""Reading run folders for ``hoexp report``: one :class:`RunInfo` per folder with a ``summary.json``, the
studies they belong to, and the jobs a sweep should have that are missing."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from hoexp.engine.metrics import read_json, read_jsonl
from hoexp.engine.resume import RUN_CONTROL_KEYS
from hoexp.errors import HoexpError

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
CSV_METRICS: list[tuple[str, str]] = [
    (b, k)
    for b in ("best", "final")
    for k in ("step", "val_loss", "val_acc", "test_loss", "test_acc", "train_loss", "train_acc")
]
# The time axes of the plots (hoexp report --x, hoexp compare --x): metrics.jsonl key, summary.json key, label.
# solver: training and hypergradients only (hoexp.engine.budget), the axis benchmarks compare on.
TIME_AXES = {
    "elapsed": ("time/elapsed_s", "wall_time_s", "wall time (s)"),
    "solver": ("time/solver_s", "solver_time_s", "solver time (s)"),
}
LOWER_IS_BETTER = {"val_loss", "test_loss", "train_loss"}
# Config keys that never split runs into different rows (seed: rows aggregate over seeds; the others
# change how a run is executed or stored, not what it computes).
IGNORED_KEYS = {"seed", *RUN_CONTROL_KEYS}
TUNING_ORDER = {
    "hypergradients": 0,
    "fixed": 1,
    "grid point": 2,
    "grid search": 3,
    "random search": 4,
    "quasi-random search": 5,
    "TPE": 6,
    "Hyperband (TPE)": 7,
}
SAMPLERS = {
    "RandomSampler": "random search",
    "TPESampler": "TPE",
    "CmaEsSampler": "CMA-ES",
    "GridSampler": "grid search",
    "NSGAIISampler": "NSGA-II",
    "MOTPESampler": "MOTPE",
    "QMCSampler": "quasi-random search",
}


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


def _labelled(config: dict[str, Any], hydra: dict[str, Any]) -> dict[str, Any]:
    """``config`` with each label that config.yaml defaults to the option's file name
    (``${hydra:runtime.choices.method}``, saved unresolved by Hydra) replaced by the choice ``hydra.yaml`` records."""
    choices = (hydra.get("runtime") or {}).get("choices") or {}
    prefix = "${hydra:runtime.choices."
    return {
        k: choices.get(v[len(prefix) : -1], v) if isinstance(v, str) and v.startswith(prefix) and v.endswith("}") else v
        for k, v in config.items()
    }


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

    def time_s(self, x: str = "elapsed") -> float:
        """The run's time on the axis ``x`` (:data:`TIME_AXES`): wall time, or solver time (NaN where not logged)."""
        return _num(self.summary.get(TIME_AXES[x][1]))

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

    def curve(self, x: str = "elapsed") -> list[tuple[float, float]]:
        """``(time, loss/val)`` from ``metrics.jsonl``, time on the axis ``x``: ``time/elapsed_s`` or
        ``time/solver_s`` (:data:`TIME_AXES`; empty if missing, e.g. runs from before solver time was logged)."""
        key = TIME_AXES[x][0]
        try:
            lines = read_jsonl(self.path / "metrics.jsonl")
        except (OSError, ValueError):
            return []
        return [(_num(ln[key]), _num(ln["loss/val"])) for ln in lines if key in ln and "loss/val" in ln]

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
    info.study_info = {
        "study_name": info.path.parent.name,
        "n_trials": None,
        "direction": "minimize",
        "space": {str(k): str(v) for k, v in (st.get("space") or {}).items()},
        "objective": st.get("objective", "best"),
        "each_row": st.get("kind") == "grid",
        "budget_s": st.get("budget_s"),
        "wall_clock_s": st.get("wall_clock_s"),
    }
    return True


def load_run(path: Path) -> RunInfo:
    """One run folder (holding ``summary.json``)."""
    summary = read_json(path / "summary.json")
    if not isinstance(summary, dict):
        raise ValueError("summary.json is not an object")
    cfg = _yaml(path / ".hydra" / "config.yaml")
    hydra_file = _yaml(path / ".hydra" / "hydra.yaml")
    hydra = hydra_file.get("hydra", {}) if isinstance(hydra_file, dict) else {}
    info = RunInfo(path=path, summary=summary, config=_labelled(_flatten(cfg) if isinstance(cfg, dict) else {}, hydra))
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
                console.print(
                    f"hoexp report: skipping {d}: unreadable summary.json ({e})", markup=False, highlight=False
                )
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
    return [
        f"sweep {folder}: {len(jobs)} of {n} jobs have no summary.json (never run, or stopped): "
        f"{'; '.join(jobs[:8])}{' ...' if len(jobs) > 8 else ''}; run them with the sweep's command plus "
        f"hydra.sweep.dir={folder}"
        for folder, n, jobs in missing
    ]
