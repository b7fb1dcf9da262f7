"""A checked :class:`~hoexp.config.Spec` → the objects of one run, with no list of options.

Every group's option names its factory (``_target_``); :func:`build` calls them in a fixed order,
each with the one runtime argument its group receives (:mod:`hoexp.components`):

1. the optimizers (``optim/inner``, ``optim/outer``);
2. ``data = dataset(DataContext(seed, dtype))``;
3. ``model = model(data)``, seeded by the run without touching the global RNG;
4. one family per ``hp`` entry, ``family(BuildContext)`` (several are combined);
5. ``method(...)`` (``method(BuildContext)`` when partial);
6. ``problem = data.problem(model, family)``;
7. compatibility from what the objects declare (``moves_optimum``, ``needs_stationary_point``,
   ``pathwise`` / ``needs_pathwise_hp``, ``differentiates_steps``, ``refuses_data_parallel``, an optional
   ``method.check``), so a bad combination fails in one line before training starts;
8. the run's :class:`~hoexp.engine.runtime.Runtime` (device, the process group's context handed in,
   precision, compile): the task is left as its factory made it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from hoexp import tree
from hoexp.components import BuildContext, CheckContext, DataContext
from hoexp.config import Spec
from hoexp.engine import distributed
from hoexp.engine.precision import Precision
from hoexp.engine.runtime import Runtime
from hoexp.errors import ConfigError
from hoexp.hp.base import HyperFamily
from hoexp.hp.composite import Composite
from hoexp.method.base import HyperMethod
from hoexp.optim import Optimizer
from hoexp.task import Classification, Task
from hoexp.types import RunSettings

# Methods whose hypergradient differentiates the optimization path: what a refusal recommends instead.
PATH_METHODS = "unrolled, truncated, forward"


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without CUDA is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=auto or device=cpu")
    return torch.device(name)


def build_model(spec: Spec, data: Any) -> nn.Module:
    """The model, initialized from the run's seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.run.seed)
        try:
            model = spec.model.build(data)
        except ConfigError as e:
            raise ConfigError(
                f"model={spec.model.name} does not fit dataset={spec.dataset.name}: "
                f"{str(e).removeprefix(spec.model.prefix)}"
            ) from None
    return model.to(getattr(torch, spec.run.dtype))


@dataclass
class Prebuilt:
    """What :func:`preflight` built from a spec without data or model, for :func:`build` to use rather than build
    again: the optimizers, the model-free families (None where partial) and the method (None where partial)."""

    inner_opt: Optimizer
    outer_opt: Optimizer
    families: list[Any]
    method: HyperMethod | None


def build_family(spec: Spec, ctx: BuildContext, prebuilt: Sequence[Any] = ()) -> HyperFamily:
    """The tuned family (a :class:`Composite` when ``hp`` names several); ``prebuilt``: the model-free ones."""
    families: list[HyperFamily] = []
    for i, h in enumerate(spec.hp):
        families.append(prebuilt[i] if i < len(prebuilt) and prebuilt[i] is not None else h.build(ctx))
        ctx = replace(ctx, families=tuple(families))
    return families[0] if len(families) == 1 else Composite(tuple(families))


def build_method(spec: Spec, ctx: BuildContext | None = None) -> HyperMethod:
    """The method; a partial one (``hd``, ``reversible``) needs the run's :class:`BuildContext` (without one, the
    whole experiment is built to get it)."""
    if not spec.method.partial:
        return spec.method.build()
    return spec.method.build(ctx) if ctx is not None else build(spec).method


def check_compatibility(spec: Spec, method: HyperMethod, family: Any, ctx: CheckContext, world_size: int = 1) -> None:
    """What the objects declare, enforced before anything runs; refusals name what works. ``family``: the built
    family, or (before a run, :func:`preflight`) the classes the hp factories declare they return; ``world_size``:
    the processes the run is to have (data-parallel above 1)."""
    name = getattr(method, "name", spec.method.name)
    check = getattr(method, "check", None)  # method-specific limits (dense solve size, tangents, optimizer)
    if check is not None:
        try:
            check(ctx)
        except ValueError as e:
            raise ConfigError(f"{spec.method.prefix}{e}") from None
    members = family if isinstance(family, list) else list(getattr(family, "families", (family,)))
    check_pathwise(name, method, members)
    if getattr(method, "needs_stationary_point", False):
        path_only = [f.name for f in members if f is not None and getattr(f, "moves_optimum", True) is False]
        if path_only:
            first_order = "first-order " if name == "fd" else ""
            raise ConfigError(
                f"method={name} ({first_order}implicit differentiation) cannot tune hp={path_only[0]}: it changes "
                f"only the optimization path, not the inner optimum w*; use a method that differentiates the path "
                f"({PATH_METHODS})"
            )
    if spec.run.compile and getattr(method, "differentiates_steps", False):
        raise ConfigError(
            f"compile=true compiles plain training steps, and method={name} takes none (it "
            "differentiates its steps); drop compile=true, or use an IFT method (neumann, cg, "
            "fixed_point, exact, t1t2), fd or none"
            + ("; method.compile=true compiles its minibatch derivatives" if hasattr(method, "compile") else "")
        )
    check_precision(spec, method)
    check_distributed(spec, world_size, method=method)


