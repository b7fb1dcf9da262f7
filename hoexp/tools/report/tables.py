"""Writing report rows: the console table, ``report.md``, ``report.csv`` and ``runs.csv``."""

from __future__ import annotations

import csv
import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hoexp.tools.report.group import Group, _fmt_value, _short_key
from hoexp.tools.report.load import CSV_METRICS, LOWER_IS_BETTER, METRICS


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
    header = ["method", "tuning", "family", "#hp", "runs", *(m[2] for m in METRICS)]
    header += ["wall time (s)", "hypergradients", "best trial"]
    rows = []
    for g in groups:
        metrics = [_fmt(*g.mean_std(g.values(b, k)), spec, sep) for b, k, _, spec in METRICS]
        nh = "/".join(f"{n:,}" for n in sorted({r.num_hparams for r in g.runs}))
        wall = _fmt(*g.mean_std([m.wall_time_s for m in g.members]), ".1f", sep)
        hypergradients = _fmt(*g.mean_std([float(m.hypergradients) for m in g.members]), ".0f", sep)
        rows.append([g.label, g.tuning, g.first.family, nh, g.count, *metrics, wall, hypergradients, g.best_params])
    return header, rows


# Console columns left out, in this order, until the table fits the terminal (report.md has them all).
NARROW_DROPS: tuple[str, ...] = ("hypergradients", "test acc (final)", "test acc @best val", "val loss (final)")
NARROW_DROPS += ("#hp", "family", "wall time (s)", "tuning", "test loss (final)")


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
    say = functools.partial(console.print, markup=False, highlight=False, soft_wrap=True)
    if dropped:
        say(f"  (left out at this width: {', '.join(dropped)}; report.md has every column)")
    for g in groups:
        for m in g.members:
            if m.is_study:
                params = " ".join(f"{_short_key(k)}={_fmt_value(v)}" for k, v in m.best.params.items())
                say(
                    f"  {g.tuning} ({g.label}): best of {len(m.runs)} trials: #{m.best.trial} {params} "
                    f"(val loss {m.best.metric('best', 'val_loss'):.4f}) in {m.study}"
                )


def _table_width(header: list[str], rows: list[list[str]], keep: list[int]) -> int:
    """Columns the console table of ``keep`` takes unwrapped (cells as laid out by :func:`_console_table`:
    headers split before ``(`` and ``@``, family terms one per line), with padding and borders."""
    from rich.cells import cell_len

    def lines(i: int, text: str) -> list[str]:
        return text.split(" + ") if i == 2 else _split_header(text).split("\n") if i >= 5 else [text]

    widths = [max(cell_len(ln) for cell in [header[i], *(r[i] for r in rows)] for ln in lines(i, cell)) for i in keep]
    return sum(widths) + 3 * len(keep) + 1


def _split_header(text: str) -> str:
    """A metric column's header (or cell) on several lines: before ``(`` and ``@``, ``hypergradients`` hyphenated."""
    return text.replace(" (", "\n(").replace(" @", "\n@").replace("hypergradients", "hyper-\ngradients")


def _console_table(groups: list[Group], header: list[str], rows: list[list[str]], keep: list[int], title: str) -> Table:
    """The rich table of the columns ``keep`` (indices into ``header``); best means in bold green."""
    bests = _bests(groups)
    table = Table(title=title, title_justify="left", header_style="bold")
    for i in keep:
        table.add_column(
            _split_header(header[i]) if i >= 5 else header[i],
            justify="right" if i == 3 or i >= 5 else "left",
            no_wrap=i not in (0, 2),
            min_width=min(24, max(len(r[0]) for r in rows)) if i == 0 and rows else None,
        )
    for r, row in enumerate(rows):
        cells = [c.replace(" + ", " +\n") if i == 2 else c for i, c in enumerate(row)]
        table.add_row(
            *(
                f"[bold green]{escape(cells[i])}[/]"
                if 5 <= i < 5 + len(METRICS) and r in bests.get(i - 5, ())
                else escape(cells[i])
                for i in keep
            )
        )
    return table


