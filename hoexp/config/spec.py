"""A composed config → a checked :class:`Spec`: the run's top-level keys and one Component per group.

Every option of a group names its factory with ``_target_`` (:mod:`hoexp.config.explain` checks the
node against the factory's signature); there is no list of options here. The top-level keys are the
:class:`RunConfig` dataclass. Only ``hoexp.config`` and ``cli.py`` know about OmegaConf.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from hoexp.config.explain import Component, component
from hoexp.errors import ConfigError

# ------------------------------------------------------------------------------------- the run
RESUME_MODES = ("false", "true", "auto")
NAME = re.compile(r"[A-Za-z0-9_.,+=@-]{1,100}")  # one folder name: nothing that escapes outputs/


@dataclass
class RunConfig:
    """Top-level keys other tools rely on."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"
    outer_steps: int = 100  # hypergradient steps
    inner_steps: int = 100  # training steps between hypergradients
    threads: int = 0  # CPU threads; 0 = auto (1 for small models, where more threads only add overhead)
    eval_every: int = 1  # evaluate train/val/test every N outer steps (and at the last)
    histogram_every: int = 10  # hyperparameter histograms in TensorBoard every N outer steps
    log_every: int = 1  # scalars (metrics.jsonl, TensorBoard) every N outer steps, and at every evaluation
    progress: bool = True  # rich bars on a terminal, plain lines otherwise
    reset_inner: bool = False  # re-initialize the weights before every outer step (Maclaurin-style meta-training)
    warmup: int = 0  # outer steps of plain training (no hypergradient) before the first hyper-step
    warmup_until_plateau: bool = False  # and then until an evaluation's validation loss is above the best so far
    compile: bool = False  # plain training steps through torch.compile (seconds to compile; faster steps)
    checkpoint_every: int = 10  # outer steps between checkpoints (0: none, except on SIGTERM/SIGINT)
    # auto: continue from checkpoint.pt in the run folder if there is one, else start (over); true: continue
    # (an error without checkpoint); false: start (refused where a run already logged)
    resume: str = "auto"
    max_nonfinite: int = 3  # non-finite hypergradients in a row (each skips its outer update) before aborting
    outer_objective: str = "val"  # val: validation loss; train: final training loss (Maclaurin et al.'s meta-objective)
    precision: str = "fp32"  # fp32 | bf16 | fp16: plain inner training steps under autocast (hoexp.engine.precision)
    # A budget of solver time (training and hypergradients): seconds, or "HH:MM:SS" / "MM:SS"; None: no budget.
    # The run ends at the first outer step that reaches it, as completed (summary.json: stopped_by max_time).
    max_time: Any = None
    name: str = "run"

    def check(self) -> None:
        _zero_bound(self, ">=", "outer_steps", "threads", "seed", "checkpoint_every", "warmup")
        if not (isinstance(self.inner_steps, int) and self.inner_steps >= 1):  # 0: every outer step trains nothing
            raise ConfigError(
                f"inner_steps must be >= 1 (the training steps between hypergradients), got {self.inner_steps}"
            )
        _zero_bound(self, ">", "max_nonfinite", "eval_every", "histogram_every", "log_every")
        if self.outer_objective not in ("val", "train"):
            raise ConfigError(f"outer_objective must be val or train, got '{self.outer_objective}'")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got '{self.dtype}'")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        self.max_time = parse_max_time(self.max_time)
        self.resume = self.resume.lower()  # YAML booleans arrive as 'True' / 'False'
        _choice("resume", self.resume, RESUME_MODES)
        if not NAME.fullmatch(self.name) or self.name in (".", ".."):
            raise ConfigError(
                f"name={self.name!r} must be a plain folder name (letters, digits and . _ - + = , @; "
                "no '/' or spaces): it names the run's folder"
            )


@dataclass
class Spec:
    """A checked experiment config: the top-level run keys plus one :class:`Component` per group."""

    run: RunConfig
    dataset: Component
    model: Component
    hp: list[Component]  # one per tuned family (hp=[weight_decay,dropout] tunes two)
    method: Component
    inner_optim: Component
    outer_optim: Component
    raw: dict  # the composed config as plain containers, for logging

    @property
    def hp_name(self) -> str:
        return "+".join(h.name for h in self.hp)