def check_pathwise(name: str, method: HyperMethod, members: list[Any]) -> None:
    """A method that differentiates the training loss in the hyperparameters (``needs_pathwise_hp``, assumed of a
    method that does not say) refuses a family without a pathwise derivative (``pathwise`` false: hard dropout
    masks). Before a run a partial family is its :class:`Declared` view (``pathwise`` read from its options), or
    its bare class (unknown: checked when the run builds)."""
    opaque = [f for f in members if f is not None and getattr(f, "pathwise", True) is False]
    if opaque and getattr(method, "needs_pathwise_hp", True):
        setting = f"relaxation={opaque[0].relaxation}" if hasattr(opaque[0], "relaxation") else f"hp={opaque[0].name}"
        raise ConfigError(
            f"method={name} cannot tune hp={opaque[0].name}: {setting} has no pathwise derivative; tune it with "
            "method=pes or method=stn (whole-horizon / best-response), or use relaxation=straight_through (the same "
            "masks, a surrogate derivative) or concrete|gaussian"
        )


def check_precision(spec: Spec, method: HyperMethod) -> None:
    """``precision=bf16|fp16``: only plain training steps (IFT methods, fd, none), float32 runs."""
    run = spec.run
    if run.precision == "fp32":
        return
    if getattr(method, "differentiates_steps", False):
        raise ConfigError(
            f"precision={run.precision} applies to plain training steps, and method={spec.method.name} "
            "differentiates its steps (in the run's dtype); use precision=fp32, or an IFT method "
            "(neumann, cg, fixed_point, exact, t1t2), fd or none"
        )
    if run.dtype != "float32":
        raise ConfigError(
            f"precision={run.precision} runs float32 weights' steps in lower precision; with "
            f"dtype={run.dtype} use precision=fp32"
        )
    if run.precision == "fp16" and run.compile:
        raise ConfigError(
            "precision=fp16 scales the loss and skips overflowing steps, which compile=true does not "
            "do; use precision=bf16 with compile=true, or compile=false"
        )


def check_distributed(spec: Spec, world_size: int, method: HyperMethod | None = None) -> None:
    """A data-parallel run (``world_size`` > 1: ``torchrun``, a multi-task SLURM job, or a sweep for such a
    launcher): only methods whose every derivative goes through the synced losses (``refuses_data_parallel``
    empty), or that spread their own work over the ranks (``spreads_over_ranks``: ES particles; ``refuses_ranks``
    says why not for this many). ``method`` None: built here when it needs no runtime context."""
    if world_size < 2:
        return
    if method is None and not spec.method.partial:
        method = spec.method.build()
    if getattr(method, "spreads_over_ranks", False):  # its own work over the ranks (ES particles), not the data
        why = method.refuses_ranks(world_size)  # type: ignore[union-attr]
        if why:
            raise ConfigError(f"method={spec.method.name} with {world_size} processes: {why}")
        return
    why = getattr(method, "refuses_data_parallel", "") if method is not None else ""
    if why:
        raise ConfigError(
            f"method={spec.method.name} does not run data-parallel ({world_size} processes): it {why}; "
            "use an IFT method without a dense solve (neumann, cg, fixed_point, t1t2), fd, unrolled, "
            "truncated, pes (spread over the ranks, or method.vectorize=false) or none, or run it in one process"
        )
    if spec.run.compile:
        raise ConfigError(
            "compile=true does not run data-parallel (the compiled step cannot all-reduce inside "
            "torch.func); drop compile=true, or run in one process"
        )
    if getattr(method, "compile", False):
        raise ConfigError(
            "method.compile=true does not run data-parallel (the compiled hypergradient cannot "
            "all-reduce inside torch.compile); drop method.compile=true, or run in one process"
        )


