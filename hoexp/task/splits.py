"""The in-memory splits of a classification dataset and the task they pose (:meth:`Splits.problem`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from hoexp.task.classification import Classification
from hoexp.task.streams import Split
from hoexp.task.weighted import ExampleWeighted

__all__ = ["Split", "Splits"]


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
        if getattr(family, "weighs_examples", False):
            return ExampleWeighted(
                model, family, data=self.indexed(), batch_size=self.batch_size, val_batch_size=self.val_batch_size
            )
        plain = replace(self, train=Split(self.train.x, self.train.labels))  # a given index column unused
        return Classification(model, family, data=plain, batch_size=self.batch_size, val_batch_size=self.val_batch_size)
