"""The horizon diagnostic's truths: derivatives of a scalar function of the flat hyperparameters ``x``
(there: the final validation loss of the remaining run, with common random numbers).

* :func:`central_differences`: ``∂f/∂x_i ≈ (f(x + ε e_i) − f(x − ε e_i)) / 2ε`` (``2·dim`` calls): the
  derivative of one draw of the run's noise, which with hard (Bernoulli) dropout masks is piecewise
  constant in ``x`` and jumps where a unit's noise crosses its threshold: noisy, discontinuous.
* :func:`smoothed_gradient`: the gradient of the Gaussian-smoothed objective ``f_σ(x) = E_ε f(x + σε)``,
  ``ε ~ N(0, I)`` (what ES methods estimate; Stein's lemma ``∇f_σ(x) = E[ε f(x + σε)] / σ``), from ``M``
  antithetic pairs::

      ĝ = 1/M Σ_j ĝ_j,   ĝ_j = ε_j (f(x + σε_j) − f(x − σε_j)) / 2σ,

  unbiased for ``∇f_σ`` whatever ``f`` (discontinuous included), with the standard error of the mean per
  coordinate ``sd_j(ĝ_j) / √M``. For a quadratic ``f`` the smoothed gradient is the exact one. Cost: ``2M``
  calls. With a ``baseline`` slope ``d`` (a linear control variate: the diagnostic passes its central
  differences), ``ĝ_j = d + ε_j ((f(x + σε_j) − f(x − σε_j)) / 2σ − ε_jᵀd)``: still unbiased for any fixed
  ``d`` (``E[ε εᵀ] = I``), and where ``f`` is close to linear with slope ``d`` the cross terms
  ``ε_i ε_k g_k`` that dominate the plain estimate's variance cancel (a slope far from the smoothed
  gradient adds variance instead: the diagnostic keeps whichever of the two has the smaller error).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hoexp.errors import ConfigError

SMOOTH_SEED = 4_000_037  # the smoothed truth's directions: apart from the run's batches, noise and methods' draws


def central_differences(f: Callable[[Tensor], float], x: Tensor, eps: float) -> Tensor:
    """``(f(x + ε e_i) − f(x − ε e_i)) / 2ε`` for every coordinate of the flat vector ``x`` (2·dim calls)."""
    out = torch.zeros(x.numel(), dtype=torch.float64)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[i] = eps
        out[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return out


@dataclass(frozen=True)
class Smoothing:
    """The smoothed truth's options: ``sigma`` (perturbation scale on the raw hyperparameters), ``pairs``
    (antithetic pairs ``M``: ``2M`` remaining runs per checkpoint), ``seed`` of the directions."""

    sigma: float
    pairs: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError(f"--smooth must be a finite perturbation scale > 0 (raw units), got {self.sigma}")
        if self.pairs < 2:
            raise ConfigError(f"--smooth-pairs must be >= 2 (its standard error needs two), got {self.pairs}")


@dataclass(frozen=True)
class SmoothedGradient:
    """``∇f_σ`` estimated: the mean ``grad`` of the pairs' estimates and its standard error ``stderr``."""

    grad: Tensor
    stderr: Tensor


def antithetic_differences(
    f: Callable[[Tensor], float], x: Tensor, sigma: float, pairs: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The directions ``ε_j ~ N(0, I)`` (``[pairs, dim]``, float64 from ``generator``) and the differences
    ``(f(x + σε_j) − f(x − σε_j)) / 2σ`` (``[pairs]``). Cost: ``2·pairs`` calls of ``f``."""
    flat = x.reshape(-1)
    directions = torch.randn((pairs, flat.numel()), generator=generator, dtype=torch.float64)
    diffs = torch.empty(pairs, dtype=torch.float64)
    for j, e in enumerate(directions):
        step = (sigma * e).to(flat.dtype).reshape(x.shape)
        diffs[j] = (f(x + step) - f(x - step)) / (2 * sigma)
    return directions, diffs


def smoothed_estimate(directions: Tensor, diffs: Tensor, baseline: Tensor | None = None) -> SmoothedGradient:
    """``ĝ = mean_j ĝ_j`` and its standard error from :func:`antithetic_differences` (module docstring),
    ``ĝ_j = d + ε_j (Δ_j − ε_jᵀd)`` with the control variate's slope ``d = baseline`` (0 without)."""
    d = torch.zeros(directions.shape[1], dtype=torch.float64) if baseline is None else baseline.reshape(-1).double()
    per_pair = d + directions * (diffs - directions @ d).unsqueeze(1)
    return SmoothedGradient(per_pair.mean(0), per_pair.std(0) / math.sqrt(directions.shape[0]))


def smoothed_gradient(
    f: Callable[[Tensor], float],
    x: Tensor,
    sigma: float,
    pairs: int,
    generator: torch.Generator,
    baseline: Tensor | None = None,
) -> SmoothedGradient:
    """``∇_x E_ε f(x + σε)`` from ``pairs`` antithetic pairs (module docstring; ``2·pairs`` calls of ``f``);
    ``baseline``: the control variate's slope."""
    return smoothed_estimate(*antithetic_differences(f, x, sigma, pairs, generator), baseline)


def resolved_sign(hg: Tensor, truth: Tensor, stderr: Tensor, z: float = 2.0) -> tuple[float, int]:
    """Sign agreement over the coordinates whose truth is resolved (``|g*_i| > z·SE_i``: its sign known at
    ~95% for ``z = 2``) and their count (agreement NaN when none is)."""
    sure = truth.abs() > z * stderr
    n = int(sure.sum())
    if n == 0:
        return math.nan, 0
    return float((torch.sign(hg[sure]) == torch.sign(truth[sure])).double().mean()), n
