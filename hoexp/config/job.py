"""``hoexp run`` before Hydra launches: the output folder, the data-parallel join, the launcher's checks, ``--cfg``.

Every job was composed, validated and checked once (:func:`hoexp.config.compose.validate_job`); what is here
reads those :class:`~hoexp.config.compose.Job`\\ s (the first one's config carries Hydra's node) and composes
nothing again but ``--cfg``'s printout.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from hoexp.config.compose import Job, compose
from hoexp.errors import ConfigError


def check_output_dir(overrides: list[str], multirun: bool) -> None:
    """The run (or sweep) folder must be creatable: its nearest existing ancestor a writable folder."""
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [o.split("=", 1)[1] for o in overrides if o.startswith(key)]
    target = Path(given[-1] if given else "outputs").expanduser().absolute()
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"cannot create the output folder {target}: {probe} is a file; choose another folder with {key}<path>"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot write to {probe} (for the output folder {target}); choose a writable folder with {key}<path>"
        )


def claim_output_dir(overrides: list[str], multirun: bool, cfg) -> list[str]:
    """The override that gives this run (sweep) a folder of its own: the configured ``hydra.run.dir``
    (``hydra.sweep.dir``), created now, or that name plus ``-2``, ``-3``, ... when another start took it
    (runs started in the same second). ``[]`` when the command names its folder, which must then be new,
    empty or hoexp's own (:func:`hoexp.engine.rundir.adopt`; refused before Hydra writes anything into it).
    ``cfg``: the first job's config with Hydra's node."""
    from omegaconf import OmegaConf

    from hoexp.engine import rundir

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path = str(OmegaConf.select(cfg, key))
    try:
        if any(o.lstrip("+~").startswith(key + "=") for o in overrides):  # before Hydra writes .hydra/ there
            rundir.adopt(path or ".", key=key, sweep=multirun)
            return []
        folder = rundir.claim(path)
    except OSError as e:
        raise ConfigError(
            f"cannot create the output folder {Path(path).absolute()} ({e.strerror}); choose another folder "
            f"with {key}=<path>"
        ) from None
    text = str(folder)
    return [f"{key}={text}" if re.fullmatch(r"[\w./:-]+", text) else f"{key}='{text}'"]


def launched_ranks() -> int:
    """The number of processes this command was started as (torchrun, or a multi-task SLURM step); 0 for one."""
    from hoexp.engine import distributed

    ctx = distributed.launched()
    return ctx.world_size if ctx.active else 0


def join_job(overrides: list[str], multirun: bool, cfg) -> list[str]:
    """One run on several processes (``torchrun -m hoexp run``): join the process group, then rank 0 claims the
    run folder (:func:`claim_output_dir`) and every rank takes the same; only rank 0 lets Hydra write ``.hydra/``."""
    from hoexp.engine import distributed

    if multirun:
        raise ConfigError(
            f"hoexp run -m under torchrun ({launched_ranks()} processes) would run every job of the "
            "sweep on all of them; run one job per torchrun, or sweep with hydra/launcher=slurm_ddp "
            "(one task per GPU per job)"
        )
    ctx = distributed.init(str(cfg.device))
    claim: list[str] | str = []
    if ctx.is_main:
        try:
            claim = claim_output_dir(overrides, multirun, cfg)
        except ConfigError as e:
            distributed.broadcast(str(e), ctx)
            raise
    claim = distributed.broadcast(claim, ctx)
    if isinstance(claim, str):  # rank 0 could not create the folder (and says so)
        raise distributed.PeerLost(claim, reported=True)
    return [*claim, *([] if ctx.is_main else ["hydra.output_subdir=null"])]


def check_launcher_tasks(cfg, jobs: list[Job]) -> None:
    """A launcher with several tasks per job (``hydra/launcher=slurm_ddp``) runs each job data-parallel: every
    job's method must support it (refused in one line before anything is submitted)."""
    from hoexp.config.build import check_distributed

    launcher = cfg.hydra.launcher
    tasks = int(launcher.get("tasks_per_node", 1) or 1) * int(launcher.get("nodes", 1) or 1)
    if tasks > 1:
        for job in jobs:
            check_distributed(job.spec, tasks, job.prebuilt.method)


def check_launcher(cfg) -> None:
    """A SLURM launcher needs SLURM here (submitit looks for ``srun``): else one line, before anything runs."""
    target = str(cfg.hydra.launcher.get("_target_", ""))
    if target.endswith("SlurmLauncher") and shutil.which("srun") is None:
        chosen = cfg.hydra.runtime.choices.get("hydra/launcher") or "slurm"
        raise ConfigError(
            f"hydra/launcher={chosen} needs a SLURM cluster (no srun on PATH here); try the same sweep "
            "locally with hydra/launcher=submitit_local or hydra/launcher=parallel"
        )


def print_configs(jobs: list[list[str]], args: list[str]) -> None:
    """``--cfg job|hydra|all`` for a sweep (Hydra prints one config only): each job's config in turn."""
    from omegaconf import OmegaConf

    which = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--cfg", "-c")), "job")
    for i, job in enumerate(jobs):
        cfg = compose(job, hydra=which != "job")
        node = cfg.hydra if which == "hydra" else cfg
        print(f"# job {i}: {' '.join(job)}\n{OmegaConf.to_yaml(node, resolve='--resolve' in args)}")
