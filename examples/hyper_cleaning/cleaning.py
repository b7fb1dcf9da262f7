"""Data hyper-cleaning as a hoexp plugin: one weight per training example, learned by hypergradients.

The standard bilevel benchmark (Franceschi et al. 2017; benchopt's benchmark_bilevel, betty, BOAT): a
fraction of MNIST's training labels is replaced by a uniformly drawn *wrong* class; each training example
``i`` gets a weight ``σ(λ_i)`` in the training loss, and the weights are tuned so that the model trained
on the weighted loss does well on a clean validation split::

    L_T(w, λ) = mean_i σ(λ_i) · CE(f_w(x_i), y_i) + ½·l2·‖w‖²       L_V(w) = mean CE on clean validation

Nothing here is part of hoexp: the dataset, the per-example family and the weighted problem are defined in
this file and named by the YAML files under ``conf/`` (``_target_: cleaning.<factory>``). Run it with::

    PYTHONPATH=examples/hyper_cleaning hoexp run --config-dir examples/hyper_cleaning/conf \\
        experiment=hyper_cleaning

A training batch carries each example's index as a second target column (``y[:, 1]``), so the loss of a
minibatch reads the weights of exactly its examples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from hoexp.components import BuildContext, DataContext, NonNegFloat, NonNegInt, PositiveInt, Probability
from hoexp.dataset.base import Split, Splits
from hoexp.dataset.mnist import NUM_CLASSES, load_mnist
from hoexp.dataset.root import data_root as resolve_root
from hoexp.task import Classification

KEY = "example_weight"  # the family's raw hyperparameter: one logit per training example


# ------------------------------------------------------------------------------------------------- data
@dataclass
class CleaningData(Splits):
    """MNIST splits whose training targets are ``[label, index]`` pairs; ``corrupted[i]``: example i's label
    was replaced (for reporting only: nothing in training reads it)."""

    corrupted: Tensor | None = None
    l2: float = 0.0

    def problem(self, model: Any, family: Any) -> WeightedProblem:
        return WeightedProblem(
            model, family, data=self, batch_size=self.batch_size, val_batch_size=self.val_batch_size, l2=self.l2
        )

    def to(self, device: torch.device | str) -> CleaningData:
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def corrupted_mnist(
    ctx: DataContext,
    *,
    corruption: Probability = 0.5,
    train_size: PositiveInt = 2500,
    val_size: PositiveInt = 2500,
    keep: Literal["all", "clean"] = "all",
    l2: NonNegFloat = 1e-3,
    batch_size: NonNegInt = 0,
    val_batch_size: NonNegInt = 0,
    data_root: str | None = None,
    split_seed: int | None = None,
) -> CleaningData:
    """MNIST with ``corruption`` of the training labels replaced by a different class drawn uniformly (seeded).

    ``keep=clean`` drops the corrupted examples (the oracle baseline: training on the clean subset only).
    ``l2``: the fixed weight decay of the inner problem (strongly convex for a linear model)."""
    seed = ctx.seed if split_seed is None else split_seed
    base = load_mnist(resolve_root(data_root), val_size=val_size, train_size=train_size, seed=seed, dtype=ctx.dtype)
    g = torch.Generator().manual_seed(seed + 1)
    y = base.train.y.clone()
    n = len(y)
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[torch.randperm(n, generator=g)[: round(corruption * n)]] = True
    shift = torch.randint(1, NUM_CLASSES, (n,), generator=g)  # a different class: (y + 1..9) mod 10
    y[corrupted] = (y[corrupted] + shift[corrupted]) % NUM_CLASSES
    x = base.train.x
    if keep == "clean":
        x, y, corrupted = x[~corrupted], y[~corrupted], corrupted[~corrupted]
    train = Split(x, torch.stack([y, torch.arange(len(y))], dim=1))
    return CleaningData(
        train,
        base.val,
        base.test,
        base.num_features,
        base.num_classes,
        batch_size=batch_size,
        val_batch_size=val_batch_size,
        corrupted=corrupted,
        l2=l2,
    )


# ----------------------------------------------------------------------------------------------- family
@dataclass(frozen=True)
class ExampleWeights:
    """One weight ``σ(λ_i)`` per training example; ``λ`` starts at ``start`` and stays in ``[-bound, bound]``."""

    n: int
    start: float = 0.0
    bound: float = 8.0
    name: str = KEY
    moves_optimum: bool = True  # the weights change the training loss, so w* moves: IFT applies

    def init(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        like = next(iter(params.values()))
        return {KEY: torch.full((self.n,), self.start, dtype=like.dtype, device=like.device)}

    def view(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        return {KEY: torch.sigmoid(raw[KEY])}

    def clamp(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**raw, KEY: raw[KEY].clamp(-self.bound, self.bound)}

    def penalty(self, params: dict[str, Tensor], raw: dict[str, Tensor]) -> float:
        return 0.0  # the weights act in the data loss (WeightedProblem)

    def optimizer_overrides(self, raw: dict[str, Tensor], step: int) -> dict:
        return {}


def example_weights(ctx: BuildContext, *, init: float = 0.0, bound: PositiveInt = 8) -> ExampleWeights:
    """``hp=example_weights``: one logit per example of ``ctx.data``'s training split."""
    return ExampleWeights(len(ctx.data.train), init, float(bound))


# ---------------------------------------------------------------------------------------------- problem
@dataclass
class WeightedProblem(Classification):
    """``L_T = mean_i σ(λ_i)·CE_i + ½·l2·‖w‖²``; ``L_V`` and evaluation: plain mean cross-entropy."""

    l2: float = 0.0

    def train_loss(self, params: Any, raw: Any, batch: tuple) -> Tensor:
        x, y = batch[0], batch[1]
        losses = F.cross_entropy(self.logits(params, x), y[:, 0], reduction="none")
        weights = torch.sigmoid(raw[KEY][y[:, 1]])
        decay = sum((p * p).sum() for p in params.values())
        return (weights * losses).mean() + 0.5 * self.l2 * decay

    @torch.no_grad()
    def evaluate(self, params: Any, split: Any) -> tuple[Tensor, Tensor]:
        y = split.y[:, 0] if split.y.dim() == 2 else split.y
        return super().evaluate(params, Split(split.x, y))
