"""Config → objects: data, model, hyperparameter family, method, optimizers.

Compatibility checks live here (method × family, dataset × model), so that a bad combination
fails with one clear line before any training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from hoexp.config import Spec
from hoexp.dataset.base import Splits
from hoexp.errors import ConfigError
from hoexp.hp.base import HyperFamily
from hoexp.hp.composite import Composite
from hoexp.hp.dropout import Dropout
from hoexp.hp.learning_rate import LearningRate, Momentum
from hoexp.hp.weight_decay import WeightDecay
from hoexp.method.base import HyperMethod
from hoexp.method.curvature import CURVATURES
from hoexp.method.first_order import FiniteDifferenceMethod
from hoexp.method.forward import ForwardMethod
from hoexp.method.hd import HDMethod
from hoexp.method.implicit import ImplicitMethod, NoHO
from hoexp.method.reversible import ReversibleMethod
from hoexp.method.solvers import ConjugateGradient, Exact, FixedPoint, Neumann, Solver
from hoexp.method.unrolled import UnrolledMethod
from hoexp.model.mlp import MLP
from hoexp.optim import Optimizer, build_optimizer
from hoexp.task import Classification, Task
from hoexp.types import RunSettings

if TYPE_CHECKING:
    from hoexp.model.lstm import LSTMLanguageModel
    from hoexp.task.language_model import LMData

IFT_METHODS = ("neumann", "cg", "fixed_point", "exact", "t1t2")
# Methods that train with plain steps and differentiate at the reached weights (IFT and the first-order fd):
# they cannot tune lr or momentum, and their steps can be compiled or run in mixed precision.
PLAIN_STEP_METHODS: tuple[str, ...] = (*IFT_METHODS, "fd")
# Methods that differentiate the optimization path, so they can also tune lr and momentum.
PATH_METHODS: tuple[str, ...] = ("unrolled", "truncated", "forward", "reversible")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without CUDA is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=auto or device=cpu")
    return torch.device(name)


def build_data(spec: Spec) -> Splits | LMData:
    cfg = spec.dataset
    dtype = getattr(torch, spec.run.dtype)
    if cfg.name == "iris":
        from hoexp.dataset.iris import load_iris

        seed = spec.run.seed if cfg.split_seed is None else cfg.split_seed
        return load_iris(cfg.train_size, cfg.val_size, cfg.test_size, seed=seed,
                         standardize=cfg.standardize, dtype=dtype)
    if cfg.name == "mnist":
        from hoexp.dataset.mnist import load_mnist
        from hoexp.dataset.root import data_root

        seed = spec.run.seed if cfg.split_seed is None else cfg.split_seed
        return load_mnist(data_root(cfg.data_root), val_size=cfg.val_size, train_size=cfg.train_size, seed=seed,
                          download=cfg.download, dtype=dtype)
    if cfg.name == "ptb":
        from hoexp.dataset.ptb import load_ptb
        from hoexp.dataset.root import data_root
        from hoexp.task.language_model import lm_data

        return lm_data(load_ptb(data_root(cfg.data_root), download=cfg.download), cfg.batch_size,
                       cfg.eval_batch_size, cfg.bptt)
    raise ConfigError(f"unknown dataset '{cfg.name}'")


def build_model(spec: Spec, data: Splits | LMData) -> MLP | LSTMLanguageModel:
    """The model, initialized from the run's seed without touching the global RNG.

    ``data`` matches the model (check_compatibility: mlp on iris / mnist splits, lstm on ptb streams)."""
    cfg = spec.model
    model: MLP | LSTMLanguageModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.run.seed)
        if cfg.name == "mlp":
            splits = cast(Splits, data)
            model = MLP(splits.num_features, splits.num_classes, cfg.width, cfg.depth, cfg.activation, cfg.bias)
        elif cfg.name == "lstm":
            from hoexp.model.lstm import LSTMLanguageModel

            model = LSTMLanguageModel(cast("LMData", data).vocab_size, cfg.embed_dim, cfg.hidden, cfg.layers,
                                      cfg.tie_weights)
        else:
            raise ConfigError(f"unknown model '{cfg.name}'")
    return model.to(getattr(torch, spec.run.dtype))


def build_family(spec: Spec, model: MLP | LSTMLanguageModel) -> HyperFamily:
    """The tuned family (a :class:`Composite` when ``hp`` names several)."""
    names = tuple(n for n, _ in model.named_parameters())
    families: list[HyperFamily] = []
    for cfg in spec.hp:
        if cfg.name == "weight_decay":
            families.append(WeightDecay(cfg.granularity, cfg.init, tuple(cfg.include), min_value=cfg.min,
                                        max_value=cfg.max, offset_scale=cfg.offset_scale))
        elif cfg.name == "dropout":
            families.append(Dropout(model.unit_shapes(), cfg.granularity, cfg.init, cfg.temperature,
                                    tuple(cfg.include), cfg.min, cfg.max, relaxation=cfg.relaxation,
                                    offset_scale=cfg.offset_scale))
        elif cfg.name == "lr":
            inner_lr = spec.inner_optim.lr
            families.append(LearningRate(names, cfg.granularity, inner_lr if cfg.init is None else cfg.init,
                                         max(spec.run.inner_steps, 1), tuple(cfg.include), cfg.min, cfg.max,
                                         fill=inner_lr))
        elif cfg.name == "momentum":
            mu = spec.inner_optim.momentum
            families.append(Momentum(names, mu if cfg.init is None else cfg.init, tuple(cfg.include), cfg.min,
                                     cfg.max, fill=mu))
        else:
            raise ConfigError(f"unknown hp '{cfg.name}'")
    return families[0] if len(families) == 1 else Composite(tuple(families))


def ift_solver(cfg: Any) -> Solver:
    """The linear solver of an IFT method's config (with ``alpha=auto`` the method sets ``α`` per solve)."""
    if cfg.name == "neumann":
        return Neumann(cfg.terms, _alpha(cfg), cfg.residual)
    if cfg.name == "cg":
        return ConjugateGradient(cfg.iterations, cfg.tol)
    if cfg.name == "fixed_point":
        return FixedPoint(cfg.iterations, _alpha(cfg), cfg.residual)
    if cfg.name == "exact":
        return Exact(cfg.max_params)
    if cfg.name == "t1t2":
        return Neumann(0, _alpha(cfg), cfg.residual)
    raise ConfigError(f"unknown IFT method '{cfg.name}'")


