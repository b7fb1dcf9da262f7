"""Optimizer hyperparameters: learning rates (global, per layer, per-step schedule) and momentum.

They act through the inner optimizer's per-call overrides (``update(..., lr=..., momentum=...)``),
not through the loss, so they change only the optimization path and not ``w*``: implicit
differentiation cannot tune them; unrolled, truncated and forward mode can.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import torch
from torch import Tensor

from hoexp.components import BuildContext, PositiveFloat, Range
from hoexp.hp.base import Params, select

LR_GRANULARITIES = ("global", "per_layer", "per_step")


@dataclass(frozen=True)
class LearningRate:
    """``lr = exp(raw)``. ``per_step``: one rate per layer per inner step (Maclaurin et al. 2015), so
    ``raw[layer]`` has ``steps`` entries and step ``t`` uses entry ``min(t, steps − 1)``."""

    param_names: tuple[str, ...] = ()
    granularity: str = "global"
    init_value: float = 0.01
    steps: int = 1
    include: tuple[str, ...] = ("*",)
    min_value: float = 1e-8
    max_value: float = 10.0
    fill: float = 0.01  # the rate of parameters not covered by `include` (the optimizer's configured lr)
    name: str = "lr"
    moves_optimum: bool = False
    sets: ClassVar[frozenset[str]] = frozenset({"lr"})  # the optimizer value its overrides set
    grid: ClassVar[tuple[float, ...]] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # hoexp compare's default grid
    log_scale: ClassVar[bool] = True

    def __post_init__(self):
        if self.granularity not in LR_GRANULARITIES:
            raise ValueError(f"unknown lr granularity '{self.granularity}'; valid: {', '.join(LR_GRANULARITIES)}")
        if not self.init_value > 0:
            raise ValueError(f"lr init must be > 0 (it is parameterized as exp(raw)), got {self.init_value}")

    def covered(self) -> list[str]:
        names = select(list(self.param_names), self.include)
        if not names:
            raise ValueError(f"lr include patterns {list(self.include)} match no parameter")
        return names

    def init(self, params: Params) -> dict[str, Tensor]:
        ref = next(iter(params.values()))
        raw0 = math.log(self.init_value)
        if self.granularity == "global":
            return {self.name: torch.full((), raw0, dtype=ref.dtype, device=ref.device)}
        shape = (self.steps,) if self.granularity == "per_step" else ()
        return {f"{self.name}:{n}": torch.full(shape, raw0, dtype=ref.dtype, device=ref.device) for n in self.covered()}

    def _mine(self, k: str) -> bool:
        return k == self.name or k.startswith(self.name + ":")

    def view(self, raw: Params) -> dict[str, Tensor]:
        return {k: torch.exp(v) for k, v in raw.items() if self._mine(k)}

    def clamp(self, raw: Params) -> dict[str, Tensor]:
        lo, hi = math.log(self.min_value), math.log(self.max_value)
        return {k: (v.clamp(lo, hi) if self._mine(k) else v) for k, v in raw.items()}

    def penalty(self, params: Params, raw: Params) -> float:
        return 0.0

    def optimizer_overrides(self, raw: Params, step: int) -> dict:
        if self.granularity == "global":
            return {"lr": torch.exp(raw[self.name])}
        prefix = self.name + ":"
        lrs = {k[len(prefix) :]: torch.exp(v) for k, v in raw.items() if k.startswith(prefix)}
        if self.granularity == "per_step":
            lrs = {n: v[min(step, v.shape[0] - 1)] for n, v in lrs.items()}
        # Parameters not covered keep the optimizer's configured rate: the optimizer needs every name.
        return {"lr": {n: lrs.get(n, self.fill) for n in self.param_names}}


@dataclass(frozen=True)
class Momentum:
    """Per-layer momentum ``μ = σ(raw)`` in (0, 1) for SGD with momentum (needs ``optim/inner=momentum``
    or ``nesterov``, whose momentum buffer exists)."""

    param_names: tuple[str, ...] = ()
    init_value: float = 0.9
    include: tuple[str, ...] = ("*",)
    min_value: float = 0.0
    max_value: float = 0.999
    fill: float = 0.9  # the momentum of parameters not covered by `include`
    name: str = "momentum"
    moves_optimum: bool = False
    sets: ClassVar[frozenset[str]] = frozenset({"momentum"})
    grid: ClassVar[tuple[float, ...]] = (0.5, 0.7, 0.8, 0.9, 0.95)
    log_scale: ClassVar[bool] = False
    granularity: str = field(default="per_layer")

    def __post_init__(self):
        if not 0 < self.init_value < 1:
            raise ValueError(f"momentum init must be in (0, 1), got {self.init_value}")

    def init(self, params: Params) -> dict[str, Tensor]:
        ref = next(iter(params.values()))
        raw0 = math.log(self.init_value) - math.log1p(-self.init_value)
        names = select(list(self.param_names), self.include)
        if not names:
            raise ValueError(f"momentum include patterns {list(self.include)} match no parameter")
        return {f"{self.name}:{n}": torch.full((), raw0, dtype=ref.dtype, device=ref.device) for n in names}

    def view(self, raw: Params) -> dict[str, Tensor]:
        return {k: torch.sigmoid(v) for k, v in raw.items() if k.startswith(self.name + ":")}

    def clamp(self, raw: Params) -> dict[str, Tensor]:
        lo = -math.inf if self.min_value <= 0 else math.log(self.min_value) - math.log1p(-self.min_value)
        hi = math.log(self.max_value) - math.log1p(-self.max_value)
        return {k: (v.clamp(lo, hi) if k.startswith(self.name + ":") else v) for k, v in raw.items()}

    def penalty(self, params: Params, raw: Params) -> float:
        return 0.0

    def optimizer_overrides(self, raw: Params, step: int) -> dict:
        prefix = self.name + ":"
        mus = {k[len(prefix) :]: torch.sigmoid(v) for k, v in raw.items() if k.startswith(prefix)}
        return {"momentum": {n: mus.get(n, self.fill) for n in self.param_names}}


def lr(
    ctx: BuildContext,
    *,
    granularity: Literal["global", "per_layer", "per_step"] = "global",
    init: PositiveFloat | None = None,
    include: Sequence[str] = ("*",),
    min: PositiveFloat = 1e-8,
    max: PositiveFloat = 10.0,
) -> LearningRate:
    """``hp=lr``: inner learning rates ``exp(raw)`` (``init`` None: the inner optimizer's ``lr``); parameters
    outside ``include`` keep that configured rate."""
    configured = ctx.inner_opt.defaults.get("lr")
    if init is None:
        if configured is None:
            raise ValueError(f"optim/inner={ctx.inner_opt.name} has no configured lr; set hp.lr.init")
        init = float(configured)
    start = init
    if not min < max or not min <= start <= max:
        raise ValueError(f"need 0 < min <= init <= max; got min={min}, init={start}, max={max}")
    return LearningRate(
        ctx.param_names,
        granularity,
        start,
        builtins.max(ctx.inner_steps, 1),
        tuple(include),
        min,
        max,
        fill=float(configured if configured is not None else start),
    )


def momentum(
    ctx: BuildContext,
    *,
    init: Annotated[float, Range(gt=0, lt=1)] | None = None,
    include: Sequence[str] = ("*",),
    min: Annotated[float, Range(ge=0, lt=1)] = 0.0,
    max: Annotated[float, Range(gt=0, lt=1)] = 0.999,
) -> Momentum:
    """``hp=momentum``: per-layer momentum ``σ(raw)`` of an SGD inner optimizer with momentum (``init`` None: its
    configured momentum)."""
    mu = float(ctx.inner_opt.defaults.get("momentum", 0.0))
    if not mu > 0:
        raise ValueError(
            f"hp=momentum tunes SGD momentum, but optim/inner={ctx.inner_opt.name} has no momentum "
            "buffer; use optim/inner=momentum or nesterov"
        )
    start = mu if init is None else init
    if not min < start <= max:
        raise ValueError(f"need 0 <= min < init <= max < 1; got min={min}, init={start}, max={max}")
    return Momentum(ctx.param_names, start, tuple(include), min, max, fill=mu)
