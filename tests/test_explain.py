"""A config node against its factory's signature (hoexp.config.explain): what passes, and the one-line errors."""

from typing import Annotated, Literal

import pytest
from omegaconf import OmegaConf

from hoexp.components import PositiveInt, Range
from hoexp.config.explain import component
from hoexp.errors import ConfigError


def factory(
    *,
    k: PositiveInt = 3,
    p: Annotated[float, Range(gt=0, lt=1)] = 0.5,
    mode: Literal["a", "b"] = "a",
    pair: tuple[float, float] = (1.0, 2.0),
    tags: list[str] | None = None,
    name: str = "f",
):
    return {"k": k, "p": p, "mode": mode, "pair": pair, "tags": tags, "name": name}


def needs(ctx, *, size: int):
    return (ctx, size)


def anything(**kwargs):
    return kwargs


def node(target, **keys):
    return OmegaConf.create({"_target_": f"{__name__}.{target}", **keys})


def test_options_are_coerced_and_defaults_come_from_the_signature():
    c = component(node("factory", k=4, p=0.25, pair=[3, 4], tags=["x"], name="mine"), "method")
    assert c.name == "mine" and c.k == 4 and c.mode == "a"  # mode: the signature's default
    assert c.build() == {"k": 4, "p": 0.25, "mode": "a", "pair": (3.0, 4.0), "tags": ["x"], "name": "mine"}
    assert all(isinstance(v, float) for v in c.build()["pair"])  # ints where floats are annotated become floats


@pytest.mark.parametrize(
    "keys,message",
    [
        (
            {"kk": 1},
            "unknown key 'method.kk' for method=factory (did you mean 'k'?); valid keys: k, p, mode, pair, tags",
        ),
        ({"k": 0}, "method=factory: k must be > 0, got 0"),
        ({"p": 1.5}, "method=factory: p must be > 0 and < 1, got 1.5"),
        ({"k": "three"}, "method.k: 'three' is not a valid int"),
        ({"k": True}, "method.k: True is not a valid int"),
        ({"mode": "c"}, "method.mode='c' is not valid; choose one of: a, b"),
        ({"pair": [1, 2, 3]}, "method.pair: [1, 2, 3] must have 2 items"),
        ({"tags": "x"}, "method.tags: 'x' is not a valid list"),
    ],
)
def test_bad_options_are_one_line_errors(keys, message):
    with pytest.raises(ConfigError) as e:
        component(node("factory", **keys), "method")
    assert str(e.value) == message


def test_a_partial_factory_gets_its_runtime_argument_first_and_required_options_are_enforced():
    c = component(node("needs", _partial_=True, size=3), "hp.x")
    assert c.partial and c.build("ctx") == ("ctx", 3)
    with pytest.raises(ConfigError, match=r"hp.x: missing option\(s\) size"):
        component(node("needs", _partial_=True), "hp.x")


def test_a_factory_taking_keyword_arguments_accepts_any_key_and_nested_targets_are_built():
    c = component(node("anything", a=1, inner={"_target_": f"{__name__}.factory", "k": 2}), "method")
    built = c.build()
    assert built["a"] == 1 and built["inner"]["k"] == 2 and built["name"] == "anything"


def test_a_node_without_code_or_with_code_that_does_not_import_is_refused():
    with pytest.raises(ConfigError, match="the option names no code; an option's YAML starts with _target_"):
        component(OmegaConf.create({"name": "old", "k": 1}), "method")
    with pytest.raises(ConfigError, match="method._target_=nowhere.f cannot be imported"):
        component(OmegaConf.create({"_target_": "nowhere.f"}), "method")


def test_a_value_error_from_the_factory_names_the_option():
    def bad(*, x: int = 1):
        raise ValueError(f"x={x} does not suit")

    globals()["bad"] = bad
    with pytest.raises(ConfigError, match="^optim/inner=bad: x=2 does not suit$"):
        component(node("bad", x=2), "optim.inner").build()
