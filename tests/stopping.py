"""What the stop and resume tests share: a logger that stops a run as SIGTERM does, its metrics, and slowed steps
for a run a test stops from outside."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hoexp.config.run import Preempted


class StopAt:
    """A metric logger that raises Preempted (as SIGTERM does) when step ``at`` is logged."""

    def __init__(self, at):
        self.at = at

    def log_scalars(self, step, values):
        if step == self.at:
            raise Preempted("stopped by test", 143)

    def log_histograms(self, step, values): ...

    def log_text(self, tag, text): ...

    def log_hparams(self, hparams, metrics): ...

    def flush(self): ...

    def close(self): ...


def metrics(run_dir):
    """``metrics.jsonl`` without its timing keys (what a resumed run must reproduce exactly)."""
    lines = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if not k.startswith("time/")} for ln in lines]


# Each outer step's training sleeps first, so a run a test stops from outside cannot finish before the signal reaches
# it (20 tiny Iris steps take under 2 s; CI once saw a job end, or be in its interpreter's exit, as the signal came).
SLOW_STEPS = """
import time
import hoexp.method.base as base
import hoexp.method.implicit as implicit
original = base.train_inner
def slow(*args, **kwargs):
    time.sleep({seconds})
    return original(*args, **kwargs)
base.train_inner = implicit.train_inner = slow
"""


def with_site(env: dict, folder: Path, code: str) -> dict:
    """``env`` whose Python processes (workers too) first run ``code`` (a ``sitecustomize.py`` in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {**env, "PYTHONPATH": os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])}


def slow_steps(env: dict, folder: Path, seconds: float = 0.5) -> dict:
    """``env`` in which every outer step of a run takes ``seconds`` more."""
    return with_site(env, folder, SLOW_STEPS.format(seconds=seconds))