def _alpha(cfg: Any) -> float:
    """``method.alpha`` of a series method (0.01 stands in for ``auto`` until the method sets ``α``)."""
    return 0.01 if cfg.alpha == "auto" else cfg.alpha


def build_method(spec: Spec) -> HyperMethod:
    cfg = spec.method
    if cfg.name == "none":
        return NoHO()
    if cfg.name in IFT_METHODS:
        auto = getattr(cfg, "alpha", None) == "auto"
        return ImplicitMethod(ift_solver(cfg), cfg.name, curvature=CURVATURES[cfg.curvature], damping=cfg.damping,
                              warm_start=getattr(cfg, "warm_start", False),
                              alpha_every=cfg.alpha_every if auto else 0, hvp=cfg.hvp, compile=cfg.compile)
    if cfg.name == "fd":
        return FiniteDifferenceMethod(cfg.alpha, cfg.eps, cfg.terms)
    if cfg.name == "unrolled":
        return UnrolledMethod(None, "unrolled", checkpoint_every=cfg.checkpoint_every)
    if cfg.name == "truncated":
        return UnrolledMethod(cfg.k, "truncated", checkpoint_every=cfg.checkpoint_every)
    if cfg.name == "forward":
        return ForwardMethod(cfg.max_hparams, strategy=cfg.strategy, carry=cfg.carry, decay=cfg.decay)
    if cfg.name == "reversible":
        inner = spec.inner_optim
        mu = inner.momentum
        return ReversibleMethod(lr=inner.lr / (1 - mu), momentum=mu, radix_bits=cfg.radix_bits,
                                momentum_bits=cfg.momentum_bits)
    if cfg.name == "hd":
        lr_init = spec.hp[0].init if spec.hp and spec.hp[0].name == "lr" else None
        lr0 = cfg.lr0 if cfg.lr0 is not None else (lr_init if lr_init is not None else spec.inner_optim.lr)
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


