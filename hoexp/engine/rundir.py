"""Run folders: a unique folder per start, one writer per folder, and what a run leaves in it.

* :func:`claim` makes a new folder atomically (``mkdir`` fails if it exists), adding ``-2``, ``-3``, ...
  to the name, so runs started in the same second never share a folder.
* :class:`RunLock` is an exclusive ``flock`` on ``<folder>/.hoexp.lock`` held while a run writes; a
  second writer is refused in one line naming the holder. The kernel drops the lock when its process
  dies (``kill -9`` included), so a stale lock never blocks a resume.
* A run writes only into a folder it owns: one with its marker ``.hoexp-run``, put there when the folder
  was new or empty (:func:`claim`, :func:`adopt`). Any other folder is refused in one line, so a run never
  removes or overwrites a file it did not write. The marker names the TensorBoard files the run opened;
  :func:`logged_files` lists what the run wrote (those, :data:`RUN_FILES`, their temporary files) and
  :func:`clear` removes them before a fresh start in a folder where an earlier start left no checkpoint;
  :func:`discard` removes a folder a start made but logged nothing in (the data failed to load).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from hoexp.errors import HoexpError

LOCK_NAME = ".hoexp.lock"
MARKER = ".hoexp-run"  # {"created": the run made the folder, "events": the TensorBoard files it opened}
# What a run writes under fixed names besides .hydra/ (Hydra's, written before the run starts), the lock and
# the marker; and Hydra's and hoexp's own entries of a folder that holds no run yet.
RUN_FILES = ("checkpoint.pt", "summary.json", "metrics.jsonl", "final.pt")
EVENTS = "events.out.tfevents.*"
HYDRA_DIR = ".hydra"
JOB_LOG = "job.log"  # hydra/launcher=parallel: what the job prints, written before the run starts
TRIAL = "trial.json"  # hoexp compare: a grid point's or search trial's parameters, written before the run starts
SWEEP_FILES = ("multirun.yaml", ".submitit")  # Hydra's and submitit's, in a sweep's folder


def claim(path: str | os.PathLike[str], attempts: int = 1000) -> Path:
    """Create ``path`` (or ``path-2``, ``path-3``, ...: the first that does not exist) and return it.

    ``os.mkdir`` is atomic: of several processes claiming the same name, exactly one gets it.
    """
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, attempts + 1):
        candidate = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        mark(candidate, created=True)
        return candidate
    raise HoexpError(f"cannot find a free folder name next to {base} after {attempts} tries")


class RunLock:
    """Exclusive lock on a run folder for the lifetime of the ``with`` block (see the module doc).

    The lock file is removed on release; a process that opened the old file before the removal finds
    on locking that the path no longer names its file and tries again on the new one.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise HoexpError(
                    f"{self.folder} is in use by another hoexp run ({holder or 'holder unknown'}); "
                    "wait for it to end, or choose another folder with hydra.run.dir=<path>"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file between our open and our lock: use the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)  # releases the lock
            self.fd = None


# ------------------------------------------------------------------------------------------- ownership
def marker(folder: str | os.PathLike[str]) -> dict | None:
    """The folder's marker (``None``: not a hoexp folder; a damaged one reads as naming no file)."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def mark(folder: str | os.PathLike[str], *, created: bool, events: Iterable[str] = ()) -> None:
    """Write the marker: ``folder`` is a hoexp run's (``created``: the run made it; ``events``: its event files)."""
    data = {"created": created, "events": sorted(set(events))}
    write_atomic(Path(folder) / MARKER, (json.dumps(data) + "\n").encode())


def record_events(folder: str | os.PathLike[str], names: Iterable[str]) -> None:
    """Add TensorBoard event files the run just opened to the folder's marker (what :func:`clear` may remove);
    nothing where the folder has none (a run made with :func:`hoexp.run` on a folder of its caller's)."""
    data = marker(folder)
    if data is not None:
        mark(folder, created=bool(data.get("created")), events=[*data.get("events", []), *names])


