"""The task and batch-stream protocols, and the model protocol dropout families rely on.

A task is what the engine and the hypergradient methods know of the problem: losses that are pure
functions of explicit ``params`` / ``raw`` hyperparameter dicts (``torch.func.functional_call``),
so every method can differentiate them freely, and the streams its batches come from. The engine
never asks which kind of task it runs: the task answers (its streams, its evaluation splits, its
extra metrics).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from torch import Tensor, nn

from hoexp.hp.base import HyperFamily


class BatchStream(Iterator[tuple], Protocol):
    """An endless batch iterator whose position is checkpointed (``state_dict`` / ``load_state_dict``)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class DropoutModel(Protocol):
    """What a model must offer for a dropout family (``hp=dropout``); written down here, checked nowhere.

    * ``forward(x, masks=None)``: ``masks`` maps a site name to a multiplicative mask broadcastable to
      that site's activations (``None``: no dropout, the evaluation forward);
    * ``unit_shapes()``: site name → the per-unit shape of its keep-probabilities (the family's
      hyperparameters, one per unit);
    * ``dropout_sites(B)``: site name → the shape of the noise drawn for a batch of ``B`` examples.
    """

    def forward(self, x: Tensor, masks: Mapping[str, Tensor] | None = None) -> Any: ...

    def unit_shapes(self) -> dict[str, tuple[int, ...]]: ...

    def dropout_sites(self, batch_size: int) -> dict[str, tuple[int, ...]]: ...


class Task(Protocol):
    """``L_T(w, λ; batch)``, ``L_V(w; batch)`` and their data (see :class:`~hoexp.task.Classification`)."""

    model: nn.Module
    family: HyperFamily
    batch_dim: int

    def train_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: tuple) -> Tensor: ...

    def val_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: tuple) -> Tensor: ...

    def train_parts(self, batch: tuple) -> tuple[Any, Any, Any]: ...

    def train_stream(self, seed: int) -> BatchStream: ...

    def val_stream(self, seed: int, outer_objective: str = "val") -> BatchStream: ...

    def evaluate_all(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def derived_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]: ...


def like_for_noise(model: nn.Module, x: Tensor) -> Tensor:
    """The tensor whose dtype and device dropout noise takes: the inputs, or the weights for token ids."""
    return x if x.is_floating_point() else next(model.parameters())
