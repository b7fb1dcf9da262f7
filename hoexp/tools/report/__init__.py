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
(``hypergradients``, ``fixed``, ``grid point``, ``grid search``, ``random search``, ``TPE``,
``Hyperband (TPE)``) and a
``wall time`` column. Written to ``--out``: ``report.md`` (the table, one table per study and, for a
``hoexp compare`` folder, its budgets, each contender's best within each budget and when each search
matched HO, from ``compare.json``: :mod:`hoexp.tools.report.compare`),
``report.csv`` (one line per row), ``runs.csv`` (one line per run: every trial of every study, with
its searched values), ``val_loss_vs_time.png`` (validation loss and best validation loss so far
against wall time, the trials of a study back to back, so for trials run in parallel the axis is
compute time), ``best_so_far.png`` (one panel: each contender's best validation loss so far against
wall time; runs from their metrics.jsonl, studies as the best objective of their finished trials
over cumulative trial time; ``--x solver``: both against solver time, ``time/solver_s``, training and
hypergradients without evaluation or logging) and ``hparams.png`` (final hyperparameter histograms, log10).

The YAML files Hydra writes are read as plain YAML; only the jobs a sweep should have (to list the
missing ones) are expanded with Hydra's override parser, through ``hoexp.config.compose.expand_sweeps``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from hoexp.engine.metrics import read_json
from hoexp.errors import HoexpError
from hoexp.tools.report.compare import compare_lines
from hoexp.tools.report.group import Group, Member, group_runs
from hoexp.tools.report.load import METRICS, TIME_AXES, RunInfo, gather, missing_jobs, missing_lines
from hoexp.tools.report.plots import best_so_far, plot_best_so_far, plot_hparams, plot_val_loss_vs_time
from hoexp.tools.report.tables import print_table, write_csv, write_markdown, write_runs_csv

__all__ = ["RunInfo", "Member", "Group", "Report", "gather", "group_runs", "build_report", "best_so_far", "METRICS"]


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


# ---------------------------------------------------------------------------------------- report
@dataclass
class Report:
    runs: list[RunInfo]
    groups: list[Group]
    out_dir: Path
    files: list[Path]


@contextlib.contextmanager
def _named(path: Path) -> Iterator[None]:
    """An OSError while writing ``path`` (a full disk) is one line naming it; the runs are only read."""
    try:
        yield
    except OSError as e:
        raise HoexpError(
            f"report: cannot write {path} ({e.strerror or e}); free some space or choose another folder with "
            "--out <folder> (the runs were only read, nothing of them changed)"
        ) from None


def _writing(path: Path, write: Callable[..., Any], *args: Any) -> Any:
    """``write(*args)`` (which writes ``path``) under :func:`_named`; a file it left half-written is removed."""
    try:
        with _named(path):
            return write(*args)
    except HoexpError:
        path.unlink(missing_ok=True)
        raise


def build_report(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    console: Console | None = None,
    plots: bool = True,
    x: str = "elapsed",
) -> Report:
    """Gather the runs under ``paths``, print the table and write the report files into ``out_dir``; the plots'
    time axis ``x``: ``elapsed`` (wall time) or ``solver`` (training and hypergradients, ``time/solver_s``)."""
    if x not in TIME_AXES:
        raise HoexpError(f"report: --x {x!r} is not a time axis; choose one of: {', '.join(TIME_AXES)}")
    console = console or Console()
    runs = gather(paths, console=console)
    groups = group_runs(runs)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HoexpError(
            f"report: cannot create the output folder {out} ({e.strerror}); choose another with --out <folder>"
        ) from None
    pngs: list[Path] = []
    if plots:
        for name, fn in (
            ("val_loss_vs_time.png", plot_val_loss_vs_time),
            ("best_so_far.png", plot_best_so_far),
            ("hparams.png", plot_hparams),
        ):
            if _writing(out / name, fn, groups, out / name, *([x] if fn is not plot_hparams else [])):
                pngs.append(out / name)
    _writing(out / "report.csv", write_csv, groups, out / "report.csv")
    _writing(out / "runs.csv", write_runs_csv, groups, out / "runs.csv")
    missing = missing_lines(missing_jobs(runs))
    _writing(out / "report.md", write_markdown, groups, out / "report.md", [str(p) for p in paths], pngs, missing)
    summary_lines: list[str] = []
    for f, data in _compare_files(paths):
        md, short = compare_lines(data)
        summary_lines += short
        with _named(out / "report.md"), open(out / "report.md", "a", encoding="utf-8") as fh:
            fh.write("\n".join([f"## hoexp compare: `{f}`", "", *md]))
    files = [out / "report.md", out / "report.csv", out / "runs.csv", *pngs]
    print_table(groups, console, title=f"hoexp report: {len(runs)} run(s), {len(groups)} row(s)")
    say = functools.partial(console.print, markup=False, highlight=False, soft_wrap=True)
    for text in [*(f"  {t}" for t in summary_lines), *(f"hoexp report: {t}" for t in missing)]:
        say(text)
    say(f"hoexp report: wrote {', '.join(f.name for f in files)} → {out}")
    return Report(runs=runs, groups=groups, out_dir=out, files=files)
