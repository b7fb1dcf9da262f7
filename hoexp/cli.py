"""The ``hoexp`` command line: ``hoexp run [overrides]`` (Hydra), ``check``, ``report``, ``compare``, ``--help``.

This module and ``config.py`` are the only ones that know about Hydra / OmegaConf. Before Hydra
launches anything, every job of the command (each combination of a ``-m`` sweep) is composed and
validated, so a typo fails in one line (exit code 2) instead of a traceback halfway through a sweep.
Set ``HYDRA_FULL_ERROR=1`` to see full tracebacks.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hoexp import advice
from hoexp.errors import ConfigError, HoexpError, raise_if_stopped, stop_on_signals

if TYPE_CHECKING:
    from hoexp.config.compose import (  # noqa: F401 -- the config API, importable from here as before
        CONF_DIR,
        CONF_PKG,
        compose_spec,
        conf_dir,
        config_groups,
        expand_sweeps,
        group_options,
        refuse_removed,
        validate_job,
        with_config_dir,
    )
    from hoexp.config.compose import compose as _compose

# The config API, importable from here as before. It loads torch (seconds), so it is imported when first
# used, after main() has set up its signal handling: a Ctrl-C or SIGTERM at start-up is then one line.
CONFIG_API = "CONF_DIR CONF_PKG compose_spec conf_dir config_groups expand_sweeps group_options refuse_removed".split()
CONFIG_API += ["validate_job", "with_config_dir", "_compose"]


def load_config_api() -> None:
    """Bind the config API's names in this module (names already bound, e.g. by a test's monkeypatch, stay)."""
    from hoexp.config import compose as module

    for name in CONFIG_API:
        globals().setdefault(name, getattr(module, name.removeprefix("_")))


def __getattr__(name: str) -> Any:
    if name in CONFIG_API:
        load_config_api()
        return globals()[name]
    raise AttributeError(f"module 'hoexp.cli' has no attribute '{name}'")


USAGE = """\
usage: hoexp <command> [arguments]

Gradient-based hyperparameter optimization experiments (hypergradients) in PyTorch.

commands:
  run       run one experiment from Hydra overrides, or a sweep with -m:
              hoexp run method=neumann hp=weight_decay
              hoexp run -m method=neumann,cg,none seed=0,1,2
            'hoexp run --help' lists the config groups and their options;
            'hoexp run --cfg job' prints the composed config without running.
  check     compare every applicable method's hypergradient with a reference (exact dense
            solve when small, else long CG; full unroll for path methods), sweeping iterations:
              hoexp check model.width=32 inner_steps=200 [--iterations 0,1,5,20] [--out DIR]
            with --horizon: against d(final validation loss)/dλ over the whole remaining run:
              hoexp check --horizon hp=dropout hp.dropout.granularity=per_layer [--method forward:method.carry=true]
  report    compare finished runs (folders with summary.json, searched recursively): a table, plus
            report.md, report.csv, runs.csv and PNG plots in --out (default outputs/reports/<date>_<time>):
              hoexp report outputs/multirun/2025-01-01/12-00-00 [more folders] [--out DIR] [--no-plots]
  compare   HO methods against a fixed baseline, a grid, random search, TPE and Hyperband (Optuna) over
            the family's global value, at equal wall-clock budgets, over seeds; ends with a report:
              hoexp compare experiment=iris_per_weight_decay --methods neumann,cg --seeds 0,1,2
            'hoexp compare --help' lists its options (--grid, --budget-factor, --workers, ...).
  version   print the version

