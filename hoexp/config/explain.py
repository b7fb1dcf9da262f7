"""A config node that names its code (``_target_``) → a checked :class:`Component`, or a one-line error.

The factory's signature is the schema: unknown keys get a "did you mean" from its parameters, values
are checked against its annotations (types, ``Literal`` choices, :class:`~hoexp.components.Range`), and
a ``ValueError`` the factory raises when called becomes a :class:`~hoexp.errors.ConfigError` that names
the option (``method=neumann: terms must be >= 0, got -1``). All of it before anything runs.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from hoexp.components import Range
from hoexp.errors import ConfigError

RESERVED = ("_target_", "_partial_", "name")  # name: a label for folders and reports, never dispatched on


def where(key: str, name: str) -> str:
    """How a message names an option: ``method=neumann: ``, ``hp.dropout: ``, ``optim/inner=adam: ``."""
    if key.startswith("hp."):
        return f"{key}: "
    return f"{key.replace('.', '/')}={name}: "


@dataclass(frozen=True)
class Component:
    """One option of a config group, checked against its factory: ``build(*runtime)`` makes the object.

    ``options``: the YAML keys (coerced to the annotated types; nested ``_target_`` nodes are
    Components too). Attribute access reads an option or, when the YAML leaves it out, the factory's
    default (``spec.method.alpha``)."""

    key: str  # where it sits in the config: method, hp.dropout, optim.inner, dataset, model
    name: str
    target: Callable[..., Any]
    options: Mapping[str, Any]
    partial: bool
    defaults: Mapping[str, Any]

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__"):
            raise AttributeError(item)
        if item in self.options:
            return self.options[item]
        if item in self.defaults:
            return self.defaults[item]
        raise AttributeError(f"{self.key}={self.name} has no option '{item}'")

    @property
    def prefix(self) -> str:
        return where(self.key, self.name)

    def build(self, *runtime: Any) -> Any:
        """``target(*runtime, **options)`` (``runtime`` only for a partial); a ``ValueError`` or
        ``TypeError`` from the factory becomes a one-line ConfigError naming this option."""
        kwargs = dict(self.options)
        for k, v in self.options.items():
            if isinstance(v, Component):  # a nested factory: built now, or handed over to be called later
                kwargs[k] = functools.partial(v.build) if v.partial else v.build()
        if "name" in self.defaults or _takes_kwargs(self.target):
            kwargs.setdefault("name", self.name)
        try:
            return self.target(*(runtime if self.partial else ()), **kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{self.prefix}{e}") from None


def component(node: Any, key: str) -> Component:
    """Check one option node (``cfg.method``, ``cfg.hp.dropout``, ...) against its factory's signature."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        label = node.get("name", "?") if isinstance(node, DictConfig) else node
        raise ConfigError(
            f"{key}={label}: the option names no code; an option's YAML starts with "
            f"_target_: <module>.<factory> (see docs/bring-your-own.md)"
        )
    target = _import(str(node._target_), key)
    partial = bool(node.get("_partial_", False))
    name = str(node.get("name") or str(node._target_).rsplit(".", 1)[-1])
    params, hints = _signature(target, partial)
    prefix = where(key, name)
    options: dict[str, Any] = {}
    for k, value in node.items():
        k = str(k)
        if k in RESERVED:
            continue
        if k not in params and not _takes_kwargs(target):
            valid = [p for p in params if p != "name"]
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown key '{key}.{k}' for {prefix.rstrip(': ')}{hint}; valid keys: {', '.join(valid)}"
            )
        if isinstance(value, DictConfig) and "_target_" in value:
            options[k] = component(value, f"{key}.{k}")
            continue
        plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
        options[k] = coerce(plain, hints.get(k, Any), f"{key}.{k}", prefix + k)
    defaults = {p: v.default for p, v in params.items() if v.default is not inspect.Parameter.empty}
    required = [p for p, v in params.items() if p not in defaults and v.kind is not inspect.Parameter.VAR_KEYWORD]
    missing = [p for p in required if p not in options and p != "name"]
    if missing:
        raise ConfigError(f"{prefix}missing option(s) {', '.join(missing)} (the factory {node._target_} needs them)")
    return Component(key, name, target, options, partial, defaults)


