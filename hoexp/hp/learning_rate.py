"""Optimizer hyperparameters: learning rates (global, per layer, per-step schedule) and momentum.

They act through the inner optimizer's per-call overrides (``update(..., lr=..., momentum=...)``),
not through the loss, so they change only the optimization path and not ``w*``: implicit
differentiation cannot tune them; unrolled, truncated and forward mode can.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

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
        return {f"{self.name}:{n}": torch.full(shape, raw0, dtype=ref.dtype, device=ref.device)
                for n in self.covered()}

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
        lrs = {k[len(prefix):]: torch.exp(v) for k, v in raw.items() if k.startswith(prefix)}
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
        mus = {k[len(prefix):]: torch.sigmoid(v) for k, v in raw.items() if k.startswith(prefix)}
        return {"momentum": {n: mus.get(n, self.fill) for n in self.param_names}}
