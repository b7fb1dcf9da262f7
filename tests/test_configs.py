"""Every shipped option and preset composes, checks against its factory's signature, and instantiates.

No training: each option of each config group (and every experiment/ preset, the _gpu ones on the CPU) is
composed, validated (:mod:`hoexp.config.explain`), pre-flighted and built (data, model, family, method,
optimizers, problem), as lightning-hydra-template's test_configs and torchtune's config tests do.
"""

import inspect

import numpy as np
import pytest
import torch

from hoexp.cli import CONF_DIR, _compose, compose_spec, group_options
from hoexp.config import Component, validate
from hoexp.config.build import build, preflight
from hoexp.errors import ConfigError

# Options that need another group's option to make sense (the rest compose with the default experiment).
CONTEXT = {
    ("dataset", "ptb"): ["model=lstm", "model.embed_dim=8", "model.hidden=8", "hp=dropout"],
    ("model", "lstm"): ["dataset=ptb", "model.embed_dim=8", "model.hidden=8", "hp=dropout"],
    ("hp", "lr"): ["method=unrolled"],
    ("hp", "momentum"): ["method=unrolled", "optim/inner=momentum"],
    ("method", "hd"): ["hp=lr"],
    ("method", "reversible"): ["optim/inner=momentum"],
    ("method", "forward"): ["hp.weight_decay.granularity=per_layer"],
    ("method", "exact"): ["model.width=16"],
}
SMALL = ["outer_steps=1", "inner_steps=1", "device=cpu"]
OPTIONS = [(g, o) for g in ("dataset", "model", "hp", "method", "optim/inner", "optim/outer") for o in group_options(g)]


def _components(spec):
    return [spec.dataset, spec.model, *spec.hp, spec.method, spec.inner_optim, spec.outer_optim]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(group, option, tmp_path):
    overrides = [*SMALL, *CONTEXT.get((group, option), []), f"{group}={option}"]
    if (group, option) == ("dataset", "arrays"):  # its file is required: a small one
        rng = np.random.RandomState(0)
        arrays = {
            f"{a}_{s}": rng.randn(9, 4) if a == "X" else np.arange(9) % 3
            for s in ("train", "val", "test")
            for a in "Xy"
        }
        np.savez(tmp_path / "d.npz", **arrays)
        overrides.append(f"dataset.path={tmp_path / 'd.npz'}")
    spec, _ = compose_spec(overrides)
    labelled = {"dataset": spec.dataset, "model": spec.model, "hp": spec.hp[0], "method": spec.method}
    assert {**labelled, "optim/inner": spec.inner_optim, "optim/outer": spec.outer_optim}[group].name == option
    for c in _components(spec):
        assert isinstance(c, Component) and callable(c.target)
        params = inspect.signature(c.target).parameters
        assert set(c.options) <= set(params), (c.key, set(c.options) - set(params))  # every YAML key is a parameter
    exp = build(spec)
    assert exp.method is not None and sum(p.numel() for p in exp.model.parameters()) > 0
    assert exp.problem.family.init(dict(exp.model.named_parameters()))


def test_every_yaml_names_its_code():
    for path in sorted(CONF_DIR.glob("*/**/*.yaml")):
        if path.parts[-2] in ("experiment", "launcher") or "experiment_method" in path.parts:  # presets, not factories
            continue
        text = path.read_text()
        assert "\n_target_: " in f"\n{text}", f"{path.relative_to(CONF_DIR)} has no _target_"


PRESETS = group_options("experiment")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_builds(preset):
    """The _gpu presets too: composed and built on the CPU (device=cpu), no training."""
    overrides = [f"experiment={preset}"]
    spec = validate(_compose(overrides))
    preflight(spec, device=False)
    # Built on the CPU from the small shared data (the _gpu presets download the full datasets).
    overrides += ["device=cpu"]
    if spec.dataset.name == "mnist":
        overrides += ["dataset.download=false", "dataset.val_size=1000"]
    if spec.model.name == "lstm":  # the full-size LSTM is built in seconds, but a smaller one checks the same
        overrides += ["model.embed_dim=16", "model.hidden=16"]
    spec = compose_spec(overrides)[0]
    exp = build(spec)
    assert exp.device == torch.device("cpu")
    assert sum(v.numel() for v in exp.problem.family.init(dict(exp.model.named_parameters())).values()) > 0


