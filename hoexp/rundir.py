"""Run folders: a unique folder per start, one writer per folder, and what a run leaves in it.

* :func:`claim` makes a new folder atomically (``mkdir`` fails if it exists), adding ``-2``, ``-3``, ...
  to the name, so runs started in the same second never share a folder.
* :class:`RunLock` is an exclusive ``flock`` on ``<folder>/.hoexp.lock`` held while a run writes; a
  second writer is refused in one line naming the holder. The kernel drops the lock when its process
  dies (``kill -9`` included), so a stale lock never blocks a resume.
* :data:`RUN_FILES` are the files a run writes; :func:`logged_files` finds them and :func:`clear`
  removes them before a fresh start in a folder where an earlier start left no checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from hoexp.errors import HoexpError

LOCK_NAME = ".hoexp.lock"
# What a run writes besides .hydra/ (Hydra's, written before the run starts) and the lock.
RUN_FILES = (
    "checkpoint.pt",
    "summary.json",
    "metrics.jsonl",
    "final.pt",
    "events.out.tfevents.*",
    ".checkpoint.pt.tmp",
    ".*.tmp",
    "*.jsonl.tmp",
)


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


def logged_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files an earlier start of a run left in ``folder`` (see :data:`RUN_FILES`)."""
    folder = Path(folder)
    return sorted({p for pattern in RUN_FILES for p in folder.glob(pattern) if p.is_file()})


def clear(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove what an earlier start logged in ``folder`` (metrics, events, summary, ...); returns it."""
    files = logged_files(folder)
    for p in files:
        p.unlink(missing_ok=True)
    return files


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
