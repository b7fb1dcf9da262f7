"""Where datasets live on disk: one data root, one folder per dataset under it.

Layout: ``<root>/mnist/`` (torchvision's MNIST root, i.e. ``<root>/mnist/MNIST/raw/...``) and
``<root>/ptb/ptb.{train,valid,test}.txt``.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_root(configured: str | os.PathLike | None = None) -> Path:
    """The data root: ``configured`` (``dataset.data_root``) if given, else ``$HOEXP_DATA``, else
    ``${XDG_DATA_HOME:-~/.local/share}/hoexp/data``; ``~`` expanded and made absolute.

    Empty strings count as unset. Nothing is created or checked on disk.
    """
    value = os.fspath(configured) if configured is not None else ""
    if not value:
        value = os.environ.get("HOEXP_DATA", "")
    if not value:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        # The XDG spec says a relative XDG_DATA_HOME is invalid and must be ignored.
        base = Path(xdg) if xdg and os.path.isabs(os.path.expanduser(xdg)) else Path("~/.local/share")
        value = str(base / "hoexp" / "data")
    return Path(value).expanduser().absolute()
