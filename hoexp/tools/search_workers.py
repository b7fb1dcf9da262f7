"""Running a search (:func:`run_search`, the module doc of :mod:`hoexp.tools.search` says how): its trials
in this process, or in local worker processes with ``workers > 1``.

Each worker (``spawn``) opens the study in the shared JournalStorage file, sets up (imports and
``objective.prepare()``), says it is ready, waits for the common start, then runs the search loop. A
worker dies with the process that started it (:func:`die_with_parent`: a ``kill -9`` of the parent
leaves no orphan), taking SIGTERM, on which a running hoexp trial saves its checkpoint.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hoexp.errors import HoexpError
from hoexp.tools.search import (
    SearchResult,
    SearchSettings,
    SearchStopped,
    TrialContext,
    _loop,
    _prepare,
    _quiet_optuna,
    _stopped,
    _storage,
    _study,
    read_search,
)

__all__ = ["die_with_parent", "run_search", "run_workers"]


def _spent(trials) -> float:
    """Seconds an earlier start of the study used: its last recorded moment (a trial's end, stop,
    last report, or start); 0 for a new study."""
    moments = [
        float(t.user_attrs[k]) for t in trials for k in ("start_s", "end_s", "stopped_s", "last_s") if k in t.user_attrs
    ]
    return max(moments, default=0.0)


def run_search(
    settings: SearchSettings, objective: Callable[[TrialContext], float], folder: str | Path, name: str = "search"
) -> SearchResult:
    """Run one search into ``folder`` (``journal.log`` holds the Optuna study) and return its trials.

    The budget's clock starts once every worker is set up (imports, ``objective.prepare()``). A journal
    with an earlier start of the study is continued (see :mod:`hoexp.tools.search`). ``objective`` must be picklable
    when ``settings.workers > 1`` (a module-level function or class).
    """
    from optuna.trial import TrialState

    settings.check()
    _quiet_optuna()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    journal = folder / "journal.log"
    earlier = _study(settings, _storage(journal), name, 0).get_trials(deepcopy=False)
    stopped = sorted(t.number for t in earlier if t.state == TrialState.RUNNING)
    spent = _spent(earlier)
    if settings.workers == 1:
        study = _study(settings, _storage(journal), name, 0, len(earlier))
        _prepare(objective)
        start = time.time() - spent
        _loop(settings, objective, study, start, 0, stopped)
    else:
        from hoexp.tools.search_workers import run_workers

        start = run_workers(settings, objective, str(journal), name, (len(earlier), stopped), spent)
    return read_search(settings, folder, name, time.time() - start)


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """End this process with ``sig`` when its parent ``parent`` dies (a ``kill -9`` included): Linux's
    parent-death signal (``prctl(PR_SET_PDEATHSIG)``), and a daemon thread that watches the parent's pid
    (other systems, and a parent that died before the prctl). SIGTERM lets a running hoexp trial save its
    checkpoint on the way out."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl: the thread below does it
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="hoexp-watch-parent", daemon=True).start()


def _worker_process(
    settings: SearchSettings,
    objective: Callable[[TrialContext], float],
    storage_path: str,
    name: str,
    worker: int,
    restart: tuple[int, list[int]],
    parent: int,
    messages,
    go,
    start_box,
) -> None:
    """A worker process: set up, say ready, wait for the common start, then :func:`_loop` (first the
    stopped trials ``restart[1]`` it continues; ``restart[0]``: the trials the study had)."""
    import traceback

    try:
        die_with_parent(parent)
        _quiet_optuna()
        study = _study(settings, _storage(Path(storage_path)), name, worker, restart[0])
        _prepare(objective)
        messages.put(("ready", worker, "", 0))
        go.wait()
        _loop(settings, objective, study, start_box.value, worker, restart[1])
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        code = _stopped(e)
        kind = "stopped" if code is not None else "hoexp" if isinstance(e, HoexpError) else "bug"
        messages.put((kind, worker, traceback.format_exc() if kind == "bug" else str(e), code or 1))
        raise SystemExit(1) from None


def run_workers(
    settings: SearchSettings, objective, journal: str, name: str, restart: tuple[int, list[int]], spent: float
) -> float:
    """Start ``settings.workers`` processes (the stopped trials ``restart[1]`` dealt out among them), start
    their common clock once all are ready (``spent`` seconds in, for a continued study), wait for them;
    return the start time. A worker's error is raised here (a HoexpError stays one; a signal's stop is a
    :class:`SearchStopped`)."""
    import queue

    ctx = multiprocessing.get_context("spawn")
    messages, go, start_box = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    n, stopped, parent = settings.workers, restart[1], os.getpid()
    procs = [
        ctx.Process(
            target=_worker_process,
            args=(settings, objective, journal, name, w, (restart[0], stopped[w::n]), parent, messages, go, start_box),
            daemon=True,
        )
        for w in range(n)
    ]
    for p in procs:
        p.start()
    errors: list[tuple[str, int, str, int]] = []
    ready = 0
    try:
        while ready < len(procs) and not errors:
            try:
                kind, w, text, code = messages.get(timeout=0.5)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    time.sleep(0.5)  # let its message arrive
                    errors.extend(_drain(messages))
                    if not errors:
                        errors.append(("bug", -1, "a search worker died while starting", 1))
                continue
            if kind == "ready":
                ready += 1
            else:
                errors.append((kind, w, text, code))
        start_box.value = time.time() - spent
        go.set()
        if not errors:
            for p in procs:
                p.join()
            errors.extend(e for e in _drain(messages) if e[0] != "ready")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: a running trial saves its checkpoint
                p.join()
    if errors:
        kind, w, text, code = errors[0]
        if kind == "stopped":
            raise SearchStopped(f"search worker {w}: {text}", code)
        if kind == "hoexp":
            raise HoexpError(f"search worker {w}: {text}")
        raise RuntimeError(f"search worker {w} failed:\n{text}")
    return start_box.value


def _drain(messages) -> list[tuple[str, int, str, int]]:
    import queue

    out = []
    while True:
        try:
            out.append(messages.get_nowait())
        except queue.Empty:
            return out