MOVES_OPTIMUM = {"weight_decay": True, "dropout": True, "lr": False, "momentum": False}
MOMENTUM_OPTIMIZERS = ("momentum", "nesterov", "sgd")  # sgd only with momentum > 0


MODELS_FOR = {"iris": ("mlp",), "mnist": ("mlp",), "ptb": ("lstm",)}


def check_compatibility(spec: Spec) -> None:
    """The method × family matrix (README), enforced before anything runs; refusals name what works."""
    method, families = spec.method.name, [h.name for h in spec.hp]
    models = MODELS_FOR.get(spec.dataset.name, ())
    if spec.model.name not in models:
        raise ConfigError(f"model={spec.model.name} does not fit dataset={spec.dataset.name}; use model="
                          f"{' or model='.join(models)} (classification: iris, mnist with mlp; language "
                          "modelling: ptb with lstm)")
    path_only = [f for f in families if not MOVES_OPTIMUM[f]]
    if method in PLAIN_STEP_METHODS and path_only:
        raise ConfigError(
            f"method={method} ({'first-order ' if method == 'fd' else ''}implicit differentiation) cannot tune hp={path_only[0]}: it changes only the "
            f"optimization path, not the inner optimum w*; use a method that differentiates the path "
            f"({', '.join(PATH_METHODS[:3])})")
    if method == "hd" and (families != ["lr"] or spec.hp[0].granularity != "global"):
        raise ConfigError("method=hd adapts one global learning rate online: use hp=lr hp.lr.granularity=global "
                          "(for other families use unrolled, truncated, forward or an IFT method)")
    inner = spec.inner_optim
    if method == "reversible" and (inner.name not in ("sgd", "momentum") or inner.nesterov
                                   or inner.dampening or inner.weight_decay or not 0 < inner.momentum < 1):
        raise ConfigError(
            f"method=reversible reverses SGD with heavy-ball momentum exactly; optim/inner={inner.name} (with these "
            "options) is not reversible: use optim/inner=momentum (0 < momentum < 1, no dampening or weight_decay), "
            "or method=unrolled / truncated for other optimizers")
    if "momentum" in families and (inner.name not in MOMENTUM_OPTIMIZERS or not getattr(inner, "momentum", 0) > 0):
        raise ConfigError(f"hp=momentum tunes SGD momentum, but optim/inner={inner.name} has no momentum buffer; "
                          "use optim/inner=momentum or nesterov")
    if spec.run.compile and method not in (*PLAIN_STEP_METHODS, "none"):
        raise ConfigError(f"compile=true compiles plain training steps, and method={method} takes none (it "
                          "differentiates its steps); drop compile=true, or use an IFT method (neumann, cg, "
                          "fixed_point, exact, t1t2), fd or none")
    check_precision(spec)
    check_distributed(spec)


def check_precision(spec: Spec) -> None:
    """``precision=bf16|fp16``: only plain training steps (IFT methods, fd, none), float32 runs."""
    run, method = spec.run, spec.method.name
    if run.precision == "fp32":
        return
    if method not in (*PLAIN_STEP_METHODS, "none"):
        raise ConfigError(f"precision={run.precision} applies to plain training steps, and method={method} "
                          "differentiates its steps (in the run's dtype); use precision=fp32, or an IFT method "
                          "(neumann, cg, fixed_point, exact, t1t2), fd or none")
    if run.dtype != "float32":
        raise ConfigError(f"precision={run.precision} runs float32 weights' steps in lower precision; with "
                          f"dtype={run.dtype} use precision=fp32")
    if run.precision == "fp16" and run.compile:
        raise ConfigError("precision=fp16 scales the loss and skips overflowing steps, which compile=true does not "
                          "do; use precision=bf16 with compile=true, or compile=false")


