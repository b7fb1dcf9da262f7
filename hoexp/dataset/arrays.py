"""``dataset=arrays dataset.path=<file.npz>``: a user's own classification data, given as arrays.

The ``.npz`` file (``numpy.savez(path, X_train=..., y_train=..., ...)``) holds, for each split ``s`` in
``train``, ``val``, ``test``:

* ``X_s``: features, ``[n_s, d]`` (any real dtype; cast to the run's dtype), the same ``d`` in every split;
* ``y_s``: integer class labels ``0..C-1``, ``[n_s]`` (``C``: the largest label in any split, plus one);

and, optionally, for per-example families (``hp=example_weights``):

* ``index_train``: integers ``[n_train]`` in ``0..K-1``, the example index of each training row (rows that
  share an index share one weight: e.g. augmented copies of one image); without it, each row is its own index;
* ``noisy_train``: booleans ``[K]``, the examples whose label is known to be wrong (reporting only: the F1 of
  flagging them by weight < ½ is logged as ``f1/flagged``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hoexp.components import DataContext, NonNegInt
from hoexp.dataset.base import Split
from hoexp.dataset.cleaning import NoisySplits, standard_scale
from hoexp.errors import HoexpError

SPLITS = ("train", "val", "test")
REQUIRED = tuple(f"{a}_{s}" for s in SPLITS for a in ("X", "y"))
SAVE = "numpy.savez(path, X_train=..., y_train=..., X_val=..., y_val=..., X_test=..., y_test=...)"


def _load(path: str) -> dict[str, np.ndarray]:
    file = Path(path).expanduser()
    if not path or not file.is_file():
        raise HoexpError(f"dataset.path={path!r} is not a file; give an .npz written by {SAVE}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise HoexpError(f"dataset.path={path} could not be read as .npz ({e}); write it with {SAVE}") from None


def _check(arrays: dict[str, np.ndarray], path: str) -> None:
    """One-line errors naming the fix: missing keys, wrong ranks, row or feature counts that disagree, bad labels."""
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise HoexpError(
            f"{path} lacks {', '.join(missing)} (it has {', '.join(sorted(arrays)) or 'nothing'}); write it with {SAVE}"
        )
    d = arrays["X_train"].shape[1:] if arrays["X_train"].ndim == 2 else None
    for s in SPLITS:
        x, y = arrays[f"X_{s}"], arrays[f"y_{s}"]
        if x.ndim != 2 or x.shape[1:] != d:
            raise HoexpError(
                f"{path}: X_{s} has shape {x.shape}; every X_* must be [rows, features] with the same number of "
                "features (flatten images with X.reshape(len(X), -1))"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise HoexpError(
                f"{path}: y_{s} has shape {y.shape} but X_{s} has {len(x)} rows; y_{s} must hold one integer label "
                f"per row of X_{s}"
            )
        if len(y) and (y.dtype.kind not in "iu" or y.min() < 0):
            raise HoexpError(
                f"{path}: y_{s} must hold class labels 0, 1, ... as integers (got dtype {y.dtype}, min {y.min()}); "
                "map classes to integers first (e.g. numpy.unique(y, return_inverse=True)[1])"
            )
    _check_index(arrays, path)


def _check_index(arrays: dict[str, np.ndarray], path: str) -> None:
    n = len(arrays["y_train"])
    index = arrays.get("index_train")
    if index is not None and (index.shape != (n,) or index.dtype.kind not in "iu" or (n and index.min() < 0)):
        raise HoexpError(
            f"{path}: index_train has shape {index.shape} and dtype {index.dtype}; it must hold one integer >= 0 per "
            f"training row ({n}), or be left out (each row its own index)"
        )
    k = (int(index.max()) + 1 if n else 0) if index is not None else n
    noisy = arrays.get("noisy_train")
    if noisy is not None and (noisy.shape != (k,) or noisy.dtype != np.bool_):
        raise HoexpError(
            f"{path}: noisy_train has shape {noisy.shape} and dtype {noisy.dtype}; it must hold one boolean per "
            f"example index ({k}), or be left out"
        )


def arrays(
    ctx: DataContext,
    *,
    path: str = "",
    standardize: bool = False,
    batch_size: NonNegInt = 0,
    val_batch_size: NonNegInt = 0,
) -> NoisySplits:
    """``dataset=arrays``: the splits of ``path`` (module docstring), features cast to the run's dtype and, with
    ``standardize``, scaled by the training split's per-feature mean and std (scikit-learn's
    StandardScaler). ``batch_size`` / ``val_batch_size`` 0: full batches. Cost: the whole file in memory."""
    data = _load(path)
    _check(data, path)
    xs = [torch.from_numpy(np.ascontiguousarray(data[f"X_{s}"])) for s in SPLITS]
    if standardize:
        xs = standard_scale(*xs)
    ys = [torch.from_numpy(data[f"y_{s}"].astype(np.int64)) for s in SPLITS]
    train = Split(xs[0].to(ctx.dtype), ys[0])
    if "index_train" in data:
        train = Split(train.x, torch.stack([ys[0], torch.from_numpy(data["index_train"].astype(np.int64))], dim=1))
    noisy = torch.from_numpy(data["noisy_train"]) if "noisy_train" in data else None
    return NoisySplits(
        train,
        Split(xs[1].to(ctx.dtype), ys[1]),
        Split(xs[2].to(ctx.dtype), ys[2]),
        num_features=int(xs[0].shape[1]),
        num_classes=max(int(y.max()) + 1 for y in ys if len(y)),
        batch_size=batch_size,
        val_batch_size=val_batch_size,
        noisy=noisy,
    )