@dataclass
class Experiment:
    """Everything one run needs, built from a checked :class:`Spec`."""

    spec: Spec
    device: torch.device
    data: Any  # what the dataset factory returned: Splits, LMData, or a user's data with .problem(model, family)
    model: nn.Module
    problem: Classification  # the task (LanguageModel for dataset=ptb)
    method: HyperMethod
    inner_opt: Optimizer
    outer_opt: Optimizer
    settings: RunSettings  # the loop's settings, from spec.run (what hoexp.run reads)
    runtime: Runtime  # how this process runs it: device, process group, precision, compile cache

    @property
    def task(self) -> Task:
        """The task (an alias of ``problem``): what :func:`hoexp.run` reads."""
        return self.problem


def build(spec: Spec, dist: distributed.Context | None = None, prebuilt: Prebuilt | None = None) -> Experiment:
    """The objects of one run, built in the order of the module docstring. ``dist``: the process group's context
    (None: one process); ``prebuilt``: what :func:`preflight` built for this spec (None: built here)."""
    dist = dist if dist is not None else distributed.Context()
    device = resolve_device(distributed.device_for(spec.run.device, dist))
    pre = prebuilt if prebuilt is not None else Prebuilt(spec.inner_optim.build(), spec.outer_optim.build(), [], None)
    inner_opt, outer_opt, method = pre.inner_opt, pre.outer_opt, pre.method
    data = spec.dataset.build(DataContext(spec.run.seed, getattr(torch, spec.run.dtype))).to(device)
    model = build_model(spec, data).to(device)
    params = dict(model.named_parameters())
    ctx = BuildContext(model, inner_opt, spec.run.inner_steps, spec.run.seed, data)
    try:
        family = build_family(spec, ctx, pre.families)
        raw = family.init(params)  # checks that `include` matches something
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if method is None or spec.method.partial:
        method = build_method(spec, replace(ctx, families=tuple(getattr(family, "families", (family,)))))
    problem: Classification = data.problem(model, family)
    check_compatibility(
        spec, method, family, CheckContext(inner_opt, family, tree.numel(params), tree.numel(raw)), dist.world_size
    )
    precision = Precision(spec.run.precision, device.type) if spec.run.precision != "fp32" else None
    runtime = Runtime(device, dist, precision, spec.run.compile, bool(getattr(method, "spreads_over_ranks", False)))
    settings = RunSettings.from_spec(spec)
    return Experiment(spec, device, data, model, problem, method, inner_opt, outer_opt, settings, runtime)


def preflight(spec: Spec, device: bool = True, world_size: int = 1) -> Prebuilt:
    """Every check :func:`build` makes that needs no data or model: device (unless ``device`` is false: a
    config printed, not run), the optimizers', method's and model-free families' options (their factories run),
    the method against what the families declare (:class:`Declared`), and the method's compile / precision /
    data-parallel compatibility (``world_size`` processes). Run for each job of a sweep before any job starts;
    checks that need the model (family × method, sizes) run when the job builds. Returns what it built, for
    :func:`build` (a partial family or method needs the model: built there)."""
    if device:
        resolve_device(spec.run.device)
    inner, outer = spec.inner_optim.build(), spec.outer_optim.build()
    families = [h.build() if not h.partial else declared(h) for h in spec.hp]  # model-free ones whole
    prebuilt = [None if h.partial else f for h, f in zip(spec.hp, families)]
    if spec.method.partial:
        return Prebuilt(inner, outer, prebuilt, None)
    method = spec.method.build()
    check_compatibility(spec, method, families, CheckContext(inner), world_size)
    return Prebuilt(inner, outer, prebuilt, method)


def declared_type(factory: Any) -> Any:
    """The class a factory's return annotation names (its class attributes declare capabilities such as
    ``moves_optimum``), or None."""
    import typing

    try:
        hint = typing.get_type_hints(factory).get("return")
    except Exception:  # unresolvable annotations: the capabilities are checked when the run is built
        return None
    return hint if isinstance(hint, type) else None


class Declared:
    """A partial family before its run (:func:`preflight`): its factory's options first, then what the class its
    factory declares says, a property evaluated on this view. So a capability computed from options (``Dropout.pathwise``
    from ``relaxation``) is known before the model is built; one that reads anything else raises AttributeError
    (unknown: checked when the run builds)."""

    def __init__(self, cls: type, component: Any):
        self._cls, self._component = cls, component

    def __getattr__(self, item: str) -> Any:
        if item.startswith("_"):
            raise AttributeError(item)
        try:
            return getattr(self._component, item)
        except AttributeError:
            attr = getattr(self._cls, item)
        return attr.__get__(self) if isinstance(attr, property) else attr


def declared(component: Any) -> Declared | None:
    """A partial family's :class:`Declared` view, or None when its factory declares no class."""
    cls = declared_type(component.target)
    return None if cls is None else Declared(cls, component)