Runs write TensorBoard events, metrics.jsonl and summary.json under outputs/;
view them with: tensorboard --logdir outputs
"""

HYDRA_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--info",
    "-i",
    "--experimental-rerun",
}


def fail(message: str, code: int = 2, error: BaseException | None = None) -> None:
    """Print ``hoexp: error: <message>`` and exit with ``code``. In a data-parallel run (``error`` given) ranks
    other than 0 print only their own failures (prefixed ``rank R of N:``, and left for rank 0's summary)."""
    distributed = sys.modules.get("hoexp.engine.distributed")  # not imported yet: a signal may have cut torch's import
    if distributed is None:
        if error is not None and isinstance(error, KeyboardInterrupt) and os.environ.get("RANK", "0") != "0":
            sys.exit(code)  # a torchrun job stopped at start-up: rank 0 alone says so
    elif error is not None and distributed.launched().active:
        message = distributed.prefix() + message
        if not distributed.launched().is_main and not isinstance(error, distributed.PeerLost):
            status = "interrupted" if type(error).__name__ == "Preempted" else "failed"
            distributed.tell_ended(status, message)  # for rank 0's summary.json (and its own one line)
        if distributed.quiet_failure(error):
            sys.exit(code)
    print(f"hoexp: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def split_hydra_args(args: list[str]) -> tuple[list[str], set[str]]:
    """Separate Hydra's own flags from config overrides."""
    overrides, flags = [], set()
    it = iter(args)
    for a in it:
        if a.startswith("-"):
            flags.add(a.split("=")[0])
            if a in HYDRA_FLAGS_WITH_VALUE:
                next(it, None)
        else:
            overrides.append(a)
    return overrides, flags


# ------------------------------------------------------------------------------------- commands
def _task(cfg) -> float:
    """The Hydra job: validate, run, return the best validation loss (for sweepers).

    A run that diverges inside a sweep reports ``inf`` and lets the sweep go on (its summary.json
    says ``diverged``); any other error, or a divergence in a single run, ends with one line, exit 2.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from hoexp.config import validate
    from hoexp.config.run import Diverged, Preempted, run_experiment
    from hoexp.engine import distributed

    try:
        spec = validate(cfg)
        if distributed.launched().active:  # torchrun joined in cmd_run; a multi-task SLURM job joins here
            distributed.init(spec.run.device)
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        if multirun and spec.run.resume == "true":
            spec.run.resume = "auto"  # a sweep resumes as a whole: jobs that never started (or checkpointed) start
        out_dir = HydraConfig.get().runtime.output_dir
        summary = run_experiment(spec, out_dir, config_text=OmegaConf.to_yaml(cfg), **advice.resume_advice(multirun))
    except Diverged as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"hoexp: warning: job {HydraConfig.get().job.num} diverged ({e}); the sweep goes on", file=sys.stderr)
            return float("inf")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(e), e.exit_code, e)
    except (HoexpError, Preempted) as e:  # Preempted: stopped by a signal, saved, the line says how to resume
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(e), e.exit_code, e)
    except Exception as e:  # a data-parallel rank's own failure ends the job with one line (one process: traceback)
        raise_if_stopped()  # a failure after a signal whose exception a library swallowed: the stop, in one line
        if not distributed.launched().active or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", 1, e)
    finally:
        distributed.finish(distributed.current())
    return float(summary["best"].get("val_loss", float("nan")))


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


def check_launcher_tasks(cfg, jobs: list[list[str]]) -> None:
    """A launcher with several tasks per job (``hydra/launcher=slurm_ddp``) runs each job data-parallel: every
    job's method must support it (refused in one line before anything is submitted)."""
    from hoexp.config import validate
    from hoexp.config.build import check_distributed

    launcher = cfg.hydra.launcher
    tasks = int(launcher.get("tasks_per_node", 1) or 1) * int(launcher.get("nodes", 1) or 1)
    if tasks > 1:
        for job in jobs:
            check_distributed(validate(_compose(job)), tasks)


def compose_with_hydra(overrides: list[str]):
    """The first job's config with Hydra's node; an unknown ``hydra/<group>`` option (e.g. a launcher) is one
    line listing the valid ones, as for hoexp's own groups."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hoexp.config.compose import explain_composition_error

    try:
        return _compose(overrides, hydra=True)
    except (HydraException, OmegaConfBaseException) as e:
        message = str(e)
        m = re.search(r"Could not find '(hydra/[^']+)/([^'/]+)'", message)
        listed = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)+)", message)
        if m and listed:  # Hydra's own groups (launchers from plugins): the options Hydra lists
            options = ", ".join(line.strip() for line in listed.group(1).splitlines() if line.strip())
            raise ConfigError(f"unknown {m.group(1)} '{m.group(2)}'; choose one of: {options}") from None
        raise ConfigError(explain_composition_error(message, overrides)) from None


def check_launcher(cfg) -> None:
    """A SLURM launcher needs SLURM here (submitit looks for ``srun``): else one line, before anything runs."""
    import shutil

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
        cfg = _compose(job, hydra=which != "job")
        node = cfg.hydra if which == "hydra" else cfg
        print(f"# job {i}: {' '.join(job)}\n{OmegaConf.to_yaml(node, resolve='--resolve' in args)}")


def cmd_run(args: list[str]) -> None:
    import hydra

    args = with_config_dir(args)
    overrides, flags = split_hydra_args(args)
    refuse_removed(overrides)
    if not flags & {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}:
        multirun = bool(flags & {"-m", "--multirun"})
        search = [o for o in overrides if o.startswith("hydra.searchpath=")]
        jobs = [[*search, *j] for j in expand_sweeps(overrides)] if multirun else [overrides]
        printing = bool(flags & {"--cfg", "-c"})
        for job in jobs:
            validate_job(job, device=not printing)  # printing a config runs nothing: a GPU preset prints anywhere
        raise_if_stopped()  # torch was imported: its C code swallows a signal's exception during the import
        if printing and multirun:
            return print_configs(jobs, args)
        if not printing:
            check_output_dir(overrides, multirun)
            first = (
                [*(o for o in overrides if o.lstrip("+~").startswith("hydra") and o not in search), *jobs[0]]
                if multirun
                else jobs[0]
            )
            cfg = compose_with_hydra(first)
            check_launcher(cfg)
            check_launcher_tasks(cfg, jobs)
            args = [
                *args,
                *(
                    join_job(overrides, multirun, cfg)
                    if launched_ranks()
                    else claim_output_dir(overrides, multirun, cfg)
                ),
            ]
    sys.argv = ["hoexp run", *args]
    conf_dir()
    hydra.main(config_path=CONF_PKG, config_name="config", version_base="1.3")(_task)()


def cmd_check(args: list[str]) -> None:
    import time

    from hoexp.config.run import thread_policy
    from hoexp.errors import ArgumentParser
    from hoexp.tools.check import ITERATIONS, check_options, run_check
    from hoexp.tools.horizon import DEFAULT_CONTENDERS
    from hoexp.tools.outdir import make_out_dir

    ap = ArgumentParser(  # errors in one line
        prog="hoexp check",
        description="Hypergradient fidelity of every applicable "
        "method against a reference, on the configured problem (Hydra overrides). "
        "With --horizon: against the long-horizon truth (finite differences of the final "
        "validation loss over the whole remaining run).",
    )
    ap.add_argument("overrides", nargs="*")
    ap.add_argument(
        "--iterations", default=",".join(map(str, ITERATIONS)), help="iteration counts to sweep (comma-separated)"
    )
    ap.add_argument("--dense-max", type=int, default=20_000, help="largest model for the exact dense reference")
    ap.add_argument(
        "--horizon",
        action="store_true",
        help="compare each method's hypergradient with d(final validation loss)/dλ (few hyperparameters: "
        "global or per_layer granularity)",
    )
    ap.add_argument(
        "--method",
        action="append",
        default=None,
        metavar="NAME[:OVERRIDES]",
        help="--horizon contender, repeatable: a method, then space-separated overrides (as "
        "compare --ho), e.g. 'forward:method.carry=true method.decay=0.7' "
        f"(default: {', '.join(DEFAULT_CONTENDERS)})",
    )
    ap.add_argument("--at", default=None, help="--horizon checkpoints, outer steps (default: 0, N/4, N/2, 3N/4)")
    ap.add_argument(
        "--eps",
        type=float,
        default=0.05,
        help="--horizon finite-difference step on the raw hyperparameters (default 0.05)",
    )
    ap.add_argument(
        "--truth",
        default=None,
        metavar="HORIZON_JSON",
        help="--horizon: reuse the truth of an earlier horizon.json measured on the same configuration (any methods)",
    )
    ap.add_argument("--out", default=None, help="output folder (default: outputs/check/<date>_<time>)")
    ns = ap.parse_intermixed_args(args)  # overrides may follow options (--config-dir adds one at the end)
    refuse_hydra_overrides("check", ns.overrides)
    iterations, at = check_options(ns.iterations, ns.dense_max, ns.at, ns.eps)
    spec, _ = compose_spec(ns.overrides)
    out = make_out_dir(ns.out or f"outputs/check/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    from hoexp.config.build import resolve_device

    # Small check problems run fastest on one CPU thread (see runner.thread_policy).
    with thread_policy(spec.run.threads, resolve_device(spec.run.device), 0):
        from rich.console import Console

        console = Console()
        if not console.is_terminal:
            console = Console(width=150)  # a wide table in logs and pipes
        if ns.horizon:
            from hoexp.tools.horizon import parse_contender, run_horizon

            base = [o for o in ns.overrides if not o.startswith(("method=", "method."))]
            contenders = []
            for text in ns.method or DEFAULT_CONTENDERS:
                c = parse_contender(text)
                contenders.append((c, compose_spec(base + c.overrides)[0]))
            run_horizon(
                spec,
                contenders,
                out,
                at=at,
                eps=ns.eps,
                console=console,
                truth_from=None if ns.truth is None else Path(ns.truth),
            )
        else:
            run_check(spec, out, iterations=iterations, dense_max=ns.dense_max, console=console)


def refuse_hydra_overrides(command: str, overrides: list[str]) -> None:
    """``hoexp <command>`` runs no Hydra job: a ``hydra.*`` override (but --config-dir's search path) would be
    ignored, so it is refused in one line naming the option that does the job."""
    for o in overrides:
        if o.lstrip("+~").startswith("hydra") and not o.startswith("hydra.searchpath="):
            raise ConfigError(
                f"hoexp {command} does not take '{o}' (it runs no Hydra job): choose its output folder with "
                f"--out <folder>"
            )


def cmd_report(args: list[str]) -> None:
    import argparse
    import time

    from rich.console import Console

    from hoexp.tools.report import build_report

    ap = argparse.ArgumentParser(
        prog="hoexp report",
        description="Compare finished runs: every folder with a "
        "summary.json at or under PATH (runs, multirun and study folders). Seeds are "
        "averaged; a black-box study counts as its best trial.",
    )
    ap.add_argument("paths", nargs="+", metavar="PATH")
    ap.add_argument("--out", default=None, help="output folder (default: outputs/reports/<date>_<time>)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument(
        "--x",
        choices=("elapsed", "solver"),
        default="elapsed",
        help="the plots' time axis: wall time (default), or solver time (training and hypergradients only)",
    )
    ns = ap.parse_intermixed_args(args)  # overrides may follow options (--config-dir adds one at the end)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a wide table in logs and pipes
    out = Path(ns.out or f"outputs/reports/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    build_report(ns.paths, out, console=console, plots=not ns.no_plots, x=ns.x)


def cmd_compare(args: list[str]) -> None:
    from rich.console import Console

    from hoexp.tools.compare import parse_args, run_compare

    plan = parse_args(args)  # every check before anything runs
    console = Console()
    if not console.is_terminal:
        console = Console(width=240)  # a wide table in logs and pipes
    run_compare(plan, console=console)


def main(argv: list[str] | None = None) -> None:
    with stop_on_signals():  # until a run installs its own: SIGTERM / Ctrl-C at start-up end with one line
        _main(list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    try:
        load_config_api()
        if command == "run":
            cmd_run(rest)
        elif command == "check":
            cmd_check(with_config_dir(rest))
        elif command == "report":
            cmd_report(rest)
        elif command == "compare":
            cmd_compare(with_config_dir(rest))
        elif command in ("version", "--version"):
            from hoexp import __version__

            print(f"hoexp {__version__}")
        else:
            fail(f"unknown command '{command}'; commands: run, check, report, compare, version (see 'hoexp --help')")
    except HoexpError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(e), e.exit_code, e)
    except KeyboardInterrupt as e:  # a signal while no run had its own handler (imports, composing, loading data)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(
            advice.stopped_outside_a_run(command, getattr(e, "signum", signal.SIGINT)), 128 + getattr(e, "signum", 2), e
        )


if __name__ == "__main__":
    main()
