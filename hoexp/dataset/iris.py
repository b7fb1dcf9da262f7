"""Iris (Fisher 1936; UCI), embedded in the package: 150 flowers, 4 features, 3 classes.

The default 60 / 60 / 30 split is the reference HO experiment's (seed document 002).
"""

from __future__ import annotations

import csv
from dataclasses import replace
from importlib import resources

import torch

from hoexp.components import DataContext, NonNegInt, PositiveInt
from hoexp.dataset.base import Split, Splits

CLASSES = ("setosa", "versicolor", "virginica")


def read_iris() -> tuple[torch.Tensor, torch.Tensor]:
    """All 150 rows as ``(x float64 [150, 4], y int64 [150])``, in the file's order."""
    text = resources.files("hoexp.dataset").joinpath("iris.csv").read_text()
    rows = list(csv.reader(text.splitlines()))[1:]
    x = torch.tensor([[float(v) for v in r[:4]] for r in rows], dtype=torch.float64)
    y = torch.tensor([int(r[4]) for r in rows], dtype=torch.int64)
    return x, y


def _allocate(total: int, class_sizes: list[int]) -> list[int]:
    """Split ``total`` over classes in proportion to their sizes (largest remainder)."""
    n = sum(class_sizes)
    exact = [total * s / n for s in class_sizes]
    counts = [int(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_split(y: torch.Tensor, sizes: tuple[int, ...], generator: torch.Generator) -> list[torch.Tensor]:
    """Indices of disjoint splits of the given sizes, each with the class proportions of ``y``.

    Every class is shuffled with ``generator``; the splits take consecutive slices of it.
    """
    classes = torch.unique(y).tolist()
    members = [torch.nonzero(y == c).flatten() for c in classes]
    members = [m[torch.randperm(len(m), generator=generator)] for m in members]
    per_split = [_allocate(s, [len(m) for m in members]) for s in sizes]
    out: list[list[torch.Tensor]] = [[] for _ in sizes]
    for ci, m in enumerate(members):
        start = 0
        for si, counts in enumerate(per_split):
            out[si].append(m[start : start + counts[ci]])
            start += counts[ci]
    splits = []
    for parts in out:
        idx = torch.cat(parts)
        splits.append(idx[torch.randperm(len(idx), generator=generator)])
    return splits


def load_iris(
    train_size: int = 60,
    val_size: int = 60,
    test_size: int = 30,
    seed: int = 0,
    standardize: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Splits:
    """Stratified, seeded train / validation / test split of Iris; features standardized with
    the training split's mean and standard deviation (no statistics leak from val/test)."""
    x, y = read_iris()
    sizes = (train_size, val_size, test_size)
    if min(sizes) < 1 or sum(sizes) > len(y):
        raise ValueError(
            f"Iris has {len(y)} examples; train_size + val_size + test_size = {sum(sizes)} "
            "must be at most that, each at least 1"
        )
    g = torch.Generator().manual_seed(seed)
    idx = stratified_split(y, sizes, g)
    if standardize:
        mean = x[idx[0]].mean(0)
        std = x[idx[0]].std(0).clamp_min(1e-12)
        x = (x - mean) / std
    x = x.to(dtype)
    train, val, test = (Split(x[i], y[i]) for i in idx)
    return Splits(train, val, test, num_features=4, num_classes=len(CLASSES))


def iris(
    ctx: DataContext,
    *,
    train_size: PositiveInt = 60,
    val_size: PositiveInt = 60,
    test_size: PositiveInt = 30,
    split_seed: NonNegInt | None = None,
    standardize: bool = True,
    batch_size: NonNegInt = 0,
    val_batch_size: NonNegInt = 0,
) -> Splits:
    """``dataset=iris``: :func:`load_iris` with the run's seed (unless ``split_seed``) and dtype;
    ``batch_size`` / ``val_batch_size`` 0 = full batch (the reference experiment)."""
    total = train_size + val_size + test_size
    if total > 150:
        raise ValueError(f"train_size + val_size + test_size = {total}, but Iris has 150 examples")
    splits = load_iris(
        train_size,
        val_size,
        test_size,
        seed=ctx.seed if split_seed is None else split_seed,
        standardize=standardize,
        dtype=ctx.dtype,
    )
    return replace(splits, batch_size=batch_size, val_batch_size=val_batch_size)
