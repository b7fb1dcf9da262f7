"""Dataset containers shared by every loader."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hoexp.task import Classification


@dataclass
class Split:
    """One split held in memory: inputs ``x`` and integer targets ``y``: labels ``[n]``, or ``[label, index]``
    rows ``[n, 2]`` (an indexed split, :meth:`indexed`: minibatches carry each example's index along, so a
    per-example family such as ``hp=example_weights`` reads the weights of exactly the batch's examples)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> Tensor:
        """The class labels ``[n]`` (the first column of an indexed split's targets)."""
        return self.y[:, 0] if self.y.dim() == 2 else self.y

    def indexed(self) -> Split:
        """This split with targets ``[label, index]``; the index is the row number unless it has one already."""
        if self.y.dim() == 2:
            return self
        return Split(self.x, torch.stack([self.y, torch.arange(len(self.y), device=self.y.device)], dim=1))

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Splits:
    """Train / validation / test splits plus what a model needs to know about the data."""

    train: Split
    val: Split
    test: Split
    num_features: int
    num_classes: int
    task: str = "classification"
    batch_size: int = 0  # inner-step minibatch; 0 = full batch
    val_batch_size: int = 0  # hypergradient validation minibatch; 0 = the whole validation split

    def to(self, device: torch.device | str) -> Splits:
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))

    @property
    def num_indices(self) -> int:
        """How many example indices the training split has: its rows, or 1 + the largest of its index column."""
        y = self.train.y
        return int(y[:, 1].max()) + 1 if y.dim() == 2 and len(y) else len(y)

    def indexed(self) -> Splits:
        """These splits with an indexed training split (:meth:`Split.indexed`; validation and test keep labels)."""
        return replace(self, train=self.train.indexed())

    def problem(self, model: Any, family: Any) -> Classification:
        """The classification task on these splits: cross-entropy of ``model`` plus ``family``'s penalty; with a
        family that ``weighs_examples``, each example's loss weighted (on the indexed training split)."""
        from hoexp.task import Classification

        if getattr(family, "weighs_examples", False):
            from hoexp.task.weighted import ExampleWeighted

            return ExampleWeighted(
                model, family, data=self.indexed(), batch_size=self.batch_size, val_batch_size=self.val_batch_size
            )
        plain = replace(self, train=Split(self.train.x, self.train.labels))  # a given index column unused
        return Classification(model, family, data=plain, batch_size=self.batch_size, val_batch_size=self.val_batch_size)


@dataclass
class TextSplits:
    """Train / validation / test token streams (1-D int64 ids into ``vocab``) for language modelling."""

    train: Tensor
    val: Tensor
    test: Tensor
    vocab: list[str]
    vocab_size: int
    task: str = "language_model"

    def to(self, device: torch.device | str) -> TextSplits:
        return TextSplits(
            self.train.to(device), self.val.to(device), self.test.to(device), self.vocab, self.vocab_size, self.task
        )
