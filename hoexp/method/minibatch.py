"""Minibatches a method draws itself from a finite sum, and the SAGA memory over them.

The single-loop stochastic bilevel methods (:mod:`hoexp.method.single_loop`, :mod:`hoexp.method.amigo`) see
the training and validation losses as finite sums ``L = Σ_j ω_j L_j`` over fixed chunks ``j`` of the split
(``ω_j = |chunk_j|/n``; the penalty is in every ``L_j`` and ``Σ_j ω_j = 1``, so it is counted once), as
benchopt's ``benchmark_bilevel`` does: the engine hands the whole split (``dataset.batch_size=0``) and the
method cuts it into contiguous chunks of ``batch_size`` examples, visited in a fresh seeded order every
epoch (sampling without replacement over chunks). SAGA (Defazio et al. 2014) keeps the last value of each
chunk's quantity and returns ``d = g_j − m_j + m̄`` (``m̄ = Σ_j ω_j m_j``): once every ``m_j`` is current,
``d`` is the full sum's value, so a constant step converges where plain SGD keeps its noise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hoexp.errors import HoexpError
from hoexp.types import Batch, noise_of

# Seed offsets of the methods' own samplers from the run's seed (hoexp.task.streams' are 7919, 1_000_003, 104_729).
TRAIN_CHUNK_SEED, VAL_CHUNK_SEED = 3_000_017, 4_000_037


class Chunks:
    """Chunk ``j`` of a pool of ``n`` examples is ``[j·size, min((j+1)·size, n))``; ``draw`` returns the next chunk
    of a seeded permutation of the ``⌈n/size⌉`` chunks (a new permutation every epoch). Its position and
    generator are its state (``state_dict``); the pool size is fixed by the first draw."""

    def __init__(self, size: int, seed: int):
        self.size, self.generator = size, torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.sequence: list[int] = []  # the order as Python ints (read without a tensor index per draw)
        self.pos, self.n = 0, 0

    def count(self, n: int) -> int:
        return -(-n // self.size)

    def draw(self, n: int) -> tuple[int, int, int, float]:
        """``(j, start, stop, ω_j)`` of the next chunk of a pool of ``n`` examples."""
        if self.n and n != self.n:
            raise HoexpError(
                f"method.batch_size={self.size} cuts a fixed pool into chunks, but the pool changed from {self.n} to "
                f"{n} examples: set dataset.batch_size=0 (the method draws its own minibatches of the whole split)"
            )
        self.n = n
        if self.pos >= len(self.order):
            self.order, self.pos = torch.randperm(self.count(n), generator=self.generator), 0
            self.sequence = self.order.tolist()
        j = self.sequence[self.pos]
        self.pos += 1
        start, stop = j * self.size, min((j + 1) * self.size, n)
        return j, start, stop, (stop - start) / n

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.generator.get_state(), "order": self.order.clone(), "pos": self.pos, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"].cpu())
        self.order, self.pos, self.n = state["order"].cpu().clone(), int(state["pos"]), int(state["n"])
        self.sequence = self.order.tolist()


def pool_size(batch: tuple, batch_dim: int = 0) -> int:
    return int(batch[0].shape[batch_dim])


def chunk(batch: tuple, start: int, stop: int, batch_dim: int = 0) -> tuple:
    """Examples ``start:stop`` of ``batch`` (inputs and targets along ``batch_dim``); the batch itself when that
    is all of it. A batch with dropout noise is refused: its noise has no example axis to cut in general."""
    n = pool_size(batch, batch_dim)
    if start == 0 and stop == n:
        return batch
    if noise_of(batch) is not None:
        raise HoexpError(
            "method.batch_size > 0 cuts the batch into minibatches, which cannot cut its dropout noise: set "
            "method.batch_size=0 and method.val_batch_size=0, and dataset.batch_size for minibatches"
        )
    x, y = batch[0].narrow(batch_dim, start, stop - start), batch[1].narrow(batch_dim, start, stop - start)
    return Batch(x, y)


class SagaTable:
    """SAGA memory over chunks: ``m_j`` (the last value seen for chunk ``j``, zero before: benchopt's
    ``mode_init_memory=zero``) and ``m̄ = Σ_j ω_j m_j``. :meth:`direction` is benchopt's ``variance_reduction``.
    Tensors are replaced, never changed in place (the runner keeps references to the state). Memory: one flat
    vector per chunk."""

    def __init__(self) -> None:
        self.memory: dict[int, Tensor] = {}
        self.mean: Tensor | None = None

    def direction(self, j: int, weight: float, g: Tensor) -> Tensor:
        """``d = g − m_j + m̄``, then ``m̄ ← m̄ + ω_j (g − m_j)`` and ``m_j ← g``. O(size of g)."""
        old = self.memory.get(j)
        diff = g if old is None else g - old
        mean = torch.zeros_like(g) if self.mean is None else self.mean
        d = diff + mean
        self.mean = mean + weight * diff
        self.memory[j] = g  # the dict is copied by state_dict; its tensors are never changed
        return d

    def state_dict(self) -> dict[str, Any]:
        return {} if self.mean is None else {"memory": dict(self.memory), "mean": self.mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = {int(j): m for j, m in state.get("memory", {}).items()}
        self.mean = state.get("mean")
