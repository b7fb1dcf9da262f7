"""Classification with one weight per training example (``hp=example_weights``: data hyper-cleaning).

``L_T(w, λ) = mean_i a_i(λ) · CE(f_w(x_i), y_i) + penalty(w, λ)`` with ``a_i = family.example_weights(λ, idx_i)``
read from each row's index (the indexed training split's second target column); ``L_V`` and evaluation are the
plain mean cross-entropy on labels. :meth:`hp_metrics` reports how well the weights find known-noisy labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from hoexp.task.classification import Classification
from hoexp.task.streams import Split


class WeighsExamples(Protocol):
    """A family with ``weighs_examples`` (``hoexp.hp.example_weights``): the weights of a batch's example indices."""

    def example_weights(self, raw: Mapping[str, Tensor], index: Tensor) -> Tensor: ...

    def loss_mask(self, losses: Tensor) -> Tensor: ...


@dataclass
class ExampleWeighted(Classification):
    """:class:`Classification` whose training loss weighs each example by the family's ``example_weights``."""

    def train_parts(self, batch: tuple) -> tuple[Callable, Callable, Callable]:
        """``L_T = output_loss(outputs(w, λ)) + penalty``, the weights riding as one more output column:
        ``outputs = [logits | a(λ)]`` and ``output_loss(z) = mean(z[:, -1] · m · CE(z[:, :-1], y))``, ``m`` the
        family's ``loss_mask`` of the detached losses (1 unless it drops the highest-loss examples). The column does
        not depend on ``w``, so a Gauss-Newton product ``Jᵀ H_ℓ J`` sees the weighted cross-entropy's curvature
        in the logits (PSD for weights > 0), and the mixed term ``∂²L_T/∂λ∂w`` stays exact."""
        x, y = batch[0], batch[1]
        if y.dim() != 2:
            raise ValueError("per-example weights need an indexed training split (Splits.indexed())")
        labels, index = y[:, 0], y[:, 1]

        def outputs(w: Mapping[str, Tensor], raw: Mapping[str, Tensor]) -> Tensor:
            logits = self.logits(w, x, self.masks(raw, batch))
            return torch.cat([logits, family.example_weights(raw, index).to(logits.dtype)[:, None]], dim=1)

        family = cast(WeighsExamples, self.family)

        def output_loss(z: Tensor) -> Tensor:
            ce = F.cross_entropy(z[:, :-1], labels, reduction="none")
            return (z[:, -1] * family.loss_mask(ce.detach()) * ce).mean()

        return outputs, output_loss, self.family.penalty

    def train_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: tuple) -> Tensor:
        """``train_parts``' loss without its weights column (the same numbers in fewer operations: no concatenation
        and slices to differentiate through, twice over in a second-order method's passes)."""
        x, y = batch[0], batch[1]
        if y.dim() != 2:
            raise ValueError("per-example weights need an indexed training split (Splits.indexed())")
        family = cast(WeighsExamples, self.family)
        logits = self.logits(params, x, self.masks(raw, batch))
        ce = F.cross_entropy(logits, y[:, 0], reduction="none")
        weights = family.example_weights(raw, y[:, 1]).to(logits.dtype)
        return (weights * family.loss_mask(ce.detach()) * ce).mean() + self.family.penalty(params, raw)

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, Tensor], split: Any) -> tuple[Tensor, Tensor]:
        """Unweighted mean cross-entropy and accuracy on the split's labels (the training split's as given,
        corrupted ones included)."""
        return super().evaluate(params, Split(split.x, split.labels))

    def derived_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """``test_error = 1 − test_acc`` (the figure hyper-cleaning benchmarks report)."""
        return {**super().derived_metrics(metrics), "test_error": 1.0 - metrics["test_acc"]}

    @torch.no_grad()
    def hp_metrics(self, raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """With a dataset that knows its noisy labels (``data.noisy``: bool per example index), the precision,
        recall and F1 of flagging an example as noisy when its weight is below ½ (``flagged_{precision,recall,
        f1}``, 0-d tensors); none otherwise. Cost: one pass over the ``n`` weights."""
        noisy = getattr(self.data, "noisy", None)
        if noisy is None:
            return {}
        n = len(noisy)
        weights = cast(WeighsExamples, self.family).example_weights(raw, torch.arange(n, device=noisy.device))
        flagged, noisy = weights < 0.5, noisy.to(weights.device)
        tp = (flagged & noisy).sum().to(weights.dtype)
        precision = tp / flagged.sum().clamp_min(1).to(weights.dtype)
        recall = tp / noisy.sum().clamp_min(1).to(weights.dtype)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        return {"flagged_precision": precision, "flagged_recall": recall, "flagged_f1": f1}
