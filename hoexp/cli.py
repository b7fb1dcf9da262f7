"""The ``hoexp`` command line: ``hoexp run [overrides]`` (Hydra), ``check``, ``report``, ``compare``, ``--help``.

This module and ``config.py`` are the only ones that know about Hydra / OmegaConf. Before Hydra
launches anything, every job of the command (each combination of a ``-m`` sweep) is composed and
validated, so a typo fails in one line (exit code 2) instead of a traceback halfway through a sweep.
Set ``HYDRA_FULL_ERROR=1`` to see full tracebacks.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from hoexp.errors import ConfigError, HoexpError

# The configs ship inside the package (hoexp/conf), so an installed hoexp (wheel, pip install git+...)
# finds them wherever it runs from; Hydra reads them through its pkg:// search path.
CONF_DIR = Path(__file__).resolve().parent / "conf"
CONF_PKG = "pkg://hoexp.conf"
MAX_VALIDATED_JOBS = 256

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
  compare   HO methods against a fixed baseline, a grid, random search and TPE (Optuna) over the
            family's global value, at an equal wall-clock budget, over seeds; ends with a report:
              hoexp compare experiment=iris_per_weight_decay --methods neumann,cg --seeds 0,1,2
            'hoexp compare --help' lists its options (--grid, --budget-factor, --workers, ...).
  version   print the version

Runs write TensorBoard events, metrics.jsonl and summary.json under outputs/;
view them with: tensorboard --logdir outputs
"""

HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                          "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def fail(message: str, code: int = 2, error: BaseException | None = None) -> None:
    """Print ``hoexp: error: <message>`` and exit with ``code``. In a data-parallel run (``error`` given) ranks
    other than 0 print only their own failures (prefixed ``rank R of N:``, and left for rank 0's summary)."""
    from hoexp import distributed

    if error is not None and distributed.launched().active:
        message = distributed.prefix() + message
        if not distributed.launched().is_main and not isinstance(error, distributed.PeerLost):
            status = "interrupted" if type(error).__name__ == "Preempted" else "failed"
            distributed.tell_ended(status, message)  # for rank 0's summary.json (and its own one line)
        if distributed.quiet_failure(error):
            sys.exit(code)
    print(f"hoexp: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def conf_dir() -> Path:
    if not (CONF_DIR / "config.yaml").is_file():
        raise HoexpError(f"config folder not found at {CONF_DIR}: this hoexp installation is incomplete; "
                         "reinstall it (pip install --force-reinstall hoexp, or make install in a checkout)")
    return CONF_DIR


def user_config_dirs(overrides: list[str]) -> list[Path]:
    """The users' config folders on the search path (``--config-dir``, turned into ``hydra.searchpath``)."""
    dirs: list[Path] = []
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == "hydra.searchpath":
            dirs += [Path(v.strip().strip("'\"").removeprefix("file://")) for v in value.strip("[]").split(",")
                     if v.strip().strip("'\"").startswith("file://")]
    return dirs


def with_config_dir(args: list[str]) -> list[str]:
    """``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``) → the override ``hydra.searchpath=[file://DIR]``:
    the folder's options (``DIR/model/x.yaml``, ...) join hoexp's own, for validation and for Hydra alike."""
    out, dirs = [], []
    it = iter(args)
    for a in it:
        flag, eq, value = a.partition("=")
        if flag in ("--config-dir", "-cd"):
            value = value if eq else next(it, "")
            folder = Path(value).expanduser().absolute()
            if not value or not folder.is_dir():
                raise ConfigError(f"--config-dir {value or '(missing)'}: no such folder; give the folder that holds "
                                  "your config groups (e.g. DIR/model/my_model.yaml)")
            dirs.append(f"file://{folder}")
        else:
            out.append(a)
    return [*out, f"hydra.searchpath=[{','.join(dirs)}]"] if dirs else out


def config_groups(overrides: Sequence[str] = ()) -> list[str]:
    folders = [conf_dir(), *user_config_dirs(list(overrides))]
    return sorted({p.name for f in folders if f.is_dir() for p in f.iterdir()
                   if p.is_dir() and not p.name.startswith(("_", "."))})


def group_options(group: str, overrides: Sequence[str] = ()) -> list[str]:
    """The options of a config group: hoexp's and those in the users' config folders."""
    folders = [conf_dir() / group, *(d / group for d in user_config_dirs(list(overrides)))]
    return sorted({p.stem for f in folders if f.is_dir() for p in f.glob("*.yaml")})


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


# ------------------------------------------------------------------------------------ validation
# Config choices that are gone, and what replaces them (refused in one line before anything runs).
REMOVED = {
    "hydra/sweeper": "the Optuna sweepers (hydra/sweeper={value}) are gone (hydra-optuna-sweeper needs optuna<3); "
                     "random search and TPE at an equal wall-clock budget: hoexp compare experiment=<preset> "
                     "--search random,tpe (see 'hoexp compare --help')",
    "experiment": "experiment={value} is gone with the Optuna sweepers; black-box baselines now run with: "
                  "hoexp compare experiment=iris_per_weight_decay --search random,tpe [--search-lr]",
}
REMOVED_EXPERIMENTS = ("iris_blackbox_wd", "iris_blackbox_wd_lr", "iris_blackbox_wd_dropout_lr")


def refuse_removed(overrides: list[str]) -> None:
    """Raise ConfigError (one line naming ``hoexp compare``) for a removed sweeper or black-box preset."""
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == "hydra/sweeper" and value not in ("basic", ""):
            raise ConfigError(REMOVED["hydra/sweeper"].format(value=value))
        if key == "experiment" and any(v.strip() in REMOVED_EXPERIMENTS for v in value.split(",")):
            raise ConfigError(REMOVED["experiment"].format(value=value))


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """The override lists of the jobs a ``-m`` sweep launches (all combinations, capped).

    Overrides that cannot be expanded here (e.g. ``interval(...)``) are left for the sweeper;
    ``hydra.*`` overrides are left for Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    choices: list[list[str]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # not a plain list / range: the sweeper decides the values
                continue
            choices.append([f"{key}={v}" for v in values])
        else:
            assert o.input_line is not None  # parse_overrides sets it to the override's text
            choices.append([o.input_line])
    jobs = list(itertools.islice(itertools.product(*choices), MAX_VALIDATED_JOBS))
    if len(jobs) == MAX_VALIDATED_JOBS:  # too many to compose each: check every value once instead
        firsts = [c[0] for c in choices]
        jobs = [tuple(firsts[:i] + [v] + firsts[i + 1:]) for i, c in enumerate(choices) for v in c]
    return [list(j) for j in jobs]


def _explain_composition_error(message: str, overrides: list[str]) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "invalid override"
    m = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    if m:
        group, option = m.group(1), m.group(2)
        return f"unknown {group} '{option}'; choose one of: {', '.join(group_options(group, overrides))}"
    m = re.search(r"Could not override '([^']+)'", message)
    if m and "No match in the defaults list" in message:
        groups = config_groups(overrides)
        return f"unknown config group '{m.group(1)}'; groups: {', '.join(groups)}"
    if m:
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        valid = _valid_keys(parent, [o for o in overrides if not o.lstrip("+~").startswith(key + "=")])
        if not parent:  # a top-level name: config groups are valid too
            valid = sorted(set(valid) | set(config_groups(overrides)))
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        where = f" in {parent}" if parent else ""
        return f"unknown key '{leaf}'{where}{hint}; valid keys: {', '.join(valid)}"
    return first


def _compose(overrides: list[str], hydra: bool = False):
    """The composed config of one job (with Hydra's own node when ``hydra``)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    conf_dir()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONF_PKG.removeprefix("pkg://"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


def _valid_keys(parent: str, overrides: list[str]) -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    try:
        cfg = _compose(overrides)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:
        return []
    if not isinstance(node, DictConfig):
        return []
    keys = [k for k in node.keys() if k not in ("hydra", "_target_", "_partial_")]
    if parent.startswith("optim") or parent.startswith("hp.") or parent in ("method", "model", "dataset"):
        keys = [k for k in keys if k != "name"]
    return sorted(str(k) for k in keys)


def validate_job(overrides: list[str], device: bool = True) -> None:
    """Compose one job's config and check it completely (``device``: also that the device exists here);
    raise ConfigError with one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hoexp.build import preflight
    from hoexp.config import validate

    refuse_removed(overrides)
    try:
        cfg = _compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain_composition_error(str(e), overrides)) from None
    preflight(validate(cfg), device=device)


def compose_spec(overrides: list[str], config_dir: str | os.PathLike | None = None):
    """Compose and validate a config in-process (for scripts and tests): the checked Spec and the YAML.
    ``config_dir``: a folder of your own config groups (``hoexp run --config-dir``)."""
    from omegaconf import OmegaConf

    from hoexp.config import validate

    if config_dir is not None:
        overrides = with_config_dir([*overrides, "--config-dir", str(config_dir)])
    validate_job(overrides)
    cfg = _compose(overrides)
    return validate(cfg), OmegaConf.to_yaml(cfg)


# ------------------------------------------------------------------------------------- commands
def _task(cfg) -> float:
    """The Hydra job: validate, run, return the best validation loss (for sweepers).

    A run that diverges inside a sweep reports ``inf`` and lets the sweep go on (its summary.json
    says ``diverged``); any other error, or a divergence in a single run, ends with one line, exit 2.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from hoexp import distributed
    from hoexp.config import validate
    from hoexp.runner import Diverged, run_experiment

    try:
        spec = validate(cfg)
        if distributed.launched().active:  # torchrun joined in cmd_run; a multi-task SLURM job joins here
            distributed.init(spec.run.device)
        if HydraConfig.get().mode == RunMode.MULTIRUN and spec.run.resume == "true":
            spec.run.resume = "auto"  # a sweep resumes as a whole: jobs that never started (or checkpointed) start
        out_dir = HydraConfig.get().runtime.output_dir
        summary = run_experiment(spec, out_dir, config_text=OmegaConf.to_yaml(cfg))
    except Diverged as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"hoexp: warning: job {HydraConfig.get().job.num} diverged ({e}); the sweep goes on",
                  file=sys.stderr)
            return float("inf")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(e), e.exit_code, e)
    except HoexpError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(e), e.exit_code, e)
    except Exception as e:  # a data-parallel rank's own failure ends the job with one line (one process: traceback)
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
        raise ConfigError(f"cannot create the output folder {target}: {probe} is a file; choose another folder with "
                          f"{key}<path>")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to {probe} (for the output folder {target}); choose a writable folder "
                          f"with {key}<path>")


