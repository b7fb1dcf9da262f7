"""Shared types and helpers for the functional (optax-style) optimizers.

An :class:`Optimizer` is a pair of pure functions::

    state = opt.init(params)
    new_params, new_state = opt.update(params, grads, state, **overrides)

Everything is out-of-place and built from differentiable torch ops, so an update can sit inside an unrolled
(reverse-mode) hypergradient computation, inside ``torch.func.jvp`` / ``torch.func.vmap``, or drive an outer loop
over hyperparameters.

Overrides: every scalar hyperparameter accepted by ``update`` may be ``None`` (use the value given to the factory),
a Python number, a 0-d tensor (possibly requiring grad), or a ``dict[str, Tensor]`` keyed by parameter name whose
values broadcast against that parameter (per-layer / per-element hyperparameters).

Fast path: when nothing is being differentiated (no input requires grad, or grad mode is off; no ``torch.func``
transform or forward-AD level is active) and every hyperparameter is a Python number, ``update`` runs a multi-tensor
path (``torch._foreach_*``: one call per operation for all tensors, results computed in place into freshly allocated
outputs, so inputs are still never modified). It computes the same operations as the per-tensor reference path (same
fused kernels, same rounding); it exists for plain training steps, where the reference path's many temporaries cost
more than the arithmetic. :func:`reference_paths` turns it off (tests compare the two).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, TypeGuard

import torch
import torch.autograd.forward_ad as _forward_ad

Params = dict[str, torch.Tensor]
OptState = dict[str, Any]
Scalar = float | torch.Tensor
Hyper = float | torch.Tensor | Mapping[str, float | torch.Tensor]
# The tensor lists that torch._foreach_* take (lists or tuples) and return (tuples, per torch's stubs).
TensorList = list[torch.Tensor] | tuple[torch.Tensor, ...]
# An optimizer's step on one parameter's tensors or on lists of them (see apply).
Step = Callable[..., Sequence[Any]]

__all__ = [
    "add_scaled",
    "fast_path",
    "reference_paths",
    "set_fast_paths",
    "add_scaled_div",
    "add_scaled_mul",
    "apply",
    "Hyper",
    "OptState",
    "Optimizer",
    "Params",
    "Scalar",
    "TensorList",
    "check_grads",
    "check_nonneg",
    "hyper",
    "init_state",
    "is_zero",
    "lerp",
    "resolve",
    "safe_sqrt",
    "zeros_like_params",
]


class Optimizer(NamedTuple):
    """A functional optimizer: ``init(params) -> state`` and
    ``update(params, grads, state, **overrides) -> (new_params, new_state)``."""

    name: str
    init: Callable[[Params], OptState]
    update: Callable[..., tuple[Params, OptState]]
    # The configured values (lr, momentum, ...): families and methods read what the user set here.
    defaults: Mapping[str, Any] = MappingProxyType({})


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` with derivative 0 (instead of +inf) where ``x <= 0``.

    Forward value equals ``torch.sqrt(x)`` for ``x >= 0`` (0 for ``x < 0`` instead of NaN). Uses the double-``where``
    trick so neither branch produces inf/NaN in the backward or forward-mode pass; this keeps unrolled hypergradients
    finite when a gradient entry is exactly 0 (e.g. dead ReLUs).
    """
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, 1.0)), 0.0)


def hyper(override: Hyper | None, default: Hyper, name: str) -> Scalar:
    """Value of a hyperparameter for parameter ``name``: ``override`` wins over ``default`` unless it is None; a
    mapping is indexed by the parameter name (a missing name is an error, never a silent fallback)."""
    value = default if override is None else override
    if isinstance(value, Mapping):
        try:
            return value[name]
        except KeyError:
            raise KeyError(
                f"per-parameter hyperparameter has no entry for parameter '{name}' "
                f"(keys: {', '.join(sorted(map(str, value)))})"
            ) from None
    return value


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_zero(value: Scalar) -> bool:
    """True only for a Python number equal to 0 (tensors are never a structural zero: their gradient path is kept)."""
    return _is_number(value) and value == 0


def lerp(start: torch.Tensor, end: torch.Tensor, weight: Scalar) -> torch.Tensor:
    """``start + weight * (end - start)``; uses ``torch.lerp`` for Python-number weights (bitwise-identical to
    torch.optim), plain arithmetic otherwise (any tensor weight dtype/shape that broadcasts)."""
    if _is_number(weight):
        return torch.lerp(start, end, weight)
    return start + weight * (end - start)


# The three helpers below compute ``x + a * (...)`` with torch's fused kernels when ``a`` is a Python number (so
# results round exactly like torch.optim, which uses ``add(alpha=)``, ``addcmul`` and ``addcdiv``), and with plain
# broadcasting arithmetic when ``a`` is a tensor (differentiable w.r.t. ``a``).