def _import(path: str, key: str) -> Callable[..., Any]:
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"{key}._target_={path} cannot be imported ({e}); give an importable "
            "<module>.<factory> (a module on PYTHONPATH, or installed)"
        ) from None
    if not callable(obj):
        raise ConfigError(f"{key}._target_={path} is not callable")
    return obj


def _signature(target: Callable[..., Any], partial: bool) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """The parameters the YAML may set (a partial's first positional one is the runtime argument) and
    their annotations (with ``Annotated`` extras; one that cannot be resolved here is not type-checked)."""
    params = dict(inspect.signature(target).parameters)
    if partial and params:
        first = next(iter(params))
        if params[first].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            params.pop(first)
    params = {k: v for k, v in params.items() if v.kind is not inspect.Parameter.VAR_POSITIONAL}
    module = sys.modules.get(getattr(target, "__module__", ""), None)
    namespace = {**vars(typing), **(vars(module) if module is not None else {})}
    hints: dict[str, Any] = {}
    for k, p in params.items():
        ann = p.annotation
        if isinstance(ann, str):
            try:
                ann = eval(ann, namespace)  # noqa: S307 -- the factory's own annotation, as typing.get_type_hints does
            except Exception:
                continue
        if ann is not inspect.Parameter.empty:
            hints[k] = ann
    return params, hints


def _describe(hint: Any) -> str:
    """A type in words, for a value that fits no member of a union: ``a number > 0``, ``auto``."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(hint)
        bounds = [
            b for r in extras if isinstance(r, Range) for b in ((">", r.gt), (">=", r.ge), ("<", r.lt), ("<=", r.le))
        ]
        return " ".join([_describe(base), *(f"{op} {b:g}" for op, b in bounds if b is not None)])
    if origin is Literal:
        return " or ".join(map(str, typing.get_args(hint)))
    words = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}
    return words.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _takes_kwargs(target: Callable[..., Any]) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(target).parameters.values())


def coerce(value: Any, hint: Any, key: str, label: str) -> Any:
    """``value`` as ``hint`` asks (an int where a float is expected becomes a float), or a ConfigError:
    ``method.terms: 'abc' is not a valid int``, ``x='v' is not valid; choose one of: ...``,
    ``method=neumann: terms must be >= 0, got -1``; a float must be finite (NaN and inf are refused whatever the
    annotation)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        out = coerce(value, args[0], key, label)
        for extra in args[1:]:
            if isinstance(extra, Range) and isinstance(out, (int, float)) and not isinstance(out, bool):
                problem = extra.violation(out)
                if problem:
                    raise ConfigError(f"{label} {problem}, got {out}")
        return out
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, typing.TypeVar):
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}='{value}' is not valid; choose one of: {', '.join(sorted(map(str, args)))}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(value, a, key, label)
            except ConfigError as e:
                errors.append(e)
        # the most specific message: a range problem of a matching type beats a type mismatch or a choice
        members = [a for a in args if a is not type(None)]
        ranged = [e for e in errors if " must be " in str(e)]
        choices = [a for a in members if typing.get_origin(a) is Literal]
        if ranged and choices:  # a number out of range, where a word would do too: name the word
            leaf = key.rsplit(".", 1)[-1]
            raise ConfigError(f"{ranged[0]} (or {' or '.join(f'{leaf}={_describe(c)}' for c in choices)})")
        if ranged or len(errors) == 1:
            raise (ranged or errors)[0]
        raise ConfigError(f"{label} must be {' or '.join(_describe(a) for a in members)}, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # no option means anything by NaN or inf: refused before anything runs
                raise ConfigError(f"{label} must be a finite number, got {value}")
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
                raise ConfigError(f"{key}: {list(value)!r} must have {len(args)} items")
            inner = args[0] if args and (origin is not tuple or args[-1] is Ellipsis or len(set(args)) == 1) else Any
            items = [coerce(v, inner, key, label) for v in value]
            return tuple(items) if origin is tuple or hint is tuple else items
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        return value
    name = getattr(hint, "__name__", None) or str(hint)
    raise ConfigError(f"{key}: {value!r} is not a valid {name}")
