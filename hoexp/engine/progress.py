"""Progress display for the bilevel loop: an outer bar and an inner bar.

``make_progress`` picks rich bars on a terminal, plain log lines otherwise (CI,
pipes, log files) and a no-op when disabled. Steps are 0-based: ``end_outer(s)``
means outer step ``s`` is done, i.e. ``s + 1`` of ``total_outer`` steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["RunProgress", "NullProgress", "PlainProgress", "RichProgress", "make_progress", "format_fields"]

_MAX_PLAIN_LINES = 50


@runtime_checkable
class RunProgress(Protocol):
    def __enter__(self) -> RunProgress: ...

    def __exit__(self, *exc: object) -> None: ...

    def start_outer(self, step: int) -> None:
        """Outer step ``step`` begins; resets the inner bar."""
        ...

    def advance_inner(self, n: int = 1) -> None: ...

    def end_outer(self, step: int, fields: Mapping[str, float]) -> None:
        """Outer step ``step`` is done; ``fields`` (e.g. ``val_loss``) are shown."""
        ...

    def message(self, text: str) -> None: ...


def _format_value(key: str, v: float | int | str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, int)):
        return str(int(v))
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3f}" if "acc" in key else f"{v:.4g}"


def format_fields(fields: Mapping[str, float]) -> str:
    """``{"val_loss": 0.42131, "val_acc": 0.95}`` -> ``"val_loss=0.4213 val_acc=0.950"``."""
    return " ".join(f"{k}={_format_value(k, v)}" for k, v in fields.items())


class NullProgress:
    """Shows nothing (quiet mode)."""

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start_outer(self, step: int) -> None:
        pass

    def advance_inner(self, n: int = 1) -> None:
        pass

    def end_outer(self, step: int, fields: Mapping[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        pass


class PlainProgress(NullProgress):
    """One log line per outer step, e.g. ``[outer 12/100] val_loss=0.4213 elapsed=3.2s`` (no bars: the inner steps
    show nothing).

    Every step is printed when ``total_outer <= 50``; otherwise about 50 lines over
    the run, plus the last step (also printed on exit if the run stopped early).
    """

    def __init__(self, total_outer: int, total_inner: int, console: Console) -> None:
        self.total_outer = total_outer
        self.console = console
        self.every = max(1, math.ceil(total_outer / _MAX_PLAIN_LINES))
        self._t0 = time.monotonic()
        self._pending: str | None = None  # last ended step's line, if not printed

    def __enter__(self) -> PlainProgress:
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pending is not None:
            self._print(self._pending)
            self._pending = None

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def end_outer(self, step: int, fields: Mapping[str, float]) -> None:
        elapsed = f"elapsed={time.monotonic() - self._t0:.1f}s"
        line = " ".join(p for p in (f"[outer {step}/{self.total_outer}]", format_fields(fields), elapsed) if p)
        if step % self.every == 0 or step >= self.total_outer:
            self._print(line)
            self._pending = None
        else:
            self._pending = line

    def message(self, text: str) -> None:
        self._print(text)


class RichProgress:
    """Two rich progress bars (outer, inner) with the latest fields beside the outer."""

    def __init__(self, total_outer: int, total_inner: int, console: Console) -> None:
        self.total_inner = total_inner
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
        self.outer = self.progress.add_task("outer", total=total_outer, info="")
        self.inner = self.progress.add_task("inner", total=total_inner, info="")

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start_outer(self, step: int) -> None:
        self.progress.update(self.outer, completed=step - 1)
        self.progress.reset(self.inner, total=self.total_inner)

    def advance_inner(self, n: int = 1) -> None:
        self.progress.advance(self.inner, n)

    def end_outer(self, step: int, fields: Mapping[str, float]) -> None:
        self.progress.update(self.outer, completed=step, info=format_fields(fields))

    def message(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)


def make_progress(
    total_outer: int, total_inner: int, *, console: Console | None = None, enabled: bool = True
) -> RunProgress:
    """Bars on a terminal, plain log lines otherwise, nothing when ``enabled=False``.

    The default console writes to stderr.
    """
    if not enabled:
        return NullProgress()
    console = console if console is not None else Console(stderr=True)
    if console.is_terminal and not console.is_dumb_terminal:
        return RichProgress(total_outer, total_inner, console)
    return PlainProgress(total_outer, total_inner, console)