def parse_max_time(value: Any) -> float | None:
    """``max_time`` in seconds: a number, ``"HH:MM:SS"`` or ``"MM:SS"`` (``None``: no budget); else ConfigError."""
    if value is None:
        return None
    seconds: float = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"(\d+:){1,2}\d+(\.\d*)?", value.strip()):
        *big, last = value.strip().split(":")
        if all(int(p) < 60 for p in big[1:]) and float(last) < 60:
            seconds = sum(int(p) * 60 ** (len(big) - i) for i, p in enumerate(big)) + float(last)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(
            f"max_time={value!r} is not a time budget; give seconds (max_time=600), HH:MM:SS or MM:SS "
            "(max_time=1:30:00, max_time=05:00), or max_time=null for none"
        )
    return seconds


def _zero_bound(obj: Any, op: str, *names: str) -> None:
    """Each attribute in ``names`` a finite number ``> 0`` (``op`` ``">"``) or ``>= 0`` (``op`` ``">="``)."""
    for n in names:
        v = getattr(obj, n)
        if not (isinstance(v, (int, float)) and (v > 0 if op == ">" else v >= 0) and math.isfinite(v)):
            raise ConfigError(f"{n} must be {op} 0, got {v}")


def _choice(key: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}='{value}' is not valid; choose one of: {', '.join(sorted(valid))}")


RUN_KEYS = {f.name for f in fields(RunConfig)}
GROUP_KEYS = {"dataset", "model", "hp", "method", "optim"}


def _families(node: Any) -> list[Component]:
    """``hp`` holds one node per family, each under its own key (``hp.weight_decay``, ``hp.dropout``)."""
    if not isinstance(node, DictConfig) or not node:
        raise ConfigError("choose at least one hp family: hp=<family> or hp=[a,b] ('hoexp run --help' lists them)")
    if "_target_" in node:  # a family's YAML without its header: Hydra put its keys in hp itself
        name = str(node.get("name") or str(node._target_).rsplit(".", 1)[-1])
        raise ConfigError(
            f"hp={name}: its YAML has no package header, so its keys landed in hp itself; make its first line "
            f"'# @package hp.{name}' (each family's options live under hp.<name>: hp.{name}.init=..., and "
            "hp=[a,b] tunes several), as hoexp/conf/hp/*.yaml do"
        )
    return [component(sub, f"hp.{key!s}") for key, sub in node.items()]


def _method(node: Any) -> Component:
    """``cfg.method`` checked; a key the chosen method does not take also says where a preset's options for one
    method belong: ``experiment_method/<preset>/<method>.yaml`` (loaded only with that method; hoexp/conf/config.yaml)."""
    try:
        return component(node, "method")
    except ConfigError as e:
        if not str(e).startswith("unknown key 'method."):
            raise
        raise ConfigError(
            f"{e} (if your experiment preset sets it for another method, move its method.* keys to "
            "experiment_method/<preset>/<that method>.yaml, headed '# @package method': they then apply with that "
            "method only)"
        ) from None


def validate(cfg: DictConfig) -> Spec:
    """Turn a composed Hydra config into a checked :class:`Spec`, or raise :class:`ConfigError`."""
    top = {k: v for k, v in cfg.items() if k not in GROUP_KEYS and k != "hydra"}
    unknown = {str(k) for k in top} - RUN_KEYS
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(RUN_KEYS))}"
        )
    try:
        run = cast(
            RunConfig, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(top)))
        )
    except ValidationError as e:
        k = str(getattr(e, "full_key", "?"))
        expected = next((f.type for f in fields(RunConfig) if f.name == k), "?")
        raise ConfigError(f"{k}: value {top.get(k)!r} is not a valid {expected}") from None
    run.check()
    optim = cfg.get("optim")
    if not isinstance(optim, DictConfig) or "inner" not in optim or "outer" not in optim:
        raise ConfigError("the config needs optim.inner and optim.outer (groups optim/inner and optim/outer)")
    return Spec(
        run=run,
        dataset=component(cfg.get("dataset"), "dataset"),
        model=component(cfg.get("model"), "model"),
        hp=_families(cfg.get("hp")),
        method=_method(cfg.get("method")),
        inner_optim=component(optim.inner, "optim.inner"),
        outer_optim=component(optim.outer, "optim.outer"),
        raw=cast(dict, OmegaConf.to_container(cfg, resolve=True)),  # a DictConfig's container is a dict
    )
