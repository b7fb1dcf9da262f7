"""Per-example weights on the training loss (data hyper-cleaning, Franceschi et al. 2017; Shaban et al. 2019).

One raw value ``λ_i`` per training example (or per index: a dataset's index column may let rows share one),
weight ``σ(λ_i)`` in the training loss, which the task computes from each example's index::

    L_T(w, λ) = mean_i σ(λ_{idx(i)}) · CE(f_w(x_i), y_i) + ½·l2·Σ_{w ∈ include} ‖w‖²

A searchable proxy of the ``n`` weights (``drop``, for ``method=none`` and ``hoexp compare --space``): the
``⌊drop·b⌋`` examples of each batch of ``b`` with the largest training loss under the current model weigh 0 (the
small-loss trick: noisy labels fit last), ``a_i = σ(λ_i)·1[CE_i below the batch's top drop-fraction]``, the mean
still over all ``b``. The mask is a constant of ``w`` and ``λ`` (its derivative is 0 almost everywhere), so a
tuned method differentiates the kept examples' weights only.

``l2`` is a fixed, untuned ridge (benchopt's bilevel benchmark writes it ``reg·‖w‖²``: ``l2 = 2·reg``); with a
linear model it makes the inner problem strongly convex, so implicit differentiation holds at every ``λ``.
A task weighs its examples when its family says ``weighs_examples`` (:class:`hoexp.task.weighted.ExampleWeighted`);
the dataset supplies the index (:meth:`hoexp.dataset.base.Splits.indexed`).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from hoexp.components import BuildContext, NonNegFloat, PositiveFloat, Range
from hoexp.hp.base import Params, select

KEY = "example_weight"  # the family's raw hyperparameter: one logit per training example (or index)


@dataclass(frozen=True)
class ExampleWeights:
    """One weight ``σ(λ_i)`` per example index ``i < n``; ``λ`` starts at ``init``, stays in ``[-bound, bound]``."""

    n: int
    init_value: float = 0.0
    bound: float = 8.0
    l2: float = 0.0
    include: tuple[str, ...] = ("*weight",)
    drop: float = 0.0  # the fraction of each batch's highest-loss examples weighed 0 (the searchable proxy)
    name: str = "example_weights"
    moves_optimum: bool = True  # the weights change the training loss, so w* moves: IFT applies
    weighs_examples: bool = True  # capability: the task reads example_weights(raw, index) per example

    def init(self, params: Params) -> dict[str, Tensor]:
        if self.l2:
            self._covered(params)  # fail before training when the ridge's patterns match nothing
        like = next(iter(params.values()))
        return {KEY: torch.full((self.n,), float(self.init_value), dtype=like.dtype, device=like.device)}

    def example_weights(self, raw: Params, index: Tensor) -> Tensor:
        """``σ(λ[index])``: the weights of a batch's examples, from their indices (a gather: O(batch))."""
        return torch.sigmoid(raw[KEY][index])

    def loss_mask(self, losses: Tensor) -> Tensor:
        """``1`` per example, ``0`` for the ``⌊drop·b⌋`` largest of a batch's ``b`` losses (ties: the lower index
        kept first, as ``topk`` picks); the losses are detached. Cost: one ``topk``, O(b log b)."""
        k = int(self.drop * len(losses))
        keep = torch.ones_like(losses)
        if k == 0:
            return keep
        return keep.index_fill(0, losses.detach().topk(k).indices, 0.0)

    def view(self, raw: Params) -> dict[str, Tensor]:
        return {KEY: torch.sigmoid(raw[KEY])}

    def clamp(self, raw: Params) -> dict[str, Tensor]:
        return {**raw, KEY: raw[KEY].clamp(-self.bound, self.bound)}

    def _covered(self, params: Params) -> list[str]:
        names = select(list(params), self.include)
        if not names:
            raise ValueError(
                f"example_weights include patterns {list(self.include)} match no parameter for the l2 ridge; "
                f"parameters are: {', '.join(params)}"
            )
        return names

    def penalty(self, params: Params, raw: Params) -> Tensor | float:
        """``½·l2·Σ‖w‖²`` over the ``include`` parameters (a constant of λ: the weights act in the data loss)."""
        if not self.l2:
            return 0.0
        terms = [(params[n] * params[n]).sum() for n in self._covered(params)]  # _covered: never empty
        return 0.5 * self.l2 * functools.reduce(operator.add, terms)  # no 0-d zero to start from: one op fewer

    def optimizer_overrides(self, raw: Params, step: int) -> dict:
        return {}


def example_weights(
    ctx: BuildContext,
    *,
    init: Annotated[float, Range(ge=-50, le=50)] = 0.0,  # a logit: σ(±50) is 0 or 1 in float32 already
    bound: PositiveFloat = 8.0,
    l2: NonNegFloat = 0.0,
    include: Sequence[str] = ("*weight",),
    drop: Annotated[float, Range(ge=0, lt=1)] = 0.0,
) -> ExampleWeights:
    """``hp=example_weights``: one weight per example index of the data's training split (``ctx.data``:
    a dataset with ``num_indices``, as every :class:`~hoexp.dataset.base.Splits` has)."""
    n = getattr(ctx.data, "num_indices", None)
    if n is None:
        raise ValueError(
            "hp=example_weights weighs the examples of a classification dataset (iris, mnist, mnist_cleaning, "
            f"arrays); {type(ctx.data).__name__} has no training examples to weigh"
        )
    return ExampleWeights(int(n), float(init), float(bound), float(l2), tuple(include), float(drop))
