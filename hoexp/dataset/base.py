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
    """One split held in memory: inputs ``x`` and integer targets ``y``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

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

    def problem(self, model: Any, family: Any) -> Classification:
        """The classification task on these splits: cross-entropy of ``model`` plus ``family``'s penalty."""
        from hoexp.task import Classification

        return Classification(model, family, data=self, batch_size=self.batch_size, val_batch_size=self.val_batch_size)


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
