"""Every shipped option and preset composes, checks against its factory's signature, and instantiates.

No training: each option of each config group (and every experiment/ preset, the _gpu ones on the CPU) is
composed, validated (:mod:`hoexp.config.explain`), pre-flighted and built (data, model, family, method,
optimizers, problem), as lightning-hydra-template's test_configs and torchtune's config tests do.
"""

import inspect

import pytest
import torch

from hoexp.cli import CONF_DIR, _compose, compose_spec, group_options
from hoexp.config import Component, validate
from hoexp.config.build import build, preflight

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
def test_every_option_composes_and_builds(group, option):
    overrides = [*SMALL, *CONTEXT.get((group, option), []), f"{group}={option}"]
    spec, _ = compose_spec(overrides)
    for c in _components(spec):
        assert isinstance(c, Component) and callable(c.target)
        params = inspect.signature(c.target).parameters
        assert set(c.options) <= set(params), (c.key, set(c.options) - set(params))  # every YAML key is a parameter
    exp = build(spec)
    assert exp.method is not None and sum(p.numel() for p in exp.model.parameters()) > 0
    assert exp.problem.family.init(dict(exp.model.named_parameters()))


def test_every_yaml_names_its_code():
    for path in sorted(CONF_DIR.glob("*/**/*.yaml")):
        if path.parts[-2] in ("experiment", "launcher"):
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


@pytest.mark.parametrize("launcher", group_options("hydra/launcher"))
def test_every_launcher_composes_and_names_an_importable_launcher(launcher):
    """hydra/launcher options (composed with Hydra's own node): their _target_ imports (no job is launched)."""
    import importlib

    cfg = _compose([f"hydra/launcher={launcher}"], hydra=True)
    target = str(cfg.hydra.launcher._target_)
    module, _, name = target.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name)), target
