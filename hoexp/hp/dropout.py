"""Dropout rates as hyperparameters: relaxed masks differentiable in the rate, or standard (Bernoulli) masks.

``relaxation=concrete`` (default): for a unit kept with probability ``q = 1 − p`` the mask is
``m = z / q`` with ``z = σ((logit q + log u − log(1 − u)) / τ)``, ``u ~ U(0, 1)`` (Maddison et al. 2017;
Lorraine et al. 2020): ``P(z > ½) = q`` exactly, ``z → Bernoulli(q)`` as ``τ → 0``, and ``m`` is
differentiable in ``p``. ``relaxation=gaussian``: ``m = 1 + √(p/(1 − p))·ε``, ``ε ~ N(0, 1)``, the same mean
and variance (Srivastava et al. 2014). ``relaxation=bernoulli``: standard dropout, ``m = 1[u < 1 − p] / (1 − p)``,
exactly ``nn.Dropout``'s masks (the same seed draws the same mask), with no pathwise derivative in ``p``:
only methods that need none (``pathwise``) tune it. ``relaxation=straight_through``: the same ``nn.Dropout``
masks in the forward pass, and in the backward pass the Gaussian relaxation's derivative
``∂m/∂logit p = (m − 1)/2`` (a surrogate gradient, biased: the model trained is the standard one, the
hypergradient is that of the moment-matched Gaussian noise held at the drawn mask). Rates ``p = σ(raw)`` stay in (0, 1). The uniform
noise ``u`` is drawn once per batch (it travels with the batch), so every HVP and unrolled step of one
hypergradient sees the same function of ``(w, p)``, and a Bernoulli mask is a deterministic function of
``(u, p)`` (common random numbers across perturbed rates). Evaluation uses no masks.

Granularity: one rate for every site (``global``: what a grid over "the dropout rate" tunes), one
rate per site (``per_layer``), per unit (``per_unit``), or per unit as a shared
layer value plus scaled per-unit offsets (``layer_and_unit``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, ClassVar, Literal

import torch
from torch import Tensor

from hoexp.components import BuildContext, PositiveFloat, Range
from hoexp.hp.base import Params

GRANULARITIES = ("global", "per_layer", "per_unit", "layer_and_unit")
GLOBAL = "global"  # the one raw rate of granularity=global
OFFSETS = "/unit"  # suffix of a layer_and_unit site's per-unit offsets
RELAXATIONS = ("concrete", "gaussian", "bernoulli", "straight_through")


def concrete_mask(raw: Tensor, u: Tensor, temperature: float) -> Tensor:
    """``m = z / q`` for rate ``p = σ(raw)``; ``raw`` broadcasts against the uniform noise ``u``.

    A rate of exactly 0 (``raw = −∞``) gives ``m = 1`` exactly.
    """
    logistic = torch.log(u) - torch.log1p(-u)
    z = torch.sigmoid((-raw + logistic) / temperature)
    q = torch.sigmoid(-raw)
    return z / q


def gaussian_mask(raw: Tensor, u: Tensor) -> Tensor:
    """Gaussian dropout ``m = 1 + √α·ε``, ``α = p/(1 − p) = e^raw``, ``ε = Φ⁻¹(u) ~ N(0, 1)``.

    The multiplicative noise with the mean (1) and variance (``p/(1 − p)``) of Bernoulli dropout
    (Srivastava et al. 2014; Wang & Manning 2013). Unlike a low-temperature concrete mask, whose
    derivative in ``p`` comes from the few units whose noise sits near the threshold, every unit's
    mask moves smoothly with ``p``, so the pathwise hypergradient sees the noise's regularizing effect.
    """
    u = u.clamp(1e-6, 1 - 1e-6)  # float32 rounds 1 − 1e-12 to 1, and erfinv(1) = ∞
    eps = math.sqrt(2.0) * torch.erfinv(2 * u - 1)
    return 1 + torch.exp(raw / 2) * eps


def bernoulli_mask(raw: Tensor, u: Tensor) -> Tensor:
    """Standard dropout ``m = 1[u < 1 − p] / (1 − p)``, ``p = σ(raw)``: Bernoulli(1 − p) keeps scaled by ``1/(1 − p)``.

    On the CPU ``torch.bernoulli_(q)`` (hence ``F.dropout``) keeps an element iff a float64 uniform from the
    generator is ``< q``, and ``torch.rand(dtype=float64)`` draws the same uniforms from the same seed. So with
    float64 ``u`` (:meth:`Dropout.noise`) and ``1 − p`` taken in float64 (exact for a float32 ``p``, as
    ``F.dropout``'s double ``1 − p``), the mask equals ``nn.Dropout(p)``'s bit for bit. Cost: O(mask size).
    The mask is piecewise constant in ``p``: its derivative sees only the ``1/(1 − p)`` scale, not which
    units drop, so no method differentiates through it (``Dropout.pathwise`` is false).
    """
    p = torch.sigmoid(raw)
    keep = u < 1 - p.to(u.dtype)
    return keep.to(p.dtype) / (1 - p)


def straight_through_mask(raw: Tensor, u: Tensor) -> Tensor:
    """Standard dropout's mask ``m`` (:func:`bernoulli_mask`, bit for bit) whose derivative in ``raw = logit p`` is
    the Gaussian mask's: writing ``m = 1 + s·z`` with ``s = √(p/(1 − p)) = e^{raw/2}`` and the drawn mask's
    standardized value ``z = (m − 1)/s`` held fixed, ``∂m/∂raw = (s/2)·z = (m − 1)/2`` (what ``1 + s·ε`` gives for
    ``ε ~ N(0, 1)``). A straight-through surrogate: the forward pass is ``nn.Dropout``'s, the gradient that of the
    moment-matched Gaussian noise at the same draw (biased for the Bernoulli objective). Cost: O(mask size)."""
    hard = bernoulli_mask(raw, u).detach()
    s = torch.exp(raw / 2)
    z = (hard - 1) / s.detach()
    return hard + (s - s.detach()) * z  # forward: hard + 0·z = hard exactly


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
    grid: ClassVar[tuple[float, ...]] = (0.05, 0.2, 0.35, 0.5, 0.65)  # hoexp compare's default grid of rates
    log_scale: ClassVar[bool] = False
    relaxation: str = "concrete"  # concrete | gaussian | bernoulli | straight_through
    offset_scale: float = 0.1  # layer_and_unit: raw_j = layer + offset_scale · offset_j

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown dropout granularity '{self.granularity}'; valid: {', '.join(GRANULARITIES)}")
        if not 0 < self.init_value < 1:
            raise ValueError(f"dropout init must be in (0, 1), got {self.init_value}")
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"unknown dropout relaxation '{self.relaxation}'; valid: {', '.join(RELAXATIONS)}")
        if not self.offset_scale > 0:
            raise ValueError(f"dropout offset_scale must be > 0, got {self.offset_scale}")
        if not self.temperature > 0:
            raise ValueError(f"dropout temperature must be > 0, got {self.temperature}")

    @property
    def pathwise(self) -> bool:
        """Whether the masks are differentiable in the rates (what a method that differentiates the training
        loss in the hyperparameters needs); hard Bernoulli masks are not."""
        return self.relaxation != "bernoulli"

    def covered(self) -> list[str]:
        """The sites ``include`` selects (matched once: every masked training step asks)."""
        return list(self._covered)

    @cached_property
    def _covered(self) -> tuple[str, ...]:
        from hoexp.hp.base import select

        names = select(list(self.sites), self.include)
        if not names:
            raise ValueError(
                f"dropout include patterns {list(self.include)} match no dropout site; "
                f"sites are: {', '.join(self.sites)}"
            )
        return tuple(names)

    def init(self, params: Params) -> dict[str, Tensor]:
        ref = next(iter(params.values()))
        raw0 = math.log(self.init_value) - math.log1p(-self.init_value)
        if self.granularity == "global":
            self.covered()  # refuses include patterns that match no site
            return {f"{self.name}:{GLOBAL}": torch.full((), raw0, dtype=ref.dtype, device=ref.device)}
        out = {}
        for s in self.covered():
            shape = () if self.granularity in ("per_layer", "layer_and_unit") else self.sites[s]
            out[f"{self.name}:{s}"] = torch.full(shape, raw0, dtype=ref.dtype, device=ref.device)
            if self.granularity == "layer_and_unit":
                out[f"{self.name}:{s}{OFFSETS}"] = torch.zeros(self.sites[s], dtype=ref.dtype, device=ref.device)
        return out

    def _own(self, raw: Params) -> dict[str, Tensor]:
        """The raw rate of every site (``layer + offset_scale·offsets`` for ``layer_and_unit``, clamped
        to the rate bounds: a layer's shared value gets the summed, low-variance hypergradient of its
        units, each unit a small offset around it)."""
        prefix = self.name + ":"
        own = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
        if self.granularity == "global":
            return {s: own[GLOBAL] for s in self.covered()}
        if self.granularity != "layer_and_unit":
            return own
        lo, hi = self._bounds()
        return {
            s: (v + self.offset_scale * own[s + OFFSETS]).clamp(lo, hi)
            for s, v in own.items()
            if not s.endswith(OFFSETS)
        }

    def _bounds(self) -> tuple[float, float]:
        return (
            math.log(self.min_value) - math.log1p(-self.min_value),
            math.log(self.max_value) - math.log1p(-self.max_value),
        )

    def view(self, raw: Params) -> dict[str, Tensor]:
        return {f"{self.name}:{s}": torch.sigmoid(v) for s, v in self._own(raw).items()}

    def clamp(self, raw: Params) -> dict[str, Tensor]:
        lo, hi = self._bounds()
        span = (hi - lo) / self.offset_scale  # an offset alone can span the whole range, no more
        return {
            k: (
                v
                if not k.startswith(self.name + ":")
                else v.clamp(-span, span)
                if k.endswith(OFFSETS)
                else v.clamp(lo, hi)
            )
            for k, v in raw.items()
        }

    def penalty(self, params: Params, raw: Params) -> float:
        return 0.0

    def optimizer_overrides(self, raw: Params, step: int) -> dict:
        return {}

    def noise(
        self, mask_shapes: Mapping[str, tuple[int, ...]], generator: torch.Generator, like: Tensor
    ) -> dict[str, Tensor]:
        """Uniform noise in (0, 1) for every covered site, shaped like its mask (``model.dropout_sites(B)``:
        ``[B, units]`` for unit dropout, the weight's shape for DropConnect). Drawn from a CPU generator
        and then moved, so runs are reproducible across devices. Bernoulli noise stays float64: rounded to
        float32, ``u < 1 − p`` would differ from ``nn.Dropout``'s draw where ``u`` rounds across ``1 − p``."""
        dtype = torch.float64 if self.relaxation in ("bernoulli", "straight_through") else like.dtype
        out = {}
        for s in self.covered():
            u = torch.rand(mask_shapes[s], generator=generator, dtype=torch.float64)
            # non_blocking: no wait for the device's queue (the source is a fresh host tensor)
            out[s] = u.clamp(1e-12, 1 - 1e-12).to(dtype).to(like.device, non_blocking=True)
        return out

    def masks(self, raw: Params, noise: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.relaxation == "gaussian":
            return {s: gaussian_mask(r, noise[s]) for s, r in self._own(raw).items() if s in noise}
        if self.relaxation == "bernoulli":
            return {s: bernoulli_mask(r, noise[s]) for s, r in self._own(raw).items() if s in noise}
        if self.relaxation == "straight_through":
            return {s: straight_through_mask(r, noise[s]) for s, r in self._own(raw).items() if s in noise}
        return {s: concrete_mask(r, noise[s], self.temperature) for s, r in self._own(raw).items() if s in noise}


Rate = Annotated[float, Range(gt=0, lt=1)]


def dropout(
    ctx: BuildContext,
    *,
    granularity: Literal["global", "per_layer", "per_unit", "layer_and_unit"] = "per_unit",
    init: Rate = 0.2,
    temperature: PositiveFloat = 0.1,
    relaxation: Literal["concrete", "gaussian", "bernoulli", "straight_through"] = "concrete",
    offset_scale: PositiveFloat = 0.1,
    include: Sequence[str] = ("*",),
    min: Rate = 1e-4,
    max: Rate = 0.95,
) -> Dropout:
    """``hp=dropout``: rates ``p = σ(raw)`` in ``[min, max]`` at the model's dropout sites matching ``include``
    (``model.unit_shapes()``: site → unit shape), with relaxed masks or standard ones (module docstring)."""
    if not min <= init <= max:
        raise ValueError(f"need min <= init <= max; got min={min}, init={init}, max={max}")
    unit_shapes = getattr(ctx.model, "unit_shapes", None)
    if unit_shapes is None:
        raise ValueError(
            f"{type(ctx.model).__name__} has no dropout sites: a model tuned by hp=dropout defines "
            "unit_shapes() and forward(x, masks=...) (see hoexp.model.mlp.MLP)"
        )
    return Dropout(
        unit_shapes(),
        granularity,
        init,
        temperature,
        tuple(include),
        min,
        max,
        relaxation=relaxation,
        offset_scale=offset_scale,
    )
