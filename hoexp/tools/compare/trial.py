"""One run of ``hoexp compare`` and the search's trial objective.

:class:`Composer` composes a config once and derives runs from it by setting plain keys (the seed, a
grid or searched value), each value read with Hydra's override grammar, the grammar ``hoexp run``
reads it with, so a value validated as an override is the value that runs. :func:`run_one` runs one
hoexp run into a folder (continuing it from its checkpoint when an earlier start left one);
:class:`RunTrial` is the searches' objective, a ``method=none`` run at the trial's values whose
validation losses feed the pruner (:class:`PruneLogger`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from hoexp.engine.metrics import read_json, write_json_atomic
from hoexp.tools.search import TrialContext

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from hoexp.config.compose import Job

__all__ = ["Composer", "PruneLogger", "RunTrial", "format_value", "objective_value", "run_one"]

# A run whose summary.json says one of these is finished: a continued compare keeps it.
FINISHED = ("completed", "diverged")


def format_value(x: float) -> str:
    """A number as an override value that Hydra's grammar and YAML both read as exactly ``x``: integral
    values as ints (so int keys take them too), others as the shortest repr with a decimal point in the
    mantissa (``1.0e-05``: YAML 1.1 reads ``1e-05`` as a string)."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    text = repr(x)
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


class Composer:
    """Compose a config once (Hydra), then derive runs from it by setting plain keys (seed, the grid
    or searched values): Hydra's compose costs ~0.5 s, which would count against a search's budget.
    Picklable (composes lazily in each worker process)."""

    def __init__(self, overrides: list[str]):
        self.overrides = list(overrides)
        self._cfg: DictConfig | None = None
        self._parser: Any = None

    def __getstate__(self):
        return {"overrides": self.overrides, "_cfg": None, "_parser": None}

    def value(self, key: str, text: str) -> Any:
        """``text`` read as the value of the override ``key=text`` (Hydra's grammar, as ``hoexp run``)."""
        from hoexp.config.compose import explain_composition_error

        if self._parser is None:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            self._parser = OverridesParser.create()
        try:
            return self._parser.parse_override(f"{key}={text}").value()
        except Exception as e:  # the grammar's own error: one line
            from hoexp.errors import ConfigError

            raise ConfigError(explain_composition_error(str(e), [f"{key}={text}"])) from None

    def job(self, updates: dict[str, str]) -> Job:
        """The run with ``updates`` ({key: value as text}) applied: its overrides, config, checked spec and what
        :func:`~hoexp.config.build.preflight` built (the run's build takes it rather than build it again)."""
        import copy

        from omegaconf import OmegaConf

        from hoexp.config import validate
        from hoexp.config.build import preflight
        from hoexp.config.compose import Job
        from hoexp.config.compose import compose as _compose

        if self._cfg is None:
            self._cfg = _compose(self.overrides)
        cfg = copy.deepcopy(self._cfg)
        for k, v in updates.items():
            OmegaConf.update(cfg, k, self.value(k, v), merge=False)
        spec = validate(cfg)
        return Job([*self.overrides, *(f"{k}={v}" for k, v in updates.items())], cfg, spec, preflight(spec))

    def spec(self, updates: dict[str, str]):
        """``(spec, config_text, overrides)`` of :meth:`job`."""
        from omegaconf import OmegaConf

        job = self.job(updates)
        return job.spec, OmegaConf.to_yaml(job.cfg), job.overrides


def _write_run_files(folder: Path, spec, overrides: list[str], trial: dict[str, Any] | None = None) -> None:
    """What ``hoexp report`` reads besides summary.json: ``.hydra/config.yaml`` (the composed config,
    resolved) and ``.hydra/overrides.yaml``; ``trial.json`` for the trials of a grid or a search."""
    import yaml

    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if trial is not None:
        write_json_atomic(folder / "trial.json", trial)


def finished(folder: Path) -> dict[str, Any] | None:
    """The summary of a run that ended in ``folder`` (status in :data:`FINISHED`), else None."""
    try:
        summary = read_json(folder / "summary.json")
    except Exception:  # missing, or damaged: the run is done again (resumed from its checkpoint if any)
        return None
    return summary if isinstance(summary, dict) and summary.get("status") in FINISHED else None


def run_one(
    composer: Composer, updates: dict[str, str], folder: Path, *, loggers=(), trial: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One hoexp run (in this process) into ``folder``; returns its summary (also when it diverged).
    A checkpoint an earlier start left in ``folder`` is continued (``resume=auto``)."""
    from omegaconf import OmegaConf

    from hoexp.config.run import Diverged, run_experiment

    job = composer.job(updates)
    _write_run_files(folder, job.spec, job.overrides, trial)
    try:
        return run_experiment(
            job.spec,
            folder,
            config_text=OmegaConf.to_yaml(job.cfg),
            console=Console(file=io.StringIO()),
            loggers=list(loggers),
            prebuilt=job.prebuilt,  # what the checks built: the run builds the rest, not these again
        )
    except Diverged:
        return read_json(folder / "summary.json")


class PruneLogger:
    """A metric logger that reports each evaluation's validation loss to the search's pruner (the
    running minimum for ``objective='best'``); the runner stops the run when the pruner says so."""

    def __init__(self, ctx: TrialContext, objective: str):
        self.ctx, self.objective, self.best = ctx, objective, math.inf

    def log_scalars(self, step: int, values) -> None:
        v = values.get("loss/val")
        if step == 0 or v is None:  # step 0: before training, the same for every trial
            return
        v = float(v)
        self.best = min(self.best, v) if math.isfinite(v) else self.best
        self.ctx.report(step, self.best if self.objective == "best" else v)

    def log_histograms(self, step, values) -> None: ...
    def log_text(self, tag, text) -> None: ...
    def log_hparams(self, hparams, metrics) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def objective_value(summary: dict[str, Any], objective: str) -> float:
    """The validation loss a search minimizes (``best`` or ``final`` block); +inf if not finite."""
    v = (summary.get(objective) or {}).get("val_loss")
    if v is None:
        return math.inf
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.inf
    return v if math.isfinite(v) else math.inf


@dataclass
class RunTrial:
    """The search objective: one ``method=none`` hoexp run at the trial's values (picklable). A trial
    that an earlier start of the compare left running continues in its folder from its checkpoint."""

    composer: Composer
    seed: int
    folder: str
    objective: str

    def prepare(self) -> None:
        """Before the budget's clock starts (in each worker): compose the config and make one
        throwaway one-step run outside the study, so the first trial pays no one-time costs."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="hoexp-compare-warmup-") as tmp:
            run_one(self.composer, {"seed": str(self.seed), "outer_steps": "1", "checkpoint_every": "0"}, Path(tmp))

    def __call__(self, ctx: TrialContext) -> float:
        params = {k: format_value(v) for k, v in ctx.params.items()}
        run_dir = Path(self.folder) / f"trial_{ctx.number:03d}"
        ctx.attrs["run_dir"] = str(run_dir)
        try:
            summary = run_one(
                self.composer,
                {"seed": str(self.seed), **params},
                run_dir,
                loggers=[PruneLogger(ctx, self.objective)],
                trial={"number": ctx.number, "params": params},
            )
        finally:
            if (run_dir / "summary.json").is_file():
                s = read_json(run_dir / "summary.json")
                ctx.attrs.update(wall_time_s=s.get("wall_time_s"), status=s.get("status"))
        return objective_value(summary, self.objective)