def check_distributed(spec: Spec, world_size: int = 0) -> None:
    """A data-parallel run (``torchrun``, a multi-task SLURM job, or ``world_size`` > 1: a sweep for such a
    launcher): supported methods only."""
    from hoexp import distributed

    world_size = world_size or distributed.launched().world_size
    if world_size < 2:
        return
    method = spec.method.name
    if method not in distributed.SUPPORTED_METHODS:
        raise ConfigError(f"method={method} does not run data-parallel ({world_size} processes): it "
                          f"{distributed.UNSUPPORTED_WHY.get(method, 'is not supported')}; use one of "
                          f"{', '.join(distributed.SUPPORTED_METHODS)}, or run it in one process")
    if spec.run.compile:
        raise ConfigError("compile=true does not run data-parallel (the compiled step cannot all-reduce inside "
                          "torch.func); drop compile=true, or run in one process")
    if getattr(spec.method, "compile", False):
        raise ConfigError("method.compile=true does not run data-parallel (the compiled hypergradient cannot "
                          "all-reduce inside torch.compile); drop method.compile=true, or run in one process")


@dataclass
class Experiment:
    """Everything one run needs, built from a validated :class:`Spec`."""

    spec: Spec
    device: torch.device
    data: Splits | LMData  # LMData for language models (dataset=ptb)
    model: nn.Module
    problem: Classification  # the task (LanguageModel for dataset=ptb)
    method: HyperMethod
    inner_opt: Optimizer
    outer_opt: Optimizer

    @property
    def task(self) -> Task:
        """The task (an alias of ``problem``): what :func:`hoexp.run` reads."""
        return self.problem

    @property
    def settings(self) -> RunSettings:
        """The loop's settings, from ``spec.run``."""
        return RunSettings.from_spec(self.spec)


def build(spec: Spec) -> Experiment:
    from hoexp import distributed

    device = resolve_device(distributed.device_for(spec.run.device, distributed.current()))
    check_compatibility(spec)
    method = build_method(spec)
    try:
        inner_opt, outer_opt = make_optimizer(spec.inner_optim), make_optimizer(spec.outer_optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data = build_data(spec).to(device)
    model = build_model(spec, data).to(device)
    params = dict(model.named_parameters())
    try:
        family = build_family(spec, model)
        family.init(params)  # checks that `include` matches something
    except ValueError as e:
        raise ConfigError(str(e)) from None
    n = sum(p.numel() for p in params.values())
    n_h = sum(v.numel() for v in family.init(params).values())
    if spec.method.name == "forward" and n_h > spec.method.max_hparams:
        raise ConfigError(
            f"method=forward carries one tangent per hyperparameter and hp={spec.hp_name} has {n_h:,} here, above "
            f"method.max_hparams={spec.method.max_hparams}; use a coarser granularity (e.g. hp.granularity=per_layer), "
            "a reverse method (unrolled, truncated) or an IFT method (neumann, cg), or raise method.max_hparams")
    if spec.method.name == "exact" and n > spec.method.max_params:
        raise ConfigError(f"method=exact would form a dense {n:,}x{n:,} Hessian, above method.max_params="
                          f"{spec.method.max_params:,}; use method=cg or method=neumann, or raise method.max_params")
    problem: Classification
    if spec.dataset.name == "ptb":
        from hoexp.task.language_model import LanguageModel

        problem = LanguageModel(model, family, data=data, bptt=spec.dataset.bptt)
    else:
        problem = Classification(model, family, data=data, batch_size=spec.dataset.batch_size,
                                 val_batch_size=spec.dataset.val_batch_size)
    problem.compile = spec.run.compile
    if spec.run.precision != "fp32":
        from hoexp.precision import Precision

        problem.precision = Precision(spec.run.precision, device.type)
    from hoexp import distributed

    if distributed.current().active:
        problem.sync = distributed.sync
    return Experiment(spec, device, data, model, problem, method, inner_opt, outer_opt)


def preflight(spec: Spec, device: bool = True) -> None:
    """Every check :func:`build` makes that needs no data or model: device (unless ``device`` is false:
    a config printed, not run), method × family, optimizer options. Run for each job of a sweep before
    any job starts."""
    if device:
        resolve_device(spec.run.device)
    check_compatibility(spec)
    try:
        make_optimizer(spec.inner_optim), make_optimizer(spec.outer_optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
