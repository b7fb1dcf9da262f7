"""Classification (Iris, MNIST): ``L_T = CE(f_w(x), y) + penalty_λ(w)``, ``L_V = CE(f_w(x_val), y_val)``.

Losses are pure functions of explicit ``params`` / ``raw`` dicts (``torch.func.functional_call``). A
batch is a :class:`~hoexp.types.Batch`; dropout noise travels with it (drawn by
:class:`~hoexp.task.streams.WithNoise`), so the training loss of a batch is deterministic in
``(params, raw)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hoexp.hp.base import HyperFamily
from hoexp.task.base import BatchStream, DropoutModel, like_for_noise
from hoexp.task.streams import WithNoise, noise_generator, training_stream, validation_stream
from hoexp.types import noise_of


@dataclass
class Classification:
    """``L_T(w, λ) = CE(f_w(x_train), y_train) + penalty_λ(w)`` and ``L_V(w) = CE(f_w(x_val), y_val)``.

    The validation loss is the plain data loss: a penalty in ``L_V`` would reward larger decays for
    their own sake (one of the bugs of the reference write-up's code). ``data`` (optional for a task
    used only through its losses) gives the streams (``batch_size`` / ``val_batch_size`` 0: full
    batches) and the evaluation splits.
    """

    model: nn.Module
    family: HyperFamily
    data: Any = field(default=None, repr=False)  # Splits (LMData for LanguageModel)
    batch_size: int = 0
    val_batch_size: int = 0
    batch_dim = 0  # the examples' dimension of a batch's inputs and targets (data-parallel shards split it)

    # ------------------------------------------------------------------------------ losses
    def batch_size_of(self, x: Tensor) -> int:
        """Examples in a batch's input (the dimension dropout masks are drawn over)."""
        return x.shape[0]

    def logits(self, params: Mapping[str, Tensor], x: Tensor, masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """``f_w(x)``: the model's ``functional_forward(params, x, masks)`` where it has one (a pure function, the
        same numbers), else ``functional_call``."""
        pure = getattr(self.model, "functional_forward", None)
        if pure is not None:
            return pure(params, x, masks)
        if masks:
            return functional_call(self.model, dict(params), (x,), {"masks": masks})
        return functional_call(self.model, dict(params), (x,))

    def output_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The data loss of the model's outputs (mean cross-entropy: convex in the logits)."""
        return F.cross_entropy(logits, targets)

    def data_loss(
        self, params: Mapping[str, Tensor], batch: tuple, masks: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        return self.output_loss(self.logits(params, batch[0], masks), batch[1])

    def masks(self, raw: Mapping[str, Tensor], batch: tuple) -> dict[str, Tensor] | None:
        """The family's dropout masks for this batch's noise (None without noise or dropout)."""
        noise = noise_of(batch)
        if noise is None or not hasattr(self.family, "masks"):
            return None
        return self.family.masks(raw, noise)

    def train_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: tuple) -> Tensor:
        return self.data_loss(params, batch, self.masks(raw, batch)) + self.family.penalty(params, raw)

    def train_parts(self, batch: tuple) -> tuple[Callable, Callable, Callable]:
        """``train_loss(·, ·, batch)`` split as ``(outputs(w, raw), output_loss(z), penalty(w, raw))``:
        ``L_T = output_loss(outputs(w, raw)) + penalty(w, raw)`` (a Gauss-Newton curvature needs the
        outputs; ``hoexp.method.curvature.SplitLoss``)."""

        def outputs(w: Mapping[str, Tensor], raw: Mapping[str, Tensor]) -> Tensor:
            return self.logits(w, batch[0], self.masks(raw, batch))

        return outputs, lambda z: self.output_loss(z, batch[1]), self.family.penalty

    def val_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: tuple) -> Tensor:
        return self.data_loss(params, batch)  # L_V reads no hyperparameter

    # ------------------------------------------------------------------------------ data
    def draws_noise(self) -> bool:
        """Whether training batches carry dropout noise (the family has masks)."""
        return hasattr(self.family, "masks")

    def noise(self, x: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Fresh dropout noise for a batch with inputs ``x`` (the model's sites, the family's distribution)."""
        shapes = cast(DropoutModel, self.model).dropout_sites(self.batch_size_of(x))
        return cast(Any, self.family).noise(shapes, generator, like_for_noise(self.model, x))

    def with_noise(self, stream: BatchStream, seed: int) -> BatchStream:
        return WithNoise(stream, self.noise, noise_generator(seed)) if self.draws_noise() else stream

    def train_stream(self, seed: int) -> BatchStream:
        """Full batches or seeded minibatches of the training split, with fresh dropout noise when the
        family has dropout."""
        return self.with_noise(training_stream(self._data.train, seed, self.batch_size), seed)

    def val_stream(self, seed: int, outer_objective: str = "val") -> BatchStream:
        """The outer objective's batches: the validation split (or the training split with
        ``outer_objective="train"``), whole or in seeded minibatches."""
        split = self._data.train if outer_objective == "train" else self._data.val
        return validation_stream(split, seed, self.val_batch_size)

    @property
    def _data(self) -> Any:  # hoexp.task.splits.Splits
        if self.data is None:
            raise ValueError("this task has no data: construct it with data=...")
        return self.data

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, params: Mapping[str, Tensor], split: Any) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy and accuracy on a whole split (0-d tensors; no host sync)."""
        logits = self.logits(params, split.x)
        loss = F.cross_entropy(logits, split.y)
        acc = (logits.argmax(-1) == split.y).to(logits.dtype).mean()
        return loss, acc

    def eval_splits(self) -> tuple[Any, Any, Any]:
        """The splits training, validation and test metrics are measured on."""
        return self._data.train, self._data.val, self._data.test

    def evaluate_all(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{train,val,test}_{loss,acc}`` as 0-d tensors (no host sync)."""
        out: dict[str, Tensor] = {}
        for name, split in zip(("train", "val", "test"), self.eval_splits()):
            out[f"{name}_loss"], out[f"{name}_acc"] = self.evaluate(params, split)
        return out

    def derived_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Metrics computed from the host values of :meth:`evaluate_all` (none for classification)."""
        return {}
