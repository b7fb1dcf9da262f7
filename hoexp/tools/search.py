"""Black-box search on a wall-clock budget: Optuna ask/tell driven by hoexp (random search, TPE, Hyperband).

The searchers (:data:`SEARCHERS`): ``random`` (Optuna's RandomSampler) and ``tpe`` (Optuna's default
TPESampler: since Optuna 5 multivariate, with constant liar), both with a MedianPruner unless
``prune`` is off; ``hyperband``, the multi-fidelity searcher: the same TPE with Optuna's
HyperbandPruner (successive halving in ``log_η(max/min resource) + 1`` brackets, η =
``reduction_factor``) over the intermediate values a trial reports, the resource being the step.

:func:`~hoexp.tools.search_workers.run_search` asks Optuna for a point, calls ``objective(ctx)`` (``ctx`` holds the trial's
number and values, and ``ctx.report(step, value)`` feeds Optuna's pruner: it raises
:class:`Pruned` when the trial should stop), tells the result, and starts no trial once the budget
has run out, so a search overshoots its budget by at most one trial. Trials run in ``workers``
local processes (``spawn``) sharing one study in an Optuna JournalStorage file; with one worker
they run in this process. The budget's clock starts when every worker is set up (imports, and
``objective.prepare()`` if the objective has one), as an HO run's wall time excludes start-up.
A trial that raises :class:`Pruned` is told ``PRUNED`` (it freed the rest of its time); a trial
stopped by a signal (Ctrl-C, SIGTERM) stays ``RUNNING`` and ends the search; any other exception is
told ``FAIL`` and ends the search. The objective is minimized; a trial's ``start_s`` and ``end_s`` are
seconds after the common start.

Continuing: ``run_search`` on a folder whose journal holds an earlier start of the same study
continues it. Trials left ``RUNNING`` (stopped by a signal, or by ``kill -9``) are run again with
their number and values first (a hoexp trial continues its run from its checkpoint), the clock goes on
from the time the earlier start had spent (its last recorded moment: a trial's end, stop or report),
and the samplers are seeded anew from the number of trials so far (an unchanged seed would repeat
the first start's points). Worker processes die with the process that started them (a parent-death
signal, and a thread that watches the parent), so a killed search leaves no orphans.

Reproducibility: with one worker and a deterministic objective, the same ``seed`` gives the same
trials. With several workers each gets its own sampler seed (``seed + 7919 * worker``) and the order
in which trials finish depends on timing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hoexp.errors import ConfigError, HoexpError, StopRun, signals_deferred

__all__ = [
    "Dim",
    "parse_dim",
    "SearchSettings",
    "TrialContext",
    "Pruned",
    "TrialRecord",
    "SearchResult",
    "SearchStopped",
    "read_search",
    "SAMPLERS",
    "SEARCHERS",
    "Searcher",
]

WORKER_SEED_STRIDE = 7919
RESTART_SEED_STRIDE = 104729  # a continued study's samplers: seeded with this × the trials it already has


class Pruned(StopRun):
    """The pruner stopped this trial (its validation loss is hopeless next to the other trials')."""

    status = "pruned"


class SearchStopped(HoexpError):
    """A signal stopped the search; its stopped trials stay ``RUNNING`` (a continued search resumes them)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def _stopped(e: BaseException) -> int | None:
    """The exit code if ``e`` stopped a trial on a signal (Ctrl-C, SIGTERM to a hoexp run), else None."""
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, SearchStopped):
        return e.exit_code
    from hoexp.engine.io import Preempted  # a hoexp run stopped by a signal (its checkpoint saved)

    return e.exit_code if isinstance(e, Preempted) else None


@dataclass(frozen=True)
class Dim:
    """One searched value: an override key and its range (log-uniform when ``log``)."""

    key: str
    low: float
    high: float
    log: bool = False

    def describe(self) -> str:
        return f"{'log-uniform' if self.log else 'uniform'} [{self.low:g}, {self.high:g}]"


def parse_dim(text: str) -> Dim:
    """``KEY=LOW:HIGH`` or ``KEY=LOW:HIGH:log`` (e.g. ``hp.weight_decay.init=1e-6:1:log``)."""
    key, sep, rng = text.partition("=")
    parts = rng.split(":")
    if not sep or not key or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "linear")):
        raise ConfigError(f"--space '{text}': expected KEY=LOW:HIGH or KEY=LOW:HIGH:log")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--space '{text}': LOW and HIGH must be numbers") from None
    log = len(parts) == 3 and parts[2] == "log"
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"--space '{text}': need finite LOW < HIGH")
    if log and low <= 0:
        raise ConfigError(f"--space '{text}': a log range needs LOW > 0")
    return Dim(key.strip(), low, high, log)


@dataclass
class SearchSettings:
    """What one search does: ``sampler`` (random | tpe) over ``space`` for ``budget_s`` seconds."""

    sampler: str
    space: list[Dim]
    budget_s: float
    seed: int = 0
    workers: int = 1
    prune: bool = True  # random / tpe: a MedianPruner (hyperband always prunes: that is the searcher)
    prune_startup: int = 3  # MedianPruner: completed trials before any pruning
    prune_warmup: int = 0  # MedianPruner: reported steps before a trial can be pruned
    tpe_startup: int = 5  # TPE: random trials before it models (Optuna's default of 10 is long here)
    max_trials: int | None = None  # also stop after this many trials (None: the budget alone)
    min_resource: int = 1  # Hyperband: the first step a trial reports (hoexp: eval_every)
    max_resource: int | None = None  # Hyperband: the last step a trial reports (None: the first finished trial's)
    reduction_factor: int = 3  # Hyperband: η, the fraction 1/η of a rung's trials promoted

    def check(self) -> None:
        if self.sampler not in SEARCHERS:
            raise ConfigError(f"unknown search '{self.sampler}'; choose from: {', '.join(SEARCHERS)}")
        if not self.space:
            raise ConfigError("the search space is empty")
        if not (math.isfinite(self.budget_s) and self.budget_s > 0):
            raise ConfigError(f"the search budget must be > 0 seconds, got {self.budget_s}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.max_trials is not None and self.max_trials < 1:
            raise ConfigError(f"--max-trials must be >= 1, got {self.max_trials}")
        if not (1 <= self.min_resource <= (self.max_resource or self.min_resource)) or self.reduction_factor < 2:
            raise ConfigError(
                f"Hyperband needs 1 <= min_resource <= max_resource and reduction_factor >= 2, got "
                f"{self.min_resource}, {self.max_resource}, {self.reduction_factor}"
            )


@dataclass
class TrialContext:
    """What an objective gets: the trial's ``number`` and ``params`` ({key: value}); ``report``."""

    number: int
    params: dict[str, float]
    _trial: Any = field(repr=False, default=None)
    attrs: dict[str, Any] = field(default_factory=dict)  # stored with the trial (e.g. its run folder)
    start: float = 0.0  # the search's common start (time.time()): reports record when they came
    reported: set[int] = field(default_factory=set)  # steps an earlier start of a resumed trial reported
    _saved: float = field(repr=False, default=0.0)  # when ``last_s`` was last stored

    def report(self, step: int, value: float) -> None:
        """Report an intermediate value (lower is better); raise :class:`Pruned` if the pruner says so.
        A step reported before (by the stopped start of a resumed trial) is not reported again."""
        if self._trial is None or int(step) in self.reported:
            return
        v = float(value) if math.isfinite(value) else 1e300  # Optuna refuses non-finite intermediates
        with signals_deferred():  # a run's stop waits until Optuna's journal writes are whole
            self._trial.report(v, int(step))
            if (now := time.time()) - self._saved >= 1.0:  # the clock a continued search goes on from (≤ 1 write/s)
                self._trial.set_user_attr("last_s", now - self.start)
                self._saved = now
            prune = self._trial.should_prune()
        if prune:
            raise Pruned(f"pruned at step {step} (intermediate value {value:.4g})")


@dataclass
class TrialRecord:
    number: int
    params: dict[str, float]
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING
    value: float | None  # the objective (COMPLETE only)
    start_s: float  # seconds after the search started
    end_s: float | None
    worker: int
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return (self.end_s - self.start_s) if self.end_s is not None else math.nan


@dataclass
class SearchResult:
    settings: SearchSettings
    trials: list[TrialRecord]  # in trial-number order
    wall_clock_s: float  # from the common start until the last trial ended
    storage: str

    @property
    def best(self) -> TrialRecord | None:
        done = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None and not math.isnan(t.value)]
        return min(done, key=lambda t: cast(float, t.value)) if done else None  # done: values are floats


