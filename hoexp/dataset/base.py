"""Dataset containers shared by every loader: the raw token streams of a text corpus, and (defined with the
task that reads them, named here for loaders and your own datasets) the in-memory splits of a classification
data set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hoexp.task.splits import Splits
from hoexp.task.streams import Split

__all__ = ["Split", "Splits", "TextSplits"]


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
