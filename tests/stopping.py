"""What the resume tests of stateful methods share: a logger that stops a run as SIGTERM does, and its metrics."""

from __future__ import annotations

import json
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