# ---------------------------------------------------------------------------------------- optuna
def _storage(path: Path):
    import optuna

    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def _random(settings: SearchSettings, seed: int):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _tpe(settings: SearchSettings, seed: int):
    """Optuna's default TPE (Optuna 5: multivariate, constant liar), with hoexp's shorter random start-up."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.tpe_startup)


def _median(settings: SearchSettings):
    import optuna

    if not settings.prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=settings.prune_startup, n_warmup_steps=settings.prune_warmup)


def _hyperband(settings: SearchSettings):
    """Hyperband over the reported steps: bracket ``s`` first judges a trial at step ``min_resource · η^s``,
    then at each η-fold step, keeping the best ``1/η`` of the trials that reached that rung (ASHA's rule)."""
    import optuna

    return optuna.pruners.HyperbandPruner(
        min_resource=settings.min_resource,
        max_resource=settings.max_resource if settings.max_resource is not None else "auto",
        reduction_factor=settings.reduction_factor,
    )


@dataclass(frozen=True)
class Searcher:
    """A ``--search`` choice: its label in reports, its sampler ``(settings, seed)`` and its pruner ``(settings)``."""

    label: str
    sampler: Callable[[SearchSettings, int], Any]
    pruner: Callable[[SearchSettings], Any]
    multi_fidelity: bool = False  # it stops trials early by design (--no-prune does not apply)


SEARCHERS = {
    "random": Searcher("random search", _random, _median),
    "tpe": Searcher("TPE", _tpe, _median),
    "hyperband": Searcher("Hyperband (TPE)", _tpe, _hyperband, multi_fidelity=True),
}
SAMPLERS = {name: s.label for name, s in SEARCHERS.items()}  # --search names → labels in reports


def _study(settings: SearchSettings, storage, name: str, worker: int, restart: int = 0):
    """The study ``name`` (created, or loaded to continue it) with this worker's sampler and the pruner.
    ``restart``: the trials the study held when this start began (0 for a new study): it reseeds the samplers."""
    import optuna

    seed = settings.seed + WORKER_SEED_STRIDE * worker + RESTART_SEED_STRIDE * restart
    searcher = SEARCHERS[settings.sampler]
    return optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=searcher.sampler(settings, seed),
        pruner=searcher.pruner(settings),
        direction="minimize",
        load_if_exists=True,
    )


