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
  calls.
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


def smoothed_gradient(
    f: Callable[[Tensor], float], x: Tensor, sigma: float, pairs: int, generator: torch.Generator
) -> SmoothedGradient:
    """``∇_x E_ε f(x + σε)`` from ``pairs`` antithetic pairs (module docstring; ``2·pairs`` calls of ``f``),
    directions ``ε ~ N(0, I)`` drawn in float64 from ``generator``."""
    flat = x.reshape(-1)
    per_pair = torch.empty(pairs, flat.numel(), dtype=torch.float64)
    for j in range(pairs):
        e = torch.randn(flat.shape, generator=generator, dtype=torch.float64)
        step = (sigma * e).to(flat.dtype).reshape(x.shape)
        per_pair[j] = e * (f(x + step) - f(x - step)) / (2 * sigma)
    return SmoothedGradient(per_pair.mean(0), per_pair.std(0) / math.sqrt(pairs))


def resolved_sign(hg: Tensor, truth: Tensor, stderr: Tensor, z: float = 2.0) -> tuple[float, int]:
    """Sign agreement over the coordinates whose truth is resolved (``|g*_i| > z·SE_i``: its sign known at
    ~95% for ``z = 2``) and their count (agreement NaN when none is)."""
    sure = truth.abs() > z * stderr
    n = int(sure.sum())
    if n == 0:
        return math.nan, 0
    return float((torch.sign(hg[sure]) == torch.sign(truth[sure])).double().mean()), n