def claim_output_dir(overrides: list[str], multirun: bool, cfg) -> list[str]:
    """The override that gives this run (sweep) a folder of its own: the configured ``hydra.run.dir``
    (``hydra.sweep.dir``), created now, or that name plus ``-2``, ``-3``, ... when another start took it
    (runs started in the same second). ``[]`` when the command names its folder. ``cfg``: the first
    job's config with Hydra's node."""
    from omegaconf import OmegaConf

    from hoexp import rundir

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if any(o.lstrip("+~").startswith(key + "=") for o in overrides):
        return []
    path = str(OmegaConf.select(cfg, key))
    try:
        folder = rundir.claim(path)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {path} ({e.strerror}); choose another folder with "
                          f"{key}=<path>") from None
    text = str(folder)
    return [f"{key}={text}" if re.fullmatch(r"[\w./:-]+", text) else f"{key}='{text}'"]


def launched_ranks() -> int:
    """The number of processes this command was started as (torchrun, or a multi-task SLURM step); 0 for one."""
    from hoexp import distributed

    ctx = distributed.launched()
    return ctx.world_size if ctx.active else 0


def join_job(overrides: list[str], multirun: bool, cfg) -> list[str]:
    """One run on several processes (``torchrun -m hoexp run``): join the process group, then rank 0 claims the
    run folder (:func:`claim_output_dir`) and every rank takes the same; only rank 0 lets Hydra write ``.hydra/``."""
    from hoexp import distributed

    if multirun:
        raise ConfigError(f"hoexp run -m under torchrun ({launched_ranks()} processes) would run every job of the "
                          "sweep on all of them; run one job per torchrun, or sweep with hydra/launcher=slurm_ddp "
                          "(one task per GPU per job)")
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
    from hoexp.build import check_distributed
    from hoexp.config import validate

    launcher = cfg.hydra.launcher
    tasks = int(launcher.get("tasks_per_node", 1) or 1) * int(launcher.get("nodes", 1) or 1)
    if tasks > 1:
        for job in jobs:
            check_distributed(validate(_compose(job)), tasks)


def check_launcher(cfg) -> None:
    """A SLURM launcher needs SLURM here (submitit looks for ``srun``): else one line, before anything runs."""
    import shutil

    target = str(cfg.hydra.launcher.get("_target_", ""))
    if target.endswith("SlurmLauncher") and shutil.which("srun") is None:
        raise ConfigError("hydra/launcher=slurm needs a SLURM cluster (no srun on PATH here); try the same sweep "
                          "locally with hydra/launcher=submitit_local or hydra/launcher=parallel")


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
        if printing and multirun:
            return print_configs(jobs, args)
        if not printing:
            check_output_dir(overrides, multirun)
            first = ([*(o for o in overrides if o.lstrip("+~").startswith("hydra") and o not in search), *jobs[0]]
                     if multirun else jobs[0])
            cfg = _compose(first, hydra=True)
            check_launcher(cfg)
            check_launcher_tasks(cfg, jobs)
            args = [*args, *(join_job(overrides, multirun, cfg) if launched_ranks() else
                             claim_output_dir(overrides, multirun, cfg))]
    sys.argv = ["hoexp run", *args]
    conf_dir()
    hydra.main(config_path=CONF_PKG, config_name="config", version_base="1.3")(_task)()


