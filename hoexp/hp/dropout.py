"""Dropout rates as hyperparameters, made differentiable by concrete (relaxed Bernoulli) masks.

For a unit kept with probability ``q = 1 − p`` the mask is ``m = z / q`` with
``z = σ((logit q + log u − log(1 − u)) / τ)``, ``u ~ U(0, 1)`` (Maddison et al. 2017; Lorraine et al.
2020): ``P(z > ½) = q`` exactly, ``z → Bernoulli(q)`` as ``τ → 0``, and ``m`` is differentiable in
``p``. Rates ``p = σ(raw)`` stay in (0, 1); ``logit q = −raw``. The uniform noise ``u`` is drawn once
per batch (it travels with the batch), so every HVP and unrolled step of one hypergradient sees the
same function of ``(w, p)``. Evaluation uses no masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hoexp.hp.base import Params

GRANULARITIES = ("per_layer", "per_unit")


def concrete_mask(raw: Tensor, u: Tensor, temperature: float) -> Tensor:
    """``m = z / q`` for rate ``p = σ(raw)``; ``raw`` broadcasts against the uniform noise ``u``.

    A rate of exactly 0 (``raw = −∞``) gives ``m = 1`` exactly.
    """
    logistic = torch.log(u) - torch.log1p(-u)
    z = torch.sigmoid((-raw + logistic) / temperature)
    q = torch.sigmoid(-raw)
    return z / q


@dataclass(frozen=True)
class Dropout:
    sites: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # unit shape of every model site
    granularity: str = "per_unit"
    init_value: float = 0.2
    temperature: float = 0.1
    include: tuple[str, ...] = ("*",)  # which sites get dropout (shell patterns over site names)
    min_value: float = 1e-4
    max_value: float = 0.95
    name: str = "dropout"
    moves_optimum: bool = True

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown dropout granularity '{self.granularity}'; valid: {', '.join(GRANULARITIES)}")
        if not 0 < self.init_value < 1:
            raise ValueError(f"dropout init must be in (0, 1), got {self.init_value}")
        if not self.temperature > 0:
            raise ValueError(f"dropout temperature must be > 0, got {self.temperature}")

    def covered(self) -> list[str]:
        from hoexp.hp.base import select

        names = select(list(self.sites), self.include)
        if not names:
            raise ValueError(f"dropout include patterns {list(self.include)} match no dropout site; "
                             f"sites are: {', '.join(self.sites)}")
        return names

    def init(self, params: Params) -> dict[str, Tensor]:
        ref = next(iter(params.values()))
        raw0 = math.log(self.init_value) - math.log1p(-self.init_value)
        return {f"{self.name}:{s}": torch.full(() if self.granularity == "per_layer" else self.sites[s], raw0,
                                               dtype=ref.dtype, device=ref.device) for s in self.covered()}

    def _own(self, raw: Params) -> dict[str, Tensor]:
        prefix = self.name + ":"
        return {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}

    def view(self, raw: Params) -> dict[str, Tensor]:
        return {f"{self.name}:{s}": torch.sigmoid(v) for s, v in self._own(raw).items()}

    def clamp(self, raw: Params) -> dict[str, Tensor]:
        lo = math.log(self.min_value) - math.log1p(-self.min_value)
        hi = math.log(self.max_value) - math.log1p(-self.max_value)
        return {k: (v.clamp(lo, hi) if k.startswith(self.name + ":") else v) for k, v in raw.items()}

    def penalty(self, params: Params, raw: Params) -> float:
        return 0.0

    def optimizer_overrides(self, raw: Params, step: int) -> dict:
        return {}

    def noise(self, mask_shapes: Mapping[str, tuple[int, ...]], generator: torch.Generator, like: Tensor
              ) -> dict[str, Tensor]:
        """Uniform noise in (0, 1) for every covered site, shaped like its mask (``model.dropout_sites(B)``:
        ``[B, units]`` for unit dropout, the weight's shape for DropConnect). Drawn from a CPU generator
        and then moved, so runs are reproducible across devices."""
        out = {}
        for s in self.covered():
            u = torch.rand(mask_shapes[s], generator=generator, dtype=torch.float64)
            # non_blocking: no wait for the device's queue (the source is a fresh host tensor)
            out[s] = u.clamp(1e-12, 1 - 1e-12).to(like.dtype).to(like.device, non_blocking=True)
        return out

    def masks(self, raw: Params, noise: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {s: concrete_mask(r, noise[s], self.temperature) for s, r in self._own(raw).items() if s in noise}
