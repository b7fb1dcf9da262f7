"""MNIST (LeCun et al. 1998) through ``torchvision.datasets.MNIST``, held in memory as tensors.

Files: ``<root>/mnist/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (torchvision's layout;
``.gz`` copies are extracted in place). The validation split is carved, stratified by class and
seeded, out of the training file; the test split is the whole ``t10k`` file.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from hoexp.components import DataContext, NonNegInt, PositiveInt
from hoexp.dataset.base import Split, Splits
from hoexp.dataset.iris import stratified_split
from hoexp.errors import HoexpError

MEAN, STD = 0.1307, 0.3081  # the usual MNIST pixel statistics (of the full 60k training set)
SIDE = 28
NUM_CLASSES = 10
# file name -> (IDX magic number, header bytes, bytes per item)
FILES = {
    "train-images-idx3-ubyte": (2051, 16, SIDE * SIDE),
    "train-labels-idx1-ubyte": (2049, 8, 1),
    "t10k-images-idx3-ubyte": (2051, 16, SIDE * SIDE),
    "t10k-labels-idx1-ubyte": (2049, 8, 1),
}
_FIX_CORRUPT = "delete it and load again with dataset.download=true, or copy an intact one there"


def _raw_folder(folder: Path) -> Path:
    return folder / "MNIST" / "raw"


def _extract_gz(raw: Path) -> None:
    """Decompress ``X.gz`` to ``X`` (atomically) for every file that exists only gzipped."""
    for name in FILES:
        dst, src = raw / name, raw / (name + ".gz")
        if dst.exists() or not src.exists():
            continue
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{name}.", suffix=".part")
        try:
            with gzip.open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp, dst)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            Path(tmp).unlink(missing_ok=True)
            raise HoexpError(
                f"MNIST file {src} could not be extracted ({type(e).__name__}: {e}); {_FIX_CORRUPT}"
            ) from None


def _check_files(folder: Path) -> None:
    """Raise a one-line ``HoexpError`` unless all four IDX files exist with consistent headers and
    sizes. Reads 16 bytes per file."""
    raw = _raw_folder(folder)
    missing = [n for n in FILES if not (raw / n).is_file()]
    if missing:
        what = f"missing: {', '.join(missing)}" if folder.is_dir() else "the folder does not exist"
        raise HoexpError(
            f"MNIST not found under {folder} ({what}; expected MNIST/raw/train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte[.gz] there); set "
            "HOEXP_DATA or dataset.data_root to a folder that has mnist/ in it, or dataset.download=true "
            "to fetch it"
        )
    counts = {}
    for name, (magic, header, item) in FILES.items():
        path = raw / name
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(header)
        if len(head) < header:
            raise HoexpError(
                f"MNIST file {path} is corrupt: {size} bytes, shorter than its {header}-byte IDX header; {_FIX_CORRUPT}"
            )
        fields = struct.unpack(f">{header // 4}I", head)
        if fields[0] != magic or (item > 1 and fields[2:] != (SIDE, SIDE)):
            raise HoexpError(
                f"MNIST file {path} is corrupt: not an MNIST IDX "
                f"{'image' if item > 1 else 'label'} file (bad header); {_FIX_CORRUPT}"
            )
        expected = header + fields[1] * item
        if size != expected:
            raise HoexpError(
                f"MNIST file {path} is corrupt or truncated: {size:,} bytes, but its header "
                f"promises {fields[1]:,} items ({expected:,} bytes); {_FIX_CORRUPT}"
            )
        counts[name] = fields[1]
    for split in ("train", "t10k"):
        ni, nl = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
        if ni != nl:
            raise HoexpError(
                f"MNIST files in {raw} do not match: {split}-images-idx3-ubyte has {ni:,} "
                f"images but {split}-labels-idx1-ubyte has {nl:,} labels; {_FIX_CORRUPT}"
            )


def _download(folder: Path) -> None:
    """Fetch whatever is missing with torchvision's downloader (md5-checked .gz files)."""
    from torchvision.datasets import MNIST

    if all((_raw_folder(folder) / n).is_file() for n in FILES):
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        MNIST(root=str(folder), train=True, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError with multi-line text
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        detail = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
        raise HoexpError(
            f"MNIST download into {_raw_folder(folder)} failed ({detail}); check the "
            "network, or place the four MNIST IDX files there and use dataset.download=false"
        ) from None


def _read(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root=str(folder), train=train, download=False)
    except Exception as e:  # e.g. a file changed between the check and the read
        detail = (str(e).strip().splitlines() or [""])[0]
        raise HoexpError(
            f"MNIST files in {_raw_folder(folder)} could not be read ({type(e).__name__}: {detail}); {_FIX_CORRUPT}"
        ) from None
    if len(ds.targets) and int(ds.targets.max()) >= NUM_CLASSES:
        raise HoexpError(f"MNIST labels in {_raw_folder(folder)} are corrupt (a label above 9); {_FIX_CORRUPT}")
    return ds.data, ds.targets


def read_mnist(root: Path, train: bool = True, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images ``[n, 28, 28]`` and labels of MNIST's training (or test) file under ``<root>/mnist``, the
    files checked first: missing or corrupt ones are a one-line ``HoexpError``. ``download`` fetches what is missing."""
    folder = Path(root) / "mnist"
    if download:
        _download(folder)
    if _raw_folder(folder).is_dir():
        _extract_gz(_raw_folder(folder))
    _check_files(folder)
    return _read(folder, train=train)


def load_mnist(
    root: Path,
    *,
    val_size: int = 1000,
    train_size: int | None = None,
    seed: int = 0,
    download: bool = False,
    normalize: bool = True,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Splits:
    """MNIST from ``<root>/mnist`` as in-memory train / validation / test splits.

    ``val_size`` images, stratified by class with ``seed``, are carved out of the training file;
    ``train_size`` (None: all the rest) takes a seeded, stratified subset of the remainder; the test
    split is the whole test file. Pixels are scaled to [0, 1] and, with ``normalize``, standardized
    with the usual constants (0.1307, 0.3081) rather than per-split statistics; ``flatten`` gives
    ``x`` of shape [n, 784], otherwise [n, 1, 28, 28]. ``download`` fetches missing files with
    torchvision (the full 60,000/10,000 images, ~12 MB gzipped). Cost: reads the four files
    (~55 MB for full MNIST) and holds the float images in memory (~220 MB at float32 for 70k).
    Errors (missing or corrupt files, sizes too large) are one-line ``HoexpError``s.
    """
    folder = Path(root) / "mnist"
    x_tr, y_tr = read_mnist(root, train=True, download=download)
    x_te, y_te = read_mnist(root, train=False)

    n = len(y_tr)
    if val_size < 1 or (train_size is not None and train_size < 1):
        raise HoexpError(
            f"MNIST val_size={val_size} and train_size={train_size} must be at least 1 "
            "(train_size may be null for all the remaining training images)"
        )
    if val_size + (train_size or 1) > n:
        raise HoexpError(
            f"MNIST under {folder} has {n:,} training images, too few for val_size={val_size:,} "
            f"plus train_size={train_size if train_size is not None else 'the rest (at least 1)'}; "
            "lower dataset.val_size / dataset.train_size, or use the full MNIST (dataset.download=true "
            "with an empty data root)"
        )
    g = torch.Generator().manual_seed(seed)
    (val_idx,) = stratified_split(y_tr, (val_size,), g)
    rest = torch.ones(n, dtype=torch.bool)
    rest[val_idx] = False
    rest_idx = torch.nonzero(rest).flatten()
    if train_size is None:
        train_idx = rest_idx[torch.randperm(len(rest_idx), generator=g)]
    else:
        (sub,) = stratified_split(y_tr[rest_idx], (train_size,), g)
        train_idx = rest_idx[sub]

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype if dtype.is_floating_point else torch.float32).div_(255.0)
        if normalize:
            x = x.sub_(MEAN).div_(STD)
        x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
        return x.to(dtype)

    train = Split(prep(x_tr[train_idx]), y_tr[train_idx].clone())
    val = Split(prep(x_tr[val_idx]), y_tr[val_idx].clone())
    test = Split(prep(x_te), y_te.clone())
    return Splits(train, val, test, num_features=SIDE * SIDE, num_classes=NUM_CLASSES)


def mnist(
    ctx: DataContext,
    *,
    data_root: str | None = None,
    download: bool = False,
    val_size: PositiveInt = 1000,
    train_size: PositiveInt | None = None,
    split_seed: NonNegInt | None = None,
    batch_size: NonNegInt = 128,
    val_batch_size: NonNegInt = 0,
) -> Splits:
    """``dataset=mnist``: :func:`load_mnist` from ``<data_root>/mnist`` (``data_root``: ``$HOEXP_DATA``, else
    ``~/.local/share/hoexp/data``), seeded by the run unless ``split_seed``; ``batch_size`` 0 = full batch."""
    from hoexp.dataset.root import data_root as resolve_root

    splits = load_mnist(
        resolve_root(data_root),
        val_size=val_size,
        train_size=train_size,
        seed=ctx.seed if split_seed is None else split_seed,
        download=download,
        dtype=ctx.dtype,
    )
    return replace(splits, batch_size=batch_size, val_batch_size=val_batch_size)