@pytest.mark.parametrize("method", ["neumann", "cg", "none"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_another_method(preset, method):
    """experiment=<preset> method=<other>: a preset's options for its own method (experiment_method/<preset>/) do
    not follow the override (mnist_hyper_cleaning's CG options once broke method=neumann). A preset of hard dropout
    masks refuses the pathwise methods in the one line that names those that can tune it."""
    cfg = _compose([f"experiment={preset}", f"method={method}"])
    if method != "none" and cfg.get("hp", {}).get("dropout", {}).get("relaxation") == "bernoulli":
        with pytest.raises(
            ConfigError, match="relaxation=bernoulli has no pathwise derivative; tune it with method=pes"
        ):
            preflight(validate(cfg), device=False)
        return
    spec = validate(cfg)
    preflight(spec, device=False)
    assert spec.method.name == method


PRESET_METHOD_FILES = sorted((CONF_DIR / "experiment_method").glob("*/*.yaml"))


@pytest.mark.parametrize("path", PRESET_METHOD_FILES, ids=[f"{p.parent.name}/{p.stem}" for p in PRESET_METHOD_FILES])
def test_preset_method_options_apply_with_their_method_only(path):
    """experiment_method/<preset>/<method>.yaml (``# @package method``, or ``_global_`` for the method's own steps
    and step sizes): its keys reach method=<method> under experiment=<preset>, a command-line override still wins,
    and no other method sees them."""
    from omegaconf import OmegaConf

    preset, method = path.parent.name, path.stem
    assert preset in PRESETS and method in group_options("method")
    body = OmegaConf.to_container(OmegaConf.load(path))
    for include in body.pop("defaults", []):  # another preset's options, taken whole ("/experiment_method/P/M@_here_")
        body = {
            **OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{include.split('@')[0].lstrip('/')}.yaml")),
            **body,
        }
    is_global = "# @package _global_" in path.read_text().splitlines()[0]
    keys = _dotted(body if is_global else {"method": body})
    assert keys
    cfg = _compose([f"experiment={preset}", f"method={method}"])
    assert {k: OmegaConf.select(cfg, k) for k in keys} == keys
    other = "neumann" if method != "neumann" else "cg"
    elsewhere = _compose([f"experiment={preset}", f"method={other}"])
    assert all(OmegaConf.select(elsewhere, k) != v for k, v in keys.items()), "another method sees them"
    assert validate(elsewhere).method.name == other
    key, value = next(iter(keys.items()))
    new = (not value) if isinstance(value, bool) else value + 1
    assert OmegaConf.select(_compose([f"experiment={preset}", f"method={method}", f"{key}={new}"]), key) == new


def _dotted(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    out: dict = {}
    for k, v in tree.items():
        out.update(_dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_a_preset_setting_one_methods_keys_in_its_body_names_where_they_go(tmp_path):
    """A user's preset with method.<key> in its body: method=<other> is refused in one line naming
    experiment_method/<preset>/<method>.yaml."""
    from hoexp.cli import validate_job, with_config_dir
    from hoexp.errors import ConfigError

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: cg\nmethod: {iterations: 3}\n"
    )
    validate_job(with_config_dir(["experiment=mine", "--config-dir", str(tmp_path)]), device=False)
    with pytest.raises(
        ConfigError, match=r"unknown key 'method.iterations'.*experiment_method/<preset>/<that method>.yaml"
    ):
        validate_job(
            with_config_dir(["experiment=mine", "method=neumann", "--config-dir", str(tmp_path)]), device=False
        )


LABELLED_GROUPS = ("dataset", "model", "method", "optim/inner", "optim/outer")


def test_no_option_repeats_its_file_name_as_its_label():
    """An option's label defaults to its YAML file's name (hoexp/conf/config.yaml): a ``name:`` that repeats it is
    one more thing to keep in step with the file (``method=cg_gn`` was once labelled cg)."""
    for group in LABELLED_GROUPS:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            assert f"\nname: {path.stem}\n" not in f"\n{path.read_text()}", f"{group}/{path.name} repeats its name"


def test_labels_come_from_the_file_name_unless_name_says_otherwise(tmp_path):
    """A --config-dir option without ``name:`` is labelled by its file name (in the spec, the built method, the run
    name and an experiment's ``${method.name}``); its own ``name:``, or ``method.name=x``, wins."""
    from hoexp.config.build import build_method

    for group, text in {
        "method/mine.yaml": "_target_: hoexp.method.implicit.cg\niterations: 3\n",
        "method/renamed.yaml": "_target_: hoexp.method.implicit.cg\nname: other\n",
        "model/small.yaml": "_target_: hoexp.model.mlp.mlp\n_partial_: true\nwidth: 8\n",
        "experiment/mine_preset.yaml": "# @package _global_\nname: preset_${method.name}\n",
    }.items():
        (tmp_path / group).parent.mkdir(exist_ok=True)
        (tmp_path / group).write_text(text)
    spec = compose_spec(["method=mine", "model=small"], config_dir=tmp_path)[0]
    assert (spec.method.name, build_method(spec).name, spec.run.name, spec.model.name) == (
        "mine",
        "mine",
        "mine",
        "small",
    )
    assert compose_spec(["method=mine", "experiment=mine_preset"], config_dir=tmp_path)[0].run.name == "preset_mine"
    assert compose_spec(["method=renamed"], config_dir=tmp_path)[0].method.name == "other"
    spec = compose_spec(["method=mine", "method.name=x", "optim/inner=adam"], config_dir=tmp_path)[0]
    assert (spec.method.name, build_method(spec).name, spec.run.name, spec.inner_optim.name) == ("x", "x", "x", "adam")
    assert compose_spec(["method=cg_gn"])[0].method.name == "cg_gn"


def test_labels_resolve_in_hydras_own_jobs():
    """A config Hydra composes for its jobs (``hoexp run``, any launcher) leaves the label an interpolation of the
    choice, resolved inside the job (Hydra sets its config there): the sweep folder ``0_cg_gn``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf, open_dict

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="hoexp.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=cg_gn", "model=linear"], return_hydra_config=True)
    assert OmegaConf.to_container(cfg.method)["name"] == "${hydra:runtime.choices.method}"  # left for the job
    with open_dict(cfg):
        cfg.hydra.job.num = 0
    setup_globals()
    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # as hydra.core.utils.run_job does for each job
    try:
        assert OmegaConf.select(cfg, "hydra.sweep.subdir") == "0_cg_gn"
        assert (cfg.method.name, cfg.model.name, cfg.optim.outer.name) == ("cg_gn", "linear", "adam")
    finally:
        HydraConfig.instance().cfg = before


@pytest.mark.parametrize("launcher", group_options("hydra/launcher"))
def test_every_launcher_composes_and_names_an_importable_launcher(launcher):
    """hydra/launcher options (composed with Hydra's own node): their _target_ imports (no job is launched)."""
    import importlib

    cfg = _compose([f"hydra/launcher={launcher}"], hydra=True)
    target = str(cfg.hydra.launcher._target_)
    module, _, name = target.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name)), target


# ------------------------------------------------------------------ the bounds of every numeric option
# A numeric option of a shipped factory declares its bound in its signature (hoexp.components: PositiveInt,
# NonNegFloat, Annotated[float, Range(...)]), or is listed here with the reason it has none. A new numeric option
# without either fails test_every_numeric_option_declares_a_bound, so a refactor cannot drop a bound silently.
UNBOUNDED: dict[tuple[str, str], str] = {}
GROUPS = ("dataset", "model", "hp", "method", "optim/inner", "optim/outer")


def _factory_nodes():
    """(config key, factory path, YAML node) for each shipped factory (its first option file)."""
    from omegaconf import OmegaConf

    seen, out = set(), []
    for group in GROUPS:
        for option in group_options(group):
            node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
            target = str(node._target_)
            if target not in seen:
                seen.add(target)
                key = f"hp.{node.name}" if group == "hp" else group.replace("/", ".")
                out.append((key, target, node))
    return out


def _numeric(hint):
    """``(is_int, [Range, ...])`` of a numeric annotation (through Optional, unions, tuples and lists), or None."""
    import typing

    from hoexp.components import Range

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        inner = _numeric(args[0])
        return None if inner is None else (inner[0], [*inner[1], *(a for a in args[1:] if isinstance(a, Range))])
    if hint is bool:
        return None
    if hint in (int, float):
        return hint is int, []
    if origin is typing.Literal:
        return None
    found = [n for n in (_numeric(a) for a in args if a is not type(None) and a is not Ellipsis) if n is not None]
    if not found:
        return None
    return all(n[0] for n in found), [r for n in found for r in n[1]]


def _numeric_options():
    from hoexp.config.explain import _signature

    for key, target, node in _factory_nodes():
        from hoexp.config.explain import _import

        params, hints = _signature(_import(target, key), bool(node.get("_partial_", False)))
        for name, hint in hints.items():
            found = _numeric(hint)
            if found is not None:
                yield key, target, node, name, params[name].default, found


NUMERIC = list(_numeric_options())


def _outside(rng, is_int: bool) -> list[float]:
    """Values just past each bound of ``rng`` (and well past it)."""
    step = 1 if is_int else 1e-3
    out: list[float] = []
    if rng.gt is not None:
        out += [rng.gt, rng.gt - step, rng.gt - 10]
    if rng.ge is not None:
        out += [rng.ge - step, rng.ge - 10]
    if rng.lt is not None:
        out += [rng.lt, rng.lt + step, rng.lt + 10]
    if rng.le is not None:
        out += [rng.le + step, rng.le + 10]
    return [int(v) if is_int else float(v) for v in out]


def _with(node, name: str, value, default):
    """The option's YAML with ``name`` set to ``value`` (a list option: its first item)."""
    from omegaconf import OmegaConf

    node = OmegaConf.create(OmegaConf.to_container(node))
    if isinstance(default, (tuple, list)):
        value = list(value) if isinstance(value, (tuple, list)) else [value, *list(default)[1:]]
    node[name] = value
    return node


def test_every_numeric_option_declares_a_bound():
    assert len(NUMERIC) >= 50  # every group's numeric options were found
    missing = [f"{t}: {n}" for _, t, _, n, _, (_, ranges) in NUMERIC if not ranges and (t, n) not in UNBOUNDED]
    assert not missing, f"numeric options with no declared Range and not in UNBOUNDED: {missing}"
    known = {(t, n) for _, t, _, n, _, _ in NUMERIC}
    assert set(UNBOUNDED) <= known and all(UNBOUNDED.values()), "UNBOUNDED names options that are gone, or no reason"


@pytest.mark.parametrize(
    "key,target,node,name,default,numeric", NUMERIC, ids=[f"{t.rsplit('.', 1)[-1]}.{n}" for _, t, _, n, _, _ in NUMERIC]
)
def test_every_numeric_option_refuses_what_its_bound_excludes(key, target, node, name, default, numeric):
    """At validation (before anything runs), in one line naming the option: values past the declared bounds, and
    NaN and ±inf for every float option. The shipped default is accepted."""
    from hoexp.config import component
    from hoexp.errors import ConfigError

    is_int, ranges = numeric
    component(_with(node, name, default, default) if default is not inspect.Parameter.empty else node, key)
    bad = [v for r in ranges for v in _outside(r, is_int)]
    if not is_int:
        bad += [float("nan"), float("inf"), float("-inf")]
    assert bad, f"{target}.{name}: nothing to refuse"
    for value in bad:
        with pytest.raises(ConfigError) as e:
            component(_with(node, name, value, default), key)
        assert name in str(e.value) and "\n" not in str(e.value), (name, value, str(e.value))


def test_method_cg_with_no_iteration_is_refused_in_one_line(capsys):
    """method=cg method.iterations=0 ran to the end with hypergradient 0 at every step; now: exit 2 before it runs."""
    from hoexp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "method=cg", "method.iterations=0", "outer_steps=2", "inner_steps=2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "hoexp: error: method=cg: iterations must be >= 1, got 0\n", err