def _md_escape(text: str) -> str:
    return text.replace("|", r"\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def write_markdown(
    groups: list[Group], path: Path, sources: Sequence[str], plots: Sequence[Path], missing: Sequence[str] = ()
) -> None:
    header, rows = table_rows(groups)
    for c, best_rows in _bests(groups).items():
        for i in best_rows:
            rows[i][5 + c] = f"**{rows[i][5 + c]}**"
    nruns = len({r.path for g in groups for r in g.runs})  # a grid's runs are in two rows
    lines = [
        "# hoexp report",
        "",
        f"{nruns} run(s) from {', '.join(f'`{s}`' for s in sources)}; {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
        *_md_table(header, rows),
        "",
        "Mean ± std over seeds (or over studies). A black-box study stands for its best trial (the lowest "
        "best validation loss, which the sweeper minimized); its wall time is the sum of its trials' wall "
        "times, the budget it spent. `@best val`: at the outer step with the lowest validation loss. "
        "Best mean of each column in bold. Every run: `runs.csv`.",
        "",
    ]
    if missing:
        lines += ["## Missing jobs", "", *(f"- {_md_escape(m)}" for m in missing), ""]
    studies = [(g, m) for g in groups for m in g.members if m.is_study]
    if studies:
        lines += ["## Studies", ""]
        for g, m in studies:
            lines += [
                f"### {g.tuning}: `{m.study}`",
                "",
                f"{len(m.runs)} trials, {m.wall_time_s:.1f} s in all; search space: "
                + (
                    ", ".join(f"`{k}: {v}`" for k, v in m.runs[0].study_info.get("space", {}).items())
                    or ", ".join(f"`{k}`" for k in g.searched)
                    or "—"
                )
                + f"; best trial #{m.best.trial}.",
                "",
            ]
            th = [
                "trial",
                *(_short_key(k) for k in g.searched),
                "val loss (best)",
                "test loss @best val",
                "test acc @best val",
                "wall time (s)",
                "status",
            ]
            tr = [
                [
                    f"{r.trial}{' ★' if r is m.best else ''}",
                    *(_fmt_value(r.params.get(k, "")) for k in g.searched),
                    _fmt(r.metric("best", "val_loss"), math.nan, ".4f"),
                    _fmt(r.metric("best", "test_loss"), math.nan, ".4f"),
                    _fmt(r.metric("best", "test_acc"), math.nan, ".3f"),
                    _fmt(r.wall_time_s, math.nan, ".1f"),
                    r.status,
                ]
                for r in m.runs
            ]
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
        head = ["label", "tuning", "method", "family", "num_hparams", "members", "runs", "count"]
        stat_cols = [c for col in [*cols, "wall_time_s"] for c in (col, f"{col}_std")]
        w.writerow([*head, *stat_cols, "hypergradients", "best_params", "folders"])
        for g in groups:
            values = [*(g.values(b, k) for b, k in CSV_METRICS if k != "step"), [m.wall_time_s for m in g.members]]
            stats = [_csv_num(x) for v in values for x in g.mean_std(v)]
            first = g.first
            w.writerow(
                [g.label, g.tuning, first.method, first.family, first.num_hparams, len(g.members), len(g.runs), g.count]
                + [*stats, _csv_num(g.mean_std([float(m.hypergradients) for m in g.members])[0]), g.best_params]
                + [";".join(str(m.study or m.best.path) for m in g.members)]
            )


def write_runs_csv(groups: list[Group], path: Path) -> None:
    """One line per run (every trial of every study), with its searched values as ``param:<key>``."""
    keys = sorted({k for g in groups for k in g.searched})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        head = ["label", "tuning", "study", "trial", "best_of_study", "seed", "method", "family", "num_hparams"]
        metrics = [f"{b}_{k}" for b, k in CSV_METRICS]
        w.writerow([*head, "status", *(f"param:{k}" for k in keys), *metrics, "wall_time_s", "hypergradients", "path"])
        for g in groups:
            for m in g.members:
                for r in m.runs:
                    trial = "" if r.trial is None else r.trial
                    w.writerow(
                        [g.label, g.tuning, m.study or "", trial, int(m.is_study and r is m.best), r.seed, r.method]
                        + [r.family, r.num_hparams, r.status, *(r.params.get(k, "") for k in keys)]
                        + [*(_csv_num(r.metric(b, k)) for b, k in CSV_METRICS), _csv_num(r.wall_time_s)]
                        + [r.hypergradients, r.path]
                    )
