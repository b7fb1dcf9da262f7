"""Dataset containers shared by every loader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Split:
    """One split held in memory: inputs ``x`` and integer targets ``y``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
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

    def to(self, device: torch.device | str) -> "Splits":
        return Splits(self.train.to(device), self.val.to(device), self.test.to(device),
                      self.num_features, self.num_classes, self.task)