def _distributions(space: list[Dim]) -> dict[str, Any]:
    import optuna

    return {d.key: optuna.distributions.FloatDistribution(d.low, d.high, log=d.log) for d in space}


def _quiet_optuna() -> None:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _prepare(objective: Callable[[TrialContext], float]) -> None:
    """Set-up the budget does not count (like an HO run's imports): ``objective.prepare()`` if any."""
    prepare = getattr(objective, "prepare", None)
    if callable(prepare):
        prepare()


def _run_trial(study, trial, objective: Callable[[TrialContext], float], ctx: TrialContext, start: float) -> None:
    """Run one trial and tell Optuna how it ended; a trial stopped by a signal stays RUNNING (re-raised)."""
    from optuna.trial import TrialState

    try:
        value = float(objective(ctx))
    except Pruned:
        _finish(trial, ctx, start)
        study.tell(trial, state=TrialState.PRUNED)
        return
    except BaseException as e:
        if _stopped(e) is not None:  # left RUNNING: a continued search resumes it
            trial.set_user_attr("stopped_s", time.time() - start)
            raise
        _finish(trial, ctx, start)
        study.tell(trial, state=TrialState.FAIL)
        raise
    _finish(trial, ctx, start)
    if math.isnan(value):
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, value)  # +inf (a diverged run) is a valid, worst value


def _resumed(study, number: int, worker: int, start: float) -> tuple[Any, TrialContext]:
    """A trial an earlier start left RUNNING, to run again with its number and values."""
    import optuna

    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    trial = optuna.trial.Trial(study, frozen._trial_id)  # Optuna's handle on a trial that is still running
    trial.set_user_attr("worker", worker)
    ctx = TrialContext(number, dict(frozen.params), trial, start=start, reported=set(frozen.intermediate_values))
    return trial, ctx


def _loop(
    settings: SearchSettings,
    objective: Callable[[TrialContext], float],
    study,
    start: float,
    worker: int,
    resume: Sequence[int] = (),
) -> None:
    """Run the trials ``resume`` (left RUNNING by an earlier start), then ask, run, tell until the budget
    (or ``max_trials``) is spent."""
    for number in resume:
        trial, ctx = _resumed(study, number, worker, start)
        _run_trial(study, trial, objective, ctx, start)
    dists = _distributions(settings.space)
    deadline = start + settings.budget_s
    while (now := time.time()) < deadline:
        if settings.max_trials is not None and len(study.get_trials(deepcopy=False)) >= settings.max_trials:
            break
        trial = study.ask(dists)
        trial.set_user_attr("start_s", now - start)  # when it was decided to start it (ask included)
        trial.set_user_attr("worker", worker)
        _run_trial(study, trial, objective, TrialContext(trial.number, dict(trial.params), trial, start=start), start)


def _finish(trial, ctx: TrialContext, start: float) -> None:
    trial.set_user_attr("end_s", time.time() - start)
    for k, v in ctx.attrs.items():
        trial.set_user_attr(k, v)


def read_search(settings: SearchSettings, folder: str | Path, name: str, stopped_s: float = 0.0) -> SearchResult:
    """The trials of the search in ``folder`` as its journal holds them (``stopped_s``: the search's
    clock when it stopped, its wall-clock time if no trial recorded an end)."""
    import optuna

    journal = Path(folder) / "journal.log"
    study = optuna.load_study(study_name=name, storage=_storage(journal))
    trials = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        ua = {k: v for k, v in t.user_attrs.items() if k not in ("last_s", "stopped_s")}
        trials.append(
            TrialRecord(
                number=t.number,
                params={k: float(v) for k, v in t.params.items()},
                state=t.state.name,
                value=None if t.value is None else float(t.value),
                start_s=float(ua.pop("start_s", math.nan)),
                end_s=ua.pop("end_s", None),
                worker=int(ua.pop("worker", 0)),
                attrs=ua,
            )
        )
    ends = [t.end_s for t in trials if t.end_s is not None]
    wall = max(ends) if ends else stopped_s  # the search's work, not the workers' exit
    return SearchResult(settings=settings, trials=trials, wall_clock_s=wall, storage=str(journal))
