"""Data hyper-cleaning on MNIST as benchopt's bilevel benchmark defines it (``benchopt/benchmark_bilevel``,
``datasets/mnist.py``), on whatever MNIST the data root holds.

With ``rng = numpy.random.RandomState(seed)``, exactly the benchmark's steps:

1. ``train_test_split(X, y, test_size=val_size, train_size=train_size, random_state=rng)``: one permutation
   ``p = rng.permutation(n)``; validation ``p[:val_size]``, training ``p[val_size:val_size + train_size]``;
2. ``corrupted = rng.rand(train_size) < ratio``; ``y_train[corrupted] = rng.randint(0, 10, corrupted.sum())``:
   each training label is redrawn with probability ``ratio``, uniformly over all ten classes (so about a tenth
   of the redrawn labels come out right);
3. ``StandardScaler`` fit on the training images (per-pixel mean and population std; a constant pixel keeps
   scale 1), applied to all three splits. The test split is the whole ``t10k`` file.

On the shared 5,000-image MNIST the benchmark's 20,000 / 5,000 split becomes 3,500 / 1,500 (the defaults here).
``noisy`` marks the examples whose label differs from the true one after step 2 (for reporting only:
the F1 of flagging them, :meth:`hoexp.task.weighted.ExampleWeighted.hp_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from hoexp.components import DataContext, NonNegInt, PositiveInt, Probability
from hoexp.dataset.base import Split, Splits
from hoexp.dataset.mnist import NUM_CLASSES, SIDE, read_mnist
from hoexp.dataset.root import data_root as resolve_root
from hoexp.errors import HoexpError


@dataclass
class NoisySplits(Splits):
    """Splits whose training examples' label noise is known: ``noisy[i]`` (bool, per example index)."""

    noisy: Tensor | None = None

    def to(self, device: torch.device | str) -> NoisySplits:
        noisy = None if self.noisy is None else self.noisy.to(device)
        return replace(
            self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device), noisy=noisy
        )


def corrupt_labels(y: np.ndarray, ratio: float, rng: np.random.RandomState, num_classes: int) -> np.ndarray:
    """The benchmark's rule: each label redrawn with probability ``ratio``, uniformly over all ``num_classes``
    (two draws from ``rng``: ``rand(n)`` then ``randint(0, num_classes, k)``). Returns a new array."""
    y = y.copy()
    corrupted = rng.rand(len(y)) < ratio
    y[corrupted] = rng.randint(0, num_classes, int(corrupted.sum()))
    return y


def standard_scale(train: Tensor, *others: Tensor) -> list[Tensor]:
    """scikit-learn's ``StandardScaler``: ``(x − mean) / std`` with the training split's per-feature mean and
    population std (float64; a feature with std below 10·eps keeps scale 1), applied to every split."""
    t = train.double()
    mean, std = t.mean(0), t.std(0, unbiased=False)
    std = torch.where(std < 10 * torch.finfo(torch.float64).eps, torch.ones_like(std), std)
    return [(x.double() - mean) / std for x in (train, *others)]


def mnist_cleaning(
    ctx: DataContext,
    *,
    ratio: Probability = 0.7,
    train_size: PositiveInt = 3500,
    val_size: PositiveInt = 1500,
    data_root: str | None = None,
    download: bool = False,
    split_seed: NonNegInt | None = None,
    batch_size: NonNegInt = 0,
    val_batch_size: NonNegInt = 0,
) -> NoisySplits:
    """``dataset=mnist_cleaning``: the benchmark's corrupted MNIST (module docstring), seeded by ``split_seed``
    (None: the run's seed; the benchmark's data seed is 32). ``batch_size`` 0: full batch."""
    root = resolve_root(data_root)
    x_tr, y_tr = read_mnist(root, train=True, download=download)
    x_te, y_te = read_mnist(root, train=False)
    n = len(y_tr)
    if train_size + val_size > n:
        raise HoexpError(
            f"MNIST under {root / 'mnist'} has {n:,} training images, too few for train_size={train_size:,} plus "
            f"val_size={val_size:,}; lower dataset.train_size / dataset.val_size"
        )
    rng = np.random.RandomState(ctx.seed if split_seed is None else split_seed)
    perm = torch.from_numpy(rng.permutation(n))
    val_idx, train_idx = perm[:val_size], perm[val_size : val_size + train_size]
    clean = y_tr[train_idx].numpy()
    labels = torch.from_numpy(corrupt_labels(clean, ratio, rng, NUM_CLASSES)).long()
    flat = [x.reshape(len(x), SIDE * SIDE) for x in (x_tr[train_idx], x_tr[val_idx], x_te)]
    xs = [x.to(ctx.dtype) for x in standard_scale(*flat)]
    return NoisySplits(
        Split(xs[0], labels),
        Split(xs[1], y_tr[val_idx].clone()),
        Split(xs[2], y_te.clone()),
        num_features=SIDE * SIDE,
        num_classes=NUM_CLASSES,
        batch_size=batch_size,
        val_batch_size=val_batch_size,
        noisy=labels != torch.from_numpy(clean).long(),
    )
