"""The ``hoexp`` command line: ``hoexp run [overrides]`` (Hydra), ``check``, ``report``, ``compare``, ``--help``.

This module and ``config.py`` are the only ones that know about Hydra / OmegaConf. Before Hydra
launches anything, every job of the command (each combination of a ``-m`` sweep) is composed and
validated, so a typo fails in one line (exit code 2) instead of a traceback halfway through a sweep.
Set ``HYDRA_FULL_ERROR=1`` to see full tracebacks.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hoexp import advice
from hoexp.errors import ConfigError, HoexpError, raise_if_stopped, stop_on_signals

if TYPE_CHECKING:
    from hoexp.config.compose import (  # noqa: F401 -- the config API, importable from here as before
        CONF_DIR,
        CONF_PKG,
        Job,
        compose_spec,
        conf_dir,
        config_groups,
        expand_sweeps,
        group_options,
        refuse_removed,
        validate_job,
        with_config_dir,
    )
    from hoexp.config.compose import compose as _compose  # noqa: F401 -- importable from here as before

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

HYDRA_FLAGS_WITH_VALUE = set(
    "--cfg -c --package -p --config-path -cp --config-name -cn --config-dir -cd --info -i --experimental-rerun".split()
)


def fail(message: str, code: int = 2, error: BaseException | None = None) -> NoReturn:
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
class HydraTask:
    """The Hydra job function (:func:`run_job`) with the jobs this process composed, validated and built before
    launching (by their own overrides), so a job it runs is not composed, validated or built again. A launcher
    that pickles it for a process of its own (``hydra/launcher=parallel``, submitit) sends it without them: there
    each job validates its config itself."""

    def __init__(self, jobs: Sequence[Job] = ()):
        self.jobs = {job.key: job for job in jobs}

    def __getstate__(self) -> dict[str, Any]:
        return {"jobs": {}}

    def __call__(self, cfg) -> float:
        from hydra.core.hydra_config import HydraConfig

        from hoexp.config.compose import job_key

        return run_job(cfg, self.jobs.get(job_key(HydraConfig.get().overrides.task)))


def run_job(cfg, job: Job | None = None) -> float:
    """The Hydra job: run ``job`` (None: validate ``cfg`` first), return the best validation loss (for sweepers).

    A run that diverges inside a sweep reports ``inf`` and lets the sweep go on (its summary.json
    says ``diverged``); any other error, or a divergence in a single run, ends with one line, exit 2.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from hoexp.config import validate
    from hoexp.config.run import Diverged, Preempted, run_experiment
    from hoexp.engine import distributed

    launched, ctx = distributed.launched(), distributed.Context()  # the job's processes: read once, handed down
    try:
        spec = job.spec if job is not None else validate(cfg)
        if launched.active:  # torchrun joined in cmd_run; a multi-task SLURM job joins here
            ctx = distributed.init(spec.run.device)
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        if multirun and spec.run.resume == "true":
            spec.run.resume = "auto"  # a sweep resumes as a whole: jobs that never started (or checkpointed) start
        out_dir = HydraConfig.get().runtime.output_dir
        prebuilt = job.prebuilt if job is not None else None
        text = OmegaConf.to_yaml(cfg)
        summary = run_experiment(
            spec, out_dir, config_text=text, dist=ctx, prebuilt=prebuilt, **advice.resume_advice(multirun)
        )
    except (HoexpError, Preempted) as e:  # Preempted: stopped by a signal, saved, the line says how to resume
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(e, Diverged) and HydraConfig.get().mode == RunMode.MULTIRUN:
            print(f"hoexp: warning: job {HydraConfig.get().job.num} diverged ({e}); the sweep goes on", file=sys.stderr)
            return float("inf")
        fail(str(e), e.exit_code, e)
    except Exception as e:  # a data-parallel rank's own failure ends the job with one line (one process: traceback)
        raise_if_stopped()  # a failure after a signal whose exception a library swallowed: the stop, in one line
        if not launched.active or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", 1, e)
    finally:
        distributed.finish(ctx)
    return float(summary["best"].get("val_loss", float("nan")))


