"""Weight decay as hyperparameters: one global decay, one per layer, or one per weight (free, or a
shared layer value plus scaled per-weight offsets: ``layer_and_weight``).

Training loss gains ``½ Σ_i λ_i w_i²`` (so ``∂/∂w = λ w``, the same convention as an optimizer's
``weight_decay``). Decays are kept positive by ``λ = exp(r)``; the outer optimizer updates ``r``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from hoexp.components import PositiveFloat
from hoexp.hp.base import Params, select
from hoexp.hp.decay_penalty import decay_penalty

GRANULARITIES = ("global", "per_layer", "per_weight", "layer_and_weight")
OFFSETS = "/weight"  # suffix of a layer_and_weight parameter's per-weight offsets


@dataclass(frozen=True)
class WeightDecay:
    granularity: str = "per_weight"
    init_value: float = 1e-3
    include: tuple[str, ...] = ("*weight",)  # which parameters are decayed (biases are not, by default)
    min_value: float = 1e-12  # bounds on λ, enforced by clamp() after each outer step
    max_value: float = 10.0
    name: str = "weight_decay"
    moves_optimum: bool = True
    # hoexp compare: the default grid of the global value, searched on a log scale
    grid: ClassVar[tuple[float, ...]] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    log_scale: ClassVar[bool] = True
    offset_scale: float = 0.1  # layer_and_weight: raw_i = layer + offset_scale · offset_i

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown weight-decay granularity '{self.granularity}'; valid: {', '.join(GRANULARITIES)}"
            )
        if not self.init_value > 0:
            raise ValueError(f"weight-decay init must be > 0 (it is parameterized as exp(raw)), got {self.init_value}")
        if not self.offset_scale > 0:
            raise ValueError(f"weight-decay offset_scale must be > 0, got {self.offset_scale}")

    def covered(self, params: Params) -> list[str]:
        names = select(list(params), self.include)
        if not names:
            raise ValueError(
                f"weight-decay include patterns {list(self.include)} match no parameter; "
                f"parameters are: {', '.join(params)}"
            )
        return names

    def init(self, params: Params) -> dict[str, Tensor]:
        names = self.covered(params)
        ref = params[names[0]]
        raw0 = math.log(self.init_value)
        if self.granularity == "global":
            return {self.name: torch.full((), raw0, dtype=ref.dtype, device=ref.device)}
        if self.granularity == "per_layer":
            return {f"{self.name}:{n}": torch.full((), raw0, dtype=ref.dtype, device=ref.device) for n in names}
        if self.granularity == "layer_and_weight":
            out = {}
            for n in names:
                out[f"{self.name}:{n}"] = torch.full((), raw0, dtype=ref.dtype, device=ref.device)
                out[f"{self.name}:{n}{OFFSETS}"] = torch.zeros_like(params[n])
            return out
        return {f"{self.name}:{n}": torch.full_like(params[n], raw0) for n in names}

    def _mine(self, k: str) -> bool:
        return k == self.name or k.startswith(self.name + ":")

    def clamp(self, raw: Params) -> dict[str, Tensor]:
        """Raw values with ``λ = exp(raw)`` kept inside ``[min_value, max_value]`` (other families' untouched);
        an offset alone may span the whole range, no more."""
        lo, hi = math.log(self.min_value), math.log(self.max_value)
        span = (hi - lo) / self.offset_scale
        return {
            k: (v if not self._mine(k) else v.clamp(-span, span) if k.endswith(OFFSETS) else v.clamp(lo, hi))
            for k, v in raw.items()
        }

    def view(self, raw: Params) -> dict[str, Tensor]:
        if self.granularity == "global":
            return {self.name: torch.exp(raw[self.name])}
        return {f"{self.name}:{n}": lam for n, lam in self._decays(raw).items()}

    def _decays(self, raw: Params) -> dict[str, Tensor]:
        """``exp(raw)`` per covered parameter; ``layer_and_weight``: ``exp(clamp(layer + offset_scale·offset))``
        (a layer's value gets the summed, low-variance hypergradient of its weights)."""
        prefix = self.name + ":"
        own = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
        if self.granularity != "layer_and_weight":
            return {n: torch.exp(v) for n, v in own.items()}
        lo, hi = math.log(self.min_value), math.log(self.max_value)
        return {
            n: torch.exp((v + self.offset_scale * own[n + OFFSETS]).clamp(lo, hi))
            for n, v in own.items()
            if not n.endswith(OFFSETS)
        }

    def optimizer_overrides(self, raw: Params, step: int) -> dict:
        return {}  # weight decay acts through the loss, not the optimizer

    def penalty(self, params: Params, raw: Params) -> Tensor:
        # decay_penalty takes the raw values and keeps no tensor of its own for any derivative (an unrolled
        # step of the MNIST preset kept 6.7 new weight-sized tensors with autograd's ½ Σ λ w², 1.75 with it)
        offsets = self.granularity == "layer_and_weight"
        lo, hi = (math.log(self.min_value), math.log(self.max_value)) if offsets else (-math.inf, math.inf)
        terms = []
        for n in self.covered(params):
            key = self.name if self.granularity == "global" else f"{self.name}:{n}"
            o = raw[key + OFFSETS] if offsets else None
            terms.append(decay_penalty(params[n], raw[key], o, self.offset_scale, lo, hi))
        return torch.stack(terms).sum()


def weight_decay(
    *,
    granularity: Literal["global", "per_layer", "per_weight", "layer_and_weight"] = "per_weight",
    init: PositiveFloat = 1e-3,
    include: Sequence[str] = ("*weight",),
    min: PositiveFloat = 1e-12,
    max: PositiveFloat = 10.0,
    offset_scale: PositiveFloat = 0.1,
) -> WeightDecay:
    """``hp=weight_decay``: ``L_T += ½ Σ λ_i w_i²`` over the parameters matching ``include``, ``λ = exp(raw)``
    clamped into ``[min, max]``; ``layer_and_weight``: weight i's raw decay is ``layer + offset_scale·offset_i``."""
    if not min <= init <= max:
        raise ValueError(f"init must lie in [min, max]; got min={min}, init={init}, max={max}")
    if not include:
        raise ValueError("include is empty: give parameter-name patterns, e.g. ['*weight']")
    return WeightDecay(granularity, init, tuple(include), min_value=min, max_value=max, offset_scale=offset_scale)
