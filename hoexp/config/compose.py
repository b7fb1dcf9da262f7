"""Composing configs: hoexp's config groups (shipped in the package) plus the users' (``--config-dir``), one job's
config, and the checks every job of a command passes before anything runs (``validate_job``: composed once,
validated once, its method built once, and handed on as a :class:`Job`).

``compose_spec(overrides, config_dir=None)`` is the in-process entry point for scripts and tests: the checked
:class:`~hoexp.config.Spec` of ``hoexp run <overrides>`` and its YAML.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hoexp.errors import ConfigError, HoexpError

# The configs ship inside the package (hoexp/conf), so an installed hoexp (wheel, pip install git+...)
# finds them wherever it runs from; Hydra reads them through its pkg:// search path.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CONF_PKG = "pkg://hoexp.conf"
MAX_VALIDATED_JOBS = 256


def conf_dir() -> Path:
    if not (CONF_DIR / "config.yaml").is_file():
        raise HoexpError(
            f"config folder not found at {CONF_DIR}: this hoexp installation is incomplete; "
            "reinstall it (pip install --force-reinstall hoexp, or make install in a checkout)"
        )
    return CONF_DIR


def user_config_dirs(overrides: list[str]) -> list[Path]:
    """The users' config folders on the search path (``--config-dir``, turned into ``hydra.searchpath``)."""
    dirs: list[Path] = []
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == "hydra.searchpath":
            entries = [v.strip().strip("'\"") for v in value.strip("[]").split(",")]
            dirs += [Path(v.removeprefix("file://")) for v in entries if v.startswith("file://")]
    return dirs


def refuse_clashes(folders: list[Path]) -> None:
    """One line for a config file (``model/x.yaml``) found in two ``--config-dir`` folders, or in one and hoexp's own:
    Hydra would take the first on its search path (hoexp's own first) and ignore the other without a word."""
    if not folders:
        return
    seen = {str(p.relative_to(conf_dir())): "hoexp's own configs" for p in conf_dir().rglob("*.yaml")}
    for folder in folders:
        for p in sorted(folder.rglob("*.yaml")):
            rel = str(p.relative_to(folder))
            if rel in seen:
                raise ConfigError(
                    f"--config-dir {folder}: {rel} is also in {seen[rel]}, and only one can be used; rename one "
                    f"(options of a group must have distinct names across hoexp's configs and your --config-dir folders)"
                )
            seen[rel] = f"--config-dir {folder}"


def with_config_dir(args: list[str]) -> list[str]:
    """``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``; repeatable) → the override
    ``hydra.searchpath=[file://DIR,...]``: the folders' options (``DIR/model/x.yaml``, ...) join hoexp's own, for
    validation and for Hydra alike. A name in two places is refused (:func:`refuse_clashes`)."""
    out, dirs, folders = [], [], list[Path]()
    it = iter(args)
    for a in it:
        flag, eq, value = a.partition("=")
        if flag in ("--config-dir", "-cd"):
            value = value if eq else next(it, "")
            folder = Path(value).expanduser().absolute()
            if not value or not folder.is_dir():
                raise ConfigError(
                    f"--config-dir {value or '(missing)'}: no such folder; give the folder that holds "
                    "your config groups (e.g. DIR/model/my_model.yaml)"
                )
            if folder.resolve() not in [f.resolve() for f in folders]:  # the same folder twice: once
                folders.append(folder)
                dirs.append(f"file://{folder}")
        else:
            out.append(a)
    refuse_clashes(folders)
    return [*out, f"hydra.searchpath=[{','.join(dirs)}]"] if dirs else out


