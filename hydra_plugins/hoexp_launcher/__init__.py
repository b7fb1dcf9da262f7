"""hoexp's local parallel launcher as a Hydra plugin (``hydra/launcher=parallel``). Hydra instantiates
launchers only from this namespace package; the launcher itself is :mod:`hoexp.config.launcher`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.plugins.launcher import Launcher


class ParallelLauncher(Launcher):
    """Runs a sweep's jobs in local worker processes, ``n_jobs`` at a time (see :mod:`hoexp.config.launcher`)."""

    def __init__(self, n_jobs: int = -1) -> None:
        self.n_jobs = n_jobs
        self.config: Any = None
        self.task_function: Any = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from hoexp.config.launcher import launch  # imported when used: Hydra imports every plugin at start-up

        return launch(self, job_overrides, initial_job_idx)