def cmd_run(args: list[str]) -> None:
    """``hoexp run``: every job composed, validated and checked once (:class:`Job`), then Hydra runs them."""
    import hydra

    from hoexp.config.job import (
        check_launcher,
        check_launcher_tasks,
        check_output_dir,
        claim_output_dir,
        join_job,
        launched_ranks,
        print_configs,
    )

    args = with_config_dir(args)
    overrides, flags = split_hydra_args(args)
    refuse_removed(overrides)
    prepared: list[Job] = []
    if not flags & {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}:
        multirun = bool(flags & {"-m", "--multirun"})
        search = [o for o in overrides if o.startswith("hydra.searchpath=")]
        jobs = [[*search, *j] for j in expand_sweeps(overrides)] if multirun else [overrides]
        printing = bool(flags & {"--cfg", "-c"})
        ranks = launched_ranks()
        # The first job's config keeps Hydra's node (launcher, output folder): the sweep's Hydra overrides first.
        hydra_overrides = [o for o in overrides if o.lstrip("+~").startswith("hydra") and o not in search]
        for i, job in enumerate(jobs):  # printing a config runs nothing: a GPU preset prints anywhere
            first = None if printing or i else (hydra_overrides if multirun else [])
            prepared.append(validate_job(job, device=not printing, world_size=max(ranks, 1), hydra=first))
        raise_if_stopped()  # torch was imported: its C code swallows a signal's exception during the import
        if printing and multirun:
            return print_configs(jobs, args)
        if not printing:
            check_output_dir(overrides, multirun)
            cfg = prepared[0].cfg
            check_launcher(cfg)
            check_launcher_tasks(cfg, prepared)
            claim = join_job(overrides, multirun, cfg) if ranks else claim_output_dir(overrides, multirun, cfg)
            args = [*args, *claim]
    sys.argv = ["hoexp run", *args]
    conf_dir()
    hydra.main(config_path=CONF_PKG, config_name="config", version_base="1.3")(HydraTask(prepared))()


def check_arguments() -> Any:
    """``hoexp check``'s argument parser (errors in one line)."""
    from hoexp.errors import ArgumentParser
    from hoexp.tools.check import ITERATIONS
    from hoexp.tools.horizon import DEFAULT_CONTENDERS

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
        "--smooth",
        type=float,
        default=None,
        metavar="SIGMA",
        help="--horizon: also the Gaussian-smoothed truth, the gradient of E L_V(λ + σε) (what ES estimates; "
        "use it with Bernoulli dropout), σ on the raw hyperparameters",
    )
    ap.add_argument(
        "--smooth-pairs",
        type=int,
        default=32,
        metavar="M",
        help="--horizon --smooth: antithetic pairs of remaining runs per checkpoint (default 32)",
    )
    ap.add_argument(
        "--truth",
        default=None,
        metavar="HORIZON_JSON",
        help="--horizon: reuse the truth of an earlier horizon.json measured on the same configuration (any methods)",
    )
    ap.add_argument("--out", default=None, help="output folder (default: outputs/check/<date>_<time>)")
    return ap


def cmd_check(args: list[str]) -> None:
    import time

    from hoexp.config.build import resolve_device
    from hoexp.config.run import thread_policy
    from hoexp.engine.distributed import launched
    from hoexp.tools.check import check_options, run_check
    from hoexp.tools.horizon import DEFAULT_CONTENDERS, Smoothing, parse_contender, run_horizon
    from hoexp.tools.outdir import make_out_dir

    ns = check_arguments().parse_intermixed_args(args)  # overrides may follow options (--config-dir adds one)
    refuse_hydra_overrides("check", ns.overrides)
    iterations, at = check_options(ns.iterations, ns.dense_max, ns.at, ns.eps)
    smoothing = None if ns.smooth is None else Smoothing(ns.smooth, ns.smooth_pairs)
    base = [o for o in ns.overrides if not o.startswith(("method=", "method."))]
    world = launched().world_size
    # Composed, validated and checked as `hoexp run` does; the tool's build takes what the checks built.
    # --horizon: the reference run tunes nothing (method=none), so a family no default method takes (Bernoulli) runs
    job = validate_job(base + ["method=none"] if ns.horizon else ns.overrides, world_size=world)
    spec = job.spec
    out = make_out_dir(ns.out or f"outputs/check/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    # Small check problems run fastest on one CPU thread (see runner.thread_policy).
    with thread_policy(spec.run.threads, resolve_device(spec.run.device), 0):
        console = wide_console(150)
        if not ns.horizon:
            run_check(spec, out, iterations=iterations, dense_max=ns.dense_max, console=console, prebuilt=job.prebuilt)
            return
        contenders = []
        for text in ns.method or DEFAULT_CONTENDERS:
            c = parse_contender(text)
            contenders.append((c, validate_job(base + c.overrides, world_size=world)))
        run_horizon(
            spec,
            contenders,
            out,
            at=at,
            eps=ns.eps,
            console=console,
            truth_from=None if ns.truth is None else Path(ns.truth),
            smoothing=smoothing,
            prebuilt=job.prebuilt,
        )


def wide_console(width: int) -> Any:
    """A rich console; in logs and pipes ``width`` columns wide (for a wide table)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=width)


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
    out = Path(ns.out or f"outputs/reports/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    build_report(ns.paths, out, console=wide_console(200), plots=not ns.no_plots, x=ns.x)


def cmd_compare(args: list[str]) -> None:
    from hoexp.tools.compare import parse_args, run_compare

    plan = parse_args(args)  # every check before anything runs
    run_compare(plan, console=wide_console(240))


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
    except (HoexpError, KeyboardInterrupt) as e:  # KeyboardInterrupt: a signal while no run had its own handler
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(e, HoexpError):
            fail(str(e), e.exit_code, e)
        signum = getattr(e, "signum", signal.SIGINT)
        fail(advice.stopped_outside_a_run(command, signum), 128 + signum, e)


if __name__ == "__main__":
    main()
