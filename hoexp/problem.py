"""The bilevel problem: a model, its data losses, and a hyperparameter family's effect on training.

Losses are pure functions of explicit ``params`` / ``raw`` hyperparameter dicts
(``torch.func.functional_call``), so every hypergradient method can differentiate them freely.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hoexp.dataset.base import Split
from hoexp.hp.base import HyperFamily

Batch = tuple[Tensor, Tensor]


@dataclass
class Problem:
    """``L_T(w, λ) = CE(f_w(x_train), y_train) + penalty_λ(w)`` and ``L_V(w) = CE(f_w(x_val), y_val)``.

    The validation loss is the plain data loss: a penalty in ``L_V`` would reward larger decays for
    their own sake (one of the bugs of the reference write-up's code).
    """

    model: nn.Module
    family: HyperFamily

    def logits(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, dict(params), (x,))

    def data_loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(params, x), y)

    def train_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: Batch) -> Tensor:
        return self.data_loss(params, batch) + self.family.penalty(params, raw)

    def val_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: Batch) -> Tensor:
        return self.data_loss(params, batch)

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, Tensor], split: Split) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy and accuracy on a whole split (0-d tensors; no host sync)."""
        logits = self.logits(params, split.x)
        loss = F.cross_entropy(logits, split.y)
        acc = (logits.argmax(-1) == split.y).to(logits.dtype).mean()
        return loss, acc


class FullBatch:
    """The whole split as every batch (the full-batch setting of the Iris experiment)."""

    def __init__(self, split: Split):
        self.batch = (split.x, split.y)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.batch
