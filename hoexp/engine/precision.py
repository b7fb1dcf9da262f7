"""Mixed precision for the inner training steps: ``precision=bf16|fp16|fp32``.

Plain training steps (the run's step, ``hoexp.engine.runtime.Runtime.step``, eager or compiled) compute the training
loss under ``torch.autocast`` (matrix products in bfloat16 / float16, reductions and the loss in
float32); the weights, their gradients and the optimizer state stay in the run's float32. Everything
else stays in float32 too: the hypergradient's gradients, Hessian-vector products, solves, mixed
terms and the hyperparameter update run outside autocast.

float16 overflows where bfloat16 does not, so ``fp16`` scales the loss (dynamic loss scaling, as
``torch.amp.GradScaler``): gradients of ``scale · L`` are divided by ``scale``; a step whose gradients
are not finite is skipped and halves the scale, and ``growth_interval`` finite steps in a row double
it. Deciding to skip reads one flag on the host per step. The scale is checkpointed with the run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    name: str = "fp32"
    device_type: str = "cpu"
    init_scale: float = 2.0**16
    growth_interval: int = 2000
    state: dict[str, Any] = field(default_factory=dict)  # fp16: {"scale": float, "good": int}

    def __post_init__(self) -> None:
        if self.name not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {self.name!r}")
        if self.scaled and not self.state:
            self.state = {"scale": self.init_scale, "good": 0}

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.name]

    @property
    def scaled(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device_type, dtype=dtype)

    def scale(self) -> float:
        return float(self.state.get("scale", 1.0)) if self.scaled else 1.0

    def update(self, finite: bool) -> None:
        """After a step: halve the scale on overflow, double it after ``growth_interval`` good steps."""
        if not self.scaled:
            return
        if not finite:
            self.state = {"scale": self.state["scale"] / 2, "good": 0}
        elif self.state["good"] + 1 >= self.growth_interval:
            self.state = {"scale": self.state["scale"] * 2, "good": 0}
        else:
            self.state = {**self.state, "good": self.state["good"] + 1}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaled and state:
            self.state = {"scale": float(state["scale"]), "good": int(state["good"])}
