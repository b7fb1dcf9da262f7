"""Config → objects: data, model, hyperparameter family, method, optimizers.

Compatibility checks live here (method × family, dataset × model), so that a bad combination
fails with one clear line before any training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hoexp.config import Spec
from hoexp.dataset.base import Splits
from hoexp.errors import ConfigError
from hoexp.hp.base import HyperFamily
from hoexp.hp.weight_decay import WeightDecay
from hoexp.method.base import HyperMethod
from hoexp.method.forward import ForwardMethod
from hoexp.method.hd import HDMethod
from hoexp.method.implicit import ImplicitMethod, NoHO
from hoexp.method.reversible import ReversibleMethod
from hoexp.method.unrolled import UnrolledMethod
from hoexp.method.solvers import ConjugateGradient, Exact, FixedPoint, Neumann
from hoexp.model.mlp import MLP
from hoexp.optim import Optimizer, build_optimizer
from hoexp.problem import Problem

IFT_METHODS = ("neumann", "cg", "fixed_point", "exact", "t1t2")
# Methods that differentiate the optimization path, so they can also tune lr and momentum.
PATH_METHODS: tuple[str, ...] = ("unrolled", "truncated", "forward", "reversible")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without CUDA is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=auto or device=cpu")
    return torch.device(name)


def build_data(spec: Spec) -> Splits:
    cfg = spec.dataset
    dtype = getattr(torch, spec.run.dtype)
    if cfg.name == "iris":
        from hoexp.dataset.iris import load_iris

        seed = spec.run.seed if cfg.split_seed is None else cfg.split_seed
        return load_iris(cfg.train_size, cfg.val_size, cfg.test_size, seed=seed,
                         standardize=cfg.standardize, dtype=dtype)
    raise ConfigError(f"unknown dataset '{cfg.name}'")


def build_model(spec: Spec, data: Splits) -> nn.Module:
    """The model, initialized from the run's seed without touching the global RNG."""
    cfg = spec.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.run.seed)
        if cfg.name == "mlp":
            model = MLP(data.num_features, data.num_classes, cfg.width, cfg.depth, cfg.activation, cfg.bias)
        else:
            raise ConfigError(f"unknown model '{cfg.name}'")
    return model.to(getattr(torch, spec.run.dtype))


def build_family(spec: Spec) -> HyperFamily:
    cfg = spec.hp
    if cfg.name == "weight_decay":
        return WeightDecay(cfg.granularity, cfg.init, tuple(cfg.include), min_value=cfg.min, max_value=cfg.max)
    raise ConfigError(f"unknown hp '{cfg.name}'")


def build_method(spec: Spec) -> HyperMethod:
    cfg = spec.method
    if cfg.name == "none":
        return NoHO()
    if cfg.name == "neumann":
        return ImplicitMethod(Neumann(cfg.terms, cfg.alpha, cfg.residual), "neumann")
    if cfg.name == "cg":
        return ImplicitMethod(ConjugateGradient(cfg.iterations, cfg.tol), "cg")
    if cfg.name == "fixed_point":
        return ImplicitMethod(FixedPoint(cfg.iterations, cfg.alpha, cfg.residual), "fixed_point")
    if cfg.name == "exact":
        return ImplicitMethod(Exact(cfg.max_params), "exact")
    if cfg.name == "t1t2":
        return ImplicitMethod(Neumann(0, cfg.alpha, cfg.residual), "t1t2")
    if cfg.name == "unrolled":
        return UnrolledMethod(None, "unrolled")
    if cfg.name == "truncated":
        return UnrolledMethod(cfg.k, "truncated")
    if cfg.name == "forward":
        return ForwardMethod(cfg.max_hparams)
    if cfg.name == "reversible":
        inner = spec.inner_optim
        mu = inner.momentum
        return ReversibleMethod(lr=inner.lr / (1 - mu), momentum=mu, radix_bits=cfg.radix_bits,
                                momentum_bits=cfg.momentum_bits)
    if cfg.name == "hd":
        lr0 = spec.inner_optim.lr if cfg.lr0 is None else cfg.lr0
        return HDMethod(cfg.variant, beta=cfg.beta, lr0=lr0, momentum=cfg.momentum, betas=tuple(cfg.betas),
                        eps=cfg.eps, name="hd")
    raise ConfigError(f"unknown method '{cfg.name}'")