def add_scaled(x: torch.Tensor, a: Scalar, y: torch.Tensor) -> torch.Tensor:
    """``x + a * y``."""
    if _is_number(a):
        return torch.add(x, y, alpha=a)
    return x + a * y


def add_scaled_mul(x: torch.Tensor, a: Scalar, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``x + a * y * z``."""
    if _is_number(a):
        return torch.addcmul(x, y, z, value=a)
    return x + a * y * z


def add_scaled_div(x: torch.Tensor, a: Scalar, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``x + a * y / z``."""
    if _is_number(a):
        return torch.addcdiv(x, y, z, value=a)
    return x + a * y / z


def zeros_like_params(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh zero buffers (no autograd history) shaped like each parameter."""
    return {k: torch.zeros_like(p) for k, p in params.items()}


def init_state(params: Params, kept: Mapping[str, bool]) -> OptState:
    """A step-0 state: a zero buffer like each parameter (:func:`zeros_like_params`) for each name kept."""
    return {"step": 0, **{n: zeros_like_params(params) for n, on in kept.items() if on}}


def check_grads(params: Params, grads: Params) -> None:
    """Raise ValueError if some parameter has no gradient entry."""
    missing = [k for k in params if k not in grads]
    if missing:
        raise ValueError(f"grads is missing entries for parameters: {', '.join(missing)}")


def check_nonneg(**values: Any) -> None:
    """torch.optim-style validation of numeric hyperparameters (tensors skipped)."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and value < 0:
            raise ValueError(f"Invalid {key} value: {value}")


# --------------------------------------------------------------------------- fast paths
_FAST_PATHS = True


def set_fast_paths(enabled: bool) -> bool:
    """Enable or disable the multi-tensor fast paths process-wide; returns the previous setting."""
    global _FAST_PATHS
    previous, _FAST_PATHS = _FAST_PATHS, bool(enabled)
    return previous


@contextlib.contextmanager
def reference_paths() -> Iterator[None]:
    """Within the block every optimizer runs its per-tensor reference path."""
    previous = set_fast_paths(False)
    try:
        yield
    finally:
        set_fast_paths(previous)


def fast_path(trees: Iterable[Mapping[str, torch.Tensor]], values: Iterable[Any]) -> bool:
    """True when an update over ``trees`` with hyperparameter ``values`` may take the fast path.

    ``values`` are the effective hyperparameters (override or factory default): all must be Python
    numbers. No tensor may require grad while grad mode is on, and no ``torch.func`` transform,
    forward-AD level or ``torch.compile`` trace may be active (those need the reference path's
    differentiable, out-of-place ops).
    """
    if not _FAST_PATHS or torch.compiler.is_compiling():
        return False
    if not all(_is_number(v) for v in values):
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0:
        return False
    tensors = [t for tree in trees for t in tree.values()]
    return bool(tensors) and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def resolve(defaults: Mapping[str, Any], **overrides: Hyper | None) -> dict[str, Any]:
    """The effective hyperparameters: each override, or the factory's value in ``defaults`` where it is None
    (values never None, such as the step number, pass through)."""
    return {k: defaults[k] if v is None else v for k, v in overrides.items()}


def apply(
    one: Step, many: Step, params: Params, grads: Params, state: OptState, kept: dict[str, bool], values: dict[str, Any]
) -> tuple[Params, OptState]:
    """One optimizer step: ``(new_params, new_state)``, the state's ``step`` one higher.

    ``kept`` names the state's buffers in order and says whether each is kept (one not kept is passed as None and
    left out of the new state); ``values`` are the hyperparameters. On the :func:`fast_path`, ``many(p, g, *buffers,
    **values)`` runs once on lists of tensors; otherwise ``one`` runs the same on each parameter's tensors and values
    (:func:`hyper`). Both return the new parameters, then the new buffers in order (None for those not kept).
    """
    check_grads(params, grads)
    keys, trees = list(params), [state[n] if on else None for n, on in kept.items()]
    if fast_path((params, grads, *(t for t in trees if t is not None)), values.values()):
        cols = (None if t is None else [t[k] for k in keys] for t in trees)
        new = many([params[k] for k in keys], [grads[k] for k in keys], *cols, **values)
        out: list[Params] = [{} if x is None else dict(zip(keys, x)) for x in new]
    else:
        out = [{} for _ in range(len(trees) + 1)]
        for k in keys:
            bufs = (None if t is None else t[k] for t in trees)
            for o, x in zip(out, one(params[k], grads[k], *bufs, **{n: hyper(None, v, k) for n, v in values.items()})):
                if x is not None:
                    o[k] = x
    return out[0], {"step": state["step"] + 1, **{n: o for (n, on), o in zip(kept.items(), out[1:]) if on}}