def config_groups(overrides: Sequence[str] = ()) -> list[str]:
    folders = [conf_dir(), *user_config_dirs(list(overrides))]
    return sorted(
        {p.name for f in folders if f.is_dir() for p in f.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    )


def group_options(group: str, overrides: Sequence[str] = ()) -> list[str]:
    """The options of a config group: hoexp's and those in the users' config folders."""
    folders = [conf_dir() / group, *(d / group for d in user_config_dirs(list(overrides)))]
    return sorted({p.stem for f in folders if f.is_dir() for p in f.glob("*.yaml")})


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
        jobs = [tuple(firsts[:i] + [v] + firsts[i + 1 :]) for i, c in enumerate(choices) for v in c]
    return [list(j) for j in jobs]


def explain_composition_error(message: str, overrides: list[str]) -> str:
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


def compose(overrides: list[str], hydra: bool = False):
    """The composed config of one job (with Hydra's own node when ``hydra``), its options' labels filled in
    (:func:`fill_labels`)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    conf_dir()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONF_PKG.removeprefix("pkg://"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    fill_labels(cfg)
    if not hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def fill_labels(cfg) -> None:
    """Each option's ``name`` that config.yaml defaults to its YAML file's name (``${hydra:runtime.choices.method}``)
    set to that name, in place: a config composed here has no Hydra job around it to resolve the interpolation
    (Hydra's own jobs do), and ``name: mnist_dropout_${method.name}`` must resolve. A ``name`` the option's YAML or
    an override sets stays."""
    from omegaconf import DictConfig, OmegaConf

    for group, choice in cfg.hydra.runtime.choices.items():
        node = OmegaConf.select(cfg, str(group).replace("/", "."), default=None)
        label = node._get_node("name") if isinstance(node, DictConfig) and "name" in node else None
        if isinstance(choice, str) and label is not None and label._value() == f"${{hydra:runtime.choices.{group}}}":
            node.name = choice


def _valid_keys(parent: str, overrides: list[str]) -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    try:
        cfg = compose(overrides)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:
        return []
    if not isinstance(node, DictConfig):
        return []
    keys = [k for k in node.keys() if k not in ("hydra", "_target_", "_partial_")]
    if parent.startswith("optim") or parent.startswith("hp.") or parent in ("method", "model", "dataset"):
        keys = [k for k in keys if k != "name"]
    return sorted(str(k) for k in keys)


@dataclass
class Job:
    """One job of a command, composed, validated and checked once (:func:`validate_job`): its overrides, its
    config (with Hydra's node where asked for), the checked :class:`~hoexp.config.Spec`, and what
    :func:`~hoexp.config.build.preflight` built (:class:`~hoexp.config.build.Prebuilt`: optimizers, method)."""

    overrides: list[str]
    cfg: Any
    spec: Any
    prebuilt: Any = None

    @property
    def key(self) -> tuple[str, ...]:
        """The job's own overrides (without Hydra's), as :func:`job_key` writes them."""
        return job_key(self.overrides)


def job_key(overrides: Sequence[str]) -> tuple[str, ...]:
    """A job's own overrides (without Hydra's) written one way: ours and those Hydra's sweeper hands a job
    (``hydra.overrides.task``: ``progress=False`` for ``progress=false``) compare equal."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    own = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    return tuple(
        f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in OverridesParser.create().parse_overrides(own)
    )


def compose_job(overrides: list[str], hydra: bool = False):
    """:func:`compose`, its errors in one line: an unknown option of hoexp's groups or Hydra's (a launcher) lists
    the valid ones, an unknown key the keys."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(overrides, hydra=hydra)
    except (HydraException, OmegaConfBaseException) as e:
        message = str(e)
        m = re.search(r"Could not find '(hydra/[^']+)/([^'/]+)'", message)
        listed = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)+)", message)
        if m and listed:  # Hydra's own groups (launchers from plugins): the options Hydra lists
            options = ", ".join(line.strip() for line in listed.group(1).splitlines() if line.strip())
            raise ConfigError(f"unknown {m.group(1)} '{m.group(2)}'; choose one of: {options}") from None
        raise ConfigError(explain_composition_error(message, overrides)) from None


def validate_job(
    overrides: list[str], device: bool = True, world_size: int = 1, hydra: Sequence[str] | None = None
) -> Job:
    """Compose one job's config (once) and check it completely (``device``: also that the device exists here;
    ``world_size``: the processes it is to run on); raise ConfigError with one line. ``hydra``: overrides of
    Hydra's own node, composed in front of the job's; given (even empty), the config keeps Hydra's node."""
    from omegaconf import OmegaConf

    from hoexp.config import validate
    from hoexp.config.build import preflight

    refuse_removed(overrides)
    cfg = compose_job([*(hydra or ()), *overrides], hydra=hydra is not None)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    spec = validate(job_cfg)
    return Job(list(overrides), cfg, spec, preflight(spec, device=device, world_size=world_size))


def compose_spec(overrides: list[str], config_dir: str | os.PathLike | None = None):
    """Compose and validate a config in-process (for scripts and tests): the checked Spec and the YAML, checked as
    ``hoexp run`` checks it in this process's job (data-parallel under torchrun). ``config_dir``: a folder of your
    own config groups (``hoexp run --config-dir``)."""
    from omegaconf import OmegaConf

    from hoexp.engine import distributed

    if config_dir is not None:
        overrides = with_config_dir([*overrides, "--config-dir", str(config_dir)])
    job = validate_job(overrides, world_size=distributed.launched().world_size)
    return job.spec, OmegaConf.to_yaml(job.cfg)