def adopt(
    folder: str | os.PathLike[str],
    *,
    key: str = "hydra.run.dir",
    hydra_written: bool = False,
    sweep: bool = False,
    made: bool = False,
) -> None:
    """Make ``folder`` a hoexp run's (``sweep``: a sweep's) folder, creating it if needed; or refuse it.

    Accepted: a folder with the marker; a new or empty one; one that holds only what Hydra and hoexp wrote
    for this start (``hydra_written``: ``.hydra/``, a worker's ``job.log``, compare's ``trial.json``; always: a
    stale lock file);
    one a hoexp version before the marker wrote (its checkpoint says so). Anything else is a
    :class:`HoexpError` naming the option that picks another folder (``key``). OSError if it cannot be made.
    ``made``: the caller has just made the folder (:func:`discard` may remove it).
    """
    folder = Path(folder)
    if marker(folder) is not None:
        return
    if not folder.exists():
        folder.mkdir(parents=True)
        mark(folder, created=True)
        return
    if not folder.is_dir():
        raise HoexpError(f"{key}={folder.absolute()} is a file; choose a new or empty folder with {key}=<path>")
    allowed = {LOCK_NAME, *((HYDRA_DIR, JOB_LOG, TRIAL) if hydra_written else ())}
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    parent_is_ours = marker(folder.parent) is not None  # a job folder in a sweep folder hoexp made
    if not foreign:
        mark(folder, created=made or parent_is_ours)
    elif _written_before_markers(folder, sweep):
        mark(folder, created=False, events=[p.name for p in folder.glob(EVENTS)])
    else:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise HoexpError(
            f"{folder.absolute()} holds files hoexp did not write ({shown}); a run writes only into a new or empty folder "
            f"(or continues its own there), so it never removes or overwrites your files: choose another with "
            f"{key}=<path>"
        )


def _written_before_markers(folder: Path, sweep: bool) -> bool:
    """Whether ``folder`` is a run's (``sweep``: a sweep's) folder from hoexp before the marker: nothing but a
    run's files, one being a hoexp checkpoint (for a sweep: in a job folder, beside Hydra's files)."""
    if sweep:
        entries = list(folder.iterdir())
        jobs = [p for p in entries if p.is_dir() and p.name not in SWEEP_FILES]
        others = [p for p in entries if p not in jobs and p.name not in SWEEP_FILES]
        return not others and any(_written_before_markers(j, sweep=False) for j in jobs)
    known = {*RUN_FILES, HYDRA_DIR, JOB_LOG, TRIAL, LOCK_NAME}
    if any(p.name not in known and not p.match(EVENTS) for p in folder.iterdir()):
        return False
    try:
        import torch

        ckpt = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, damaged or foreign: no proof
        return False
    return isinstance(ckpt, dict) and {"step", "params", "raw", "evals", "config"} <= set(ckpt)


def logged_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files a run logged in its ``folder`` (see the module doc); none in a folder without the marker."""
    folder = Path(folder)
    data = marker(folder)
    if data is None:
        return []
    names = [*RUN_FILES, *(str(n) for n in data.get("events", []) if "/" not in str(n))]
    # write_atomic's and write_json_atomic's temporary files, and <name>.tmp (older hoexp's metrics.jsonl rewrite)
    patterns = [glob.escape(n) + t for n in names for t in ("", ".tmp")] + [
        f".{glob.escape(n)}{t}" for n in names for t in (".tmp", ".*.tmp")
    ]
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def clear(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove what an earlier start logged in ``folder`` (metrics, events, summary, ...); returns it."""
    files = logged_files(folder)
    for p in files:
        p.unlink(missing_ok=True)
    data = marker(folder)
    if data is not None and data.get("events"):  # the marker names only event files that are there
        kept = [n for n in data["events"] if (Path(folder) / n).is_file()]
        mark(folder, created=bool(data.get("created")), events=kept)
    return files


def discard(folder: str | os.PathLike[str]) -> bool:
    """After a start that logged nothing (its data failed to load, a signal while building): remove what
    Hydra and hoexp put in ``folder`` for it, and the folder if the start made it. Does nothing where the
    folder holds anything else (a run's files, a worker's job.log). True if the folder is gone."""
    folder = Path(folder)
    data = marker(folder)
    if data is None or any(p.name not in (MARKER, LOCK_NAME, HYDRA_DIR) for p in folder.iterdir()):
        return False
    shutil.rmtree(folder / HYDRA_DIR, ignore_errors=True)
    (folder / MARKER).unlink(missing_ok=True)
    if data.get("created"):
        with contextlib.suppress(OSError):
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()
            return True
    return False


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through ``.<name>.tmp`` and a rename: readers see the old file or the
    new one, and a failed write (a full disk) leaves neither a partial file nor the temporary one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a write error names no file: name it
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
