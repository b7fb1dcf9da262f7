"""The engine: :func:`run` runs the bilevel loop on plain objects (an Experiment), for the CLI, ``hoexp check``,
tests and scripts alike. ``state`` (start, reset, snapshot, restore), ``guards`` (non-finite and solver
warnings), ``evaluate`` (metrics, summary) and ``io`` (folder, loggers, checkpoints, signals) live beside it."""

from hoexp.engine.io import RunIO
from hoexp.engine.loop import run
from hoexp.engine.state import RunState, reset_inner, restore, snapshot, start

__all__ = ["RunIO", "RunState", "reset_inner", "restore", "run", "snapshot", "start"]
