"""The output of the tools: the folder of a command that takes ``--out`` (``check``, ``compare``), made before
any work starts or refused in one line that names the folder and the fix; and matplotlib for their plots."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from hoexp.errors import ConfigError

__all__ = ["make_out_dir", "pyplot"]


def make_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) and check that a file can be written in it (a permission check
    alone would pass for root on a read-only mount); :class:`ConfigError` otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError(
            f"cannot write the output folder {path} ({why}"
            + (f": {e.filename}" if e.filename and str(e.filename) != str(path) else "")
            + f"); choose a writable folder with {flag} <path>"
        ) from None
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: plots are written to files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
