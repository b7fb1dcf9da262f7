"""Checkpointable batch streams: the whole split, seeded minibatches, BPTT windows, and dropout noise; and
what they draw from: a :class:`Split` in memory, or a token stream batchified sequence first (the layout of
PyTorch's word_language_model example: :func:`batchify`, :func:`bptt_batch`, :func:`bptt_windows`).

Each stream is endless and its position is its whole state (``state_dict`` / ``load_state_dict``), so
a resumed run draws exactly the batches the uninterrupted run would have. Streams yield
:class:`~hoexp.types.Batch` values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hoexp.errors import HoexpError
from hoexp.task.base import BatchStream
from hoexp.types import Batch

NoiseFn = Callable[[Tensor, torch.Generator], Mapping[str, Tensor]]  # (inputs, generator) → noise per site


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


def batchify(stream: Tensor, batch_size: int) -> Tensor:
    """``[N, batch_size]`` (sequence first) with column ``j`` = ``stream[j*N:(j+1)*N]``,
    ``N = len(stream) // batch_size``; the trailing ``len % batch_size`` tokens are dropped. One copy.
    """
    if batch_size < 1 or stream.dim() != 1 or len(stream) < batch_size:
        raise HoexpError(
            f"cannot batch a stream of {len(stream):,} tokens into {batch_size} columns; "
            "batch_size must be at least 1 and at most the number of tokens"
        )
    n = len(stream) // batch_size
    return stream[: n * batch_size].view(batch_size, n).t().contiguous()


def bptt_batch(source: Tensor, i: int, bptt: int) -> tuple[Tensor, Tensor]:
    """The window starting at row ``i``: ``(input [T, B], target [T, B])`` with target = input shifted
    one token ahead, ``T = min(bptt, len(source) - 1 - i)``. Views of ``source``, no copy."""
    if bptt < 1 or not 0 <= i < len(source) - 1:
        raise ValueError(f"bptt_batch needs bptt >= 1 and 0 <= i < {len(source) - 1}, got bptt={bptt}, i={i}")
    t = min(bptt, len(source) - 1 - i)
    return source[i : i + t], source[i + 1 : i + 1 + t]


def bptt_windows(source: Tensor, bptt: int) -> Iterator[tuple[Tensor, Tensor]]:
    """All consecutive ``bptt_batch`` windows of a batchified ``source`` (rows 0, bptt, 2·bptt, ...);
    together their targets cover rows 1 .. len-1 once."""
    for i in range(0, len(source) - 1, bptt):
        yield bptt_batch(source, i, bptt)


class FullBatch:
    """The whole split as every batch (the full-batch setting of the Iris experiment)."""

    def __init__(self, split: Split):
        self.batch = Batch(split.x, split.y)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Minibatches:
    """An endless stream of minibatches of ``split``: a fresh seeded permutation every epoch.

    The generator is the stream's whole state, so a stream (and a resumed run) is reproducible.
    """

    def __init__(self, split: Split, batch_size: int, generator: torch.Generator):
        self.split, self.batch_size, self.generator = split, batch_size, generator
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.pos + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.split), generator=self.generator)
            self.pos = 0
        # non_blocking: a blocking host→device copy would wait for every queued kernel (a sync per step)
        idx = self.order[self.pos : self.pos + self.batch_size].to(self.split.x.device, non_blocking=True)
        self.pos += self.batch_size
        return Batch(self.split.x[idx], self.split.y[idx])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos = state["order"].clone(), int(state["pos"])


class WithNoise:
    """``batches`` with fresh dropout noise on every batch: ``noise(x, generator)`` from a seeded CPU generator.

    The stream knows nothing of models or families: the task hands it the function that draws.
    """

    def __init__(self, batches: BatchStream, noise: NoiseFn, generator: torch.Generator):
        self.batches, self.noise, self.generator = batches, noise, generator

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        x, y = next(self.batches)[:2]
        return Batch(x, y, self.noise(x, self.generator))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches.load_state_dict(state["batches"])


class BPTTStream:
    """Consecutive BPTT windows of ``source`` [N, B], wrapping around at the end (an epoch).

    With a generator, windows start at seeded random offsets instead (validation windows for
    hypergradients). The position is the stream's whole state.
    """

    def __init__(self, source: Tensor, bptt: int, generator: torch.Generator | None = None):
        self.source, self.bptt, self.generator = source, bptt, generator
        self.pos = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        n = self.source.shape[0] - 1
        if self.generator is not None:
            i = int(torch.randint(0, max(n - self.bptt, 1), (1,), generator=self.generator))
        else:
            if self.pos >= n - 1:
                self.pos = 0
            i = self.pos
            self.pos += self.bptt
        return Batch(*bptt_batch(self.source, i, self.bptt))

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])


# Seed offsets of a run's streams (kept from the first version: changing them changes every result).
TRAIN_ORDER_SEED, NOISE_SEED, VAL_SEED = 7919, 1_000_003, 104_729


def training_stream(split: Split, seed: int, batch_size: int = 0) -> BatchStream:
    """Full batches (``batch_size`` 0 or at least the split) or seeded minibatches."""
    if batch_size and batch_size < len(split):
        return Minibatches(split, batch_size, torch.Generator().manual_seed(seed + TRAIN_ORDER_SEED))
    return FullBatch(split)


def validation_stream(split: Split, seed: int, batch_size: int = 0) -> BatchStream:
    """The whole split or seeded minibatches of it (a generator of its own)."""
    if 0 < batch_size < len(split):
        return Minibatches(split, batch_size, torch.Generator().manual_seed(seed + VAL_SEED))
    return FullBatch(split)


def noise_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + NOISE_SEED)