def make_optimizer(cfg: Any) -> Optimizer:
    """An optimizer from its typed config (``momentum`` / ``nesterov`` are SGD presets)."""
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "name"}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    name = "sgd" if cfg.name in ("momentum", "nesterov") else cfg.name
    return build_optimizer(name, **kwargs)


def check_compatibility(spec: Spec, family: HyperFamily) -> None:
    """Refuse pairings that cannot work, naming the ones that can."""
    inner = spec.inner_optim
    if spec.method.name == "reversible" and (inner.name not in ("sgd", "momentum") or inner.nesterov
                                             or inner.dampening or inner.weight_decay or not 0 < inner.momentum < 1):
        raise ConfigError(
            f"method=reversible reverses SGD with heavy-ball momentum exactly; optim/inner={inner.name} (with these "
            "options) is not reversible: use optim/inner=momentum (0 < momentum < 1, no dampening or weight_decay), "
            "or method=unrolled / truncated for other optimizers")
    if spec.method.name in IFT_METHODS and not family.moves_optimum:
        alternatives = ", ".join(PATH_METHODS) or "none available yet"
        raise ConfigError(
            f"method={spec.method.name} (implicit differentiation) cannot tune hp={family.name}: it changes only "
            f"the optimization path, not the inner optimum w*; use a method that differentiates the path "
            f"({alternatives})"
        )


@dataclass
class Experiment:
    """Everything one run needs, built from a validated :class:`Spec`."""

    spec: Spec
    device: torch.device
    data: Splits
    model: nn.Module
    problem: Problem
    method: HyperMethod
    inner_opt: Optimizer
    outer_opt: Optimizer


def build(spec: Spec) -> Experiment:
    device = resolve_device(spec.run.device)
    family = build_family(spec)
    check_compatibility(spec, family)
    method = build_method(spec)
    try:
        inner_opt, outer_opt = make_optimizer(spec.inner_optim), make_optimizer(spec.outer_optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data = build_data(spec).to(device)
    model = build_model(spec, data).to(device)
    params = dict(model.named_parameters())
    try:
        family.init(params)  # checks that `include` matches something
    except ValueError as e:
        raise ConfigError(str(e)) from None
    n = sum(p.numel() for p in params.values())
    n_h = sum(v.numel() for v in family.init(params).values())
    if spec.method.name == "forward" and n_h > spec.method.max_hparams:
        raise ConfigError(
            f"method=forward carries one tangent per hyperparameter and hp={family.name} has {n_h:,} here, above "
            f"method.max_hparams={spec.method.max_hparams}; use a coarser granularity (e.g. hp.granularity=per_layer), "
            "a reverse method (unrolled, truncated) or an IFT method (neumann, cg), or raise method.max_hparams")
    if spec.method.name == "exact" and n > spec.method.max_params:
        raise ConfigError(f"method=exact would form a dense {n:,}x{n:,} Hessian, above method.max_params="
                          f"{spec.method.max_params:,}; use method=cg or method=neumann, or raise method.max_params")
    return Experiment(spec, device, data, model, Problem(model, family), method, inner_opt, outer_opt)


def preflight(spec: Spec) -> None:
    """Every check :func:`build` makes that needs no data or model: device, method × family,
    optimizer options. Run for each job of a sweep before any job starts."""
    resolve_device(spec.run.device)
    check_compatibility(spec, build_family(spec))
    try:
        make_optimizer(spec.inner_optim), make_optimizer(spec.outer_optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