def cmd_check(args: list[str]) -> None:
    import argparse
    import time

    from hoexp.check import ITERATIONS, run_check
    from hoexp.horizon import DEFAULT_CONTENDERS
    from hoexp.runner import thread_policy

    ap = argparse.ArgumentParser(prog="hoexp check", description="Hypergradient fidelity of every applicable "
                                 "method against a reference, on the configured problem (Hydra overrides). "
                                 "With --horizon: against the long-horizon truth (finite differences of the final "
                                 "validation loss over the whole remaining run).")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--iterations", default=",".join(map(str, ITERATIONS)),
                    help="iteration counts to sweep (comma-separated)")
    ap.add_argument("--dense-max", type=int, default=20_000, help="largest model for the exact dense reference")
    ap.add_argument("--horizon", action="store_true",
                    help="compare each method's hypergradient with d(final validation loss)/dλ (few hyperparameters: "
                         "global or per_layer granularity)")
    ap.add_argument("--method", action="append", default=None, metavar="NAME[:OVERRIDES]",
                    help="--horizon contender, repeatable: a method, then space-separated overrides (as "
                         "compare --ho), e.g. 'forward:method.carry=true method.decay=0.7' (default: {' '.join(DEFAULT_CONTENDERS)})")
    ap.add_argument("--at", default=None, help="--horizon checkpoints, outer steps (default: 0, N/4, N/2, 3N/4)")
    ap.add_argument("--eps", type=float, default=0.05, help="--horizon finite-difference step on the raw "
                    "hyperparameters (default 0.05)")
    ap.add_argument("--truth", default=None, metavar="HORIZON_JSON", help="--horizon: reuse the truth of an earlier "
                    "horizon.json measured on the same configuration (any methods)")
    ap.add_argument("--out", default=None, help="output folder (default: outputs/check/<date>_<time>)")
    ns = ap.parse_args(args)
    try:
        iterations = tuple(int(v) for v in ns.iterations.split(","))
        at = None if ns.at is None else [int(v) for v in ns.at.split(",")]
    except ValueError:
        raise ConfigError("--iterations and --at must be comma-separated integers") from None
    if not ns.eps > 0:
        raise ConfigError(f"--eps must be > 0, got {ns.eps}")
    spec, _ = compose_spec(ns.overrides)
    out = Path(ns.out or f"outputs/check/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    from hoexp.build import resolve_device

    # Small check problems run fastest on one CPU thread (see runner.thread_policy).
    with thread_policy(spec.run.threads, resolve_device(spec.run.device), 0):
        from rich.console import Console

        console = Console()
        if not console.is_terminal:
            console = Console(width=150)  # a wide table in logs and pipes
        if ns.horizon:
            from hoexp.horizon import parse_contender, run_horizon

            base = [o for o in ns.overrides if not o.startswith(("method=", "method."))]
            contenders = []
            for text in ns.method or DEFAULT_CONTENDERS:
                c = parse_contender(text)
                contenders.append((c, compose_spec(base + c.overrides)[0]))
            run_horizon(spec, contenders, out, at=at, eps=ns.eps, console=console,
                        truth_from=None if ns.truth is None else Path(ns.truth))
        else:
            run_check(spec, out, iterations=iterations, dense_max=ns.dense_max, console=console)


def cmd_report(args: list[str]) -> None:
    import argparse
    import time

    from rich.console import Console

    from hoexp.report import build_report

    ap = argparse.ArgumentParser(prog="hoexp report", description="Compare finished runs: every folder with a "
                                 "summary.json at or under PATH (runs, multirun and study folders). Seeds are "
                                 "averaged; a black-box study counts as its best trial.")
    ap.add_argument("paths", nargs="+", metavar="PATH")
    ap.add_argument("--out", default=None, help="output folder (default: outputs/reports/<date>_<time>)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ns = ap.parse_args(args)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a wide table in logs and pipes
    out = Path(ns.out or f"outputs/reports/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    build_report(ns.paths, out, console=console, plots=not ns.no_plots)


def cmd_compare(args: list[str]) -> None:
    from rich.console import Console

    from hoexp.compare import parse_args, run_compare

    plan = parse_args(args)  # every check before anything runs
    console = Console()
    if not console.is_terminal:
        console = Console(width=240)  # a wide table in logs and pipes
    run_compare(plan, console=console)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    try:
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
    except KeyboardInterrupt:  # Ctrl-C before a run has its own handler (imports, composing, loading data)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print("hoexp: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
