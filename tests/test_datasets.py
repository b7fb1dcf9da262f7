"""Data root, MNIST and PTB loaders on the small real copies under $HOEXP_DATA (see conftest)."""

import gzip
import hashlib
import io
import os
import shutil
from pathlib import Path

import pytest
import torch

from hoexp.dataset import ptb as ptb_mod
from hoexp.dataset.base import TextSplits
from hoexp.dataset.mnist import load_mnist
from hoexp.dataset.ptb import EOS, OFFICIAL, UNK, URL, download_ptb, load_ptb
from hoexp.dataset.root import data_root
from hoexp.errors import HoexpError
from hoexp.task.streams import batchify, bptt_batch, bptt_windows

SHARED = data_root()  # $HOEXP_DATA: the shared copy (conftest sets it)
MNIST_RAW = SHARED / "mnist" / "MNIST" / "raw"
PTB_DIR = SHARED / "ptb"


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------- data root


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOEXP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert data_root("~/d") == tmp_path / "home" / "d"
    assert data_root(None) == tmp_path / "env"
    assert data_root("") == tmp_path / "env"  # an empty value counts as unset
    monkeypatch.delenv("HOEXP_DATA")
    assert data_root() == tmp_path / "xdg" / "hoexp" / "data"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert data_root() == tmp_path / "home" / ".local" / "share" / "hoexp" / "data"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOEXP_DATA", "rel/data")
    assert data_root() == tmp_path / "rel" / "data" and data_root().is_absolute()


# ---------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist():
    return load_mnist(SHARED)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


def test_mnist_shapes_and_sizes(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (4000, 1000, 10000)
    assert mnist.train.x.shape == (4000, 784) and mnist.test.x.shape == (10000, 784)
    assert mnist.train.x.dtype == torch.float32 and mnist.train.y.dtype == torch.int64
    assert (mnist.num_features, mnist.num_classes, mnist.task) == (784, 10, "classification")
    assert set(mnist.test.y.tolist()) == set(range(10))


def test_mnist_train_val_disjoint_and_cover_the_file(mnist):
    tr, va = _rows(mnist.train.x), _rows(mnist.val.x)
    assert len(tr) == 4000 and len(va) == 1000 and not tr & va


def test_mnist_val_is_class_balanced(mnist):
    # the shared training file has 500 images per class, so a stratified 1,000 has 100 each
    assert mnist.val.y.bincount(minlength=10).tolist() == [100] * 10
    assert mnist.train.y.bincount(minlength=10).tolist() == [400] * 10


def test_mnist_normalization(mnist):
    x = mnist.train.x
    assert abs(float(x.mean())) < 0.05 and 0.9 < float(x.std()) < 1.1
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    raw = load_mnist(SHARED, normalize=False, flatten=False, dtype=torch.float64)
    assert raw.train.x.shape == (4000, 1, 28, 28) and raw.train.x.dtype == torch.float64
    assert float(raw.train.x.min()) == 0.0 and float(raw.train.x.max()) == 1.0
    assert torch.allclose(((raw.train.x - 0.1307) / 0.3081).reshape(4000, -1).float(), x, atol=1e-5)


def test_mnist_seed_reproducible(mnist):
    again = load_mnist(SHARED, seed=0)
    assert torch.equal(again.val.x, mnist.val.x) and torch.equal(again.train.y, mnist.train.y)
    other = load_mnist(SHARED, seed=1)
    assert not torch.equal(other.val.x, mnist.val.x)
    assert torch.equal(other.test.x, mnist.test.x)  # the test split never depends on the seed


def test_mnist_train_size_subset(mnist):
    s = load_mnist(SHARED, train_size=500, val_size=200, seed=3)
    assert (len(s.train), len(s.val)) == (500, 200)
    assert s.train.y.bincount(minlength=10).tolist() == [50] * 10
    assert not _rows(s.train.x) & _rows(s.val.x)
    assert _rows(s.train.x) <= _rows(mnist.train.x) | _rows(mnist.val.x)


def test_mnist_sizes_too_large():
    with pytest.raises(HoexpError) as e:
        load_mnist(SHARED, val_size=1000, train_size=4001)
    assert "5,000 training images" in _one_line(e)
    with pytest.raises(HoexpError):
        load_mnist(SHARED, val_size=0)


def test_mnist_missing_folder(tmp_path):
    with pytest.raises(HoexpError) as e:
        load_mnist(tmp_path)
    msg = _one_line(e)
    assert str(tmp_path / "mnist") in msg and "MNIST/raw/train-images-idx3-ubyte" in msg
    assert "HOEXP_DATA" in msg and "download=true" in msg


def _copy_mnist(tmp_path: Path) -> Path:
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in MNIST_RAW.iterdir():
        shutil.copyfile(f, raw / f.name)
    return raw


def test_mnist_missing_one_file(tmp_path):
    raw = _copy_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(HoexpError) as e:
        load_mnist(tmp_path)
    assert "missing: t10k-labels-idx1-ubyte" in _one_line(e)


def test_mnist_truncated_file_is_corrupt(tmp_path):
    raw = _copy_mnist(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(HoexpError) as e:
        load_mnist(tmp_path)
    msg = _one_line(e)
    assert "corrupt" in msg and str(path) in msg and "delete it" in msg


def test_mnist_gzipped_file_is_extracted(tmp_path, mnist):
    raw = _copy_mnist(tmp_path)
    path = raw / "train-labels-idx1-ubyte"
    with open(path, "rb") as fin, gzip.open(str(path) + ".gz", "wb") as fout:
        fout.write(fin.read())
    path.unlink()
    s = load_mnist(tmp_path)
    assert torch.equal(s.val.y, mnist.val.y) and path.is_file()


def test_mnist_download_failure_is_one_line(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def fail(self):
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, got:\n"
            "<urlopen error [Errno -3] Temporary failure in name resolution>\n"
        )

    monkeypatch.setattr(MNIST, "download", fail)
    with pytest.raises(HoexpError) as e:
        load_mnist(tmp_path, download=True)
    msg = _one_line(e)
    assert "download" in msg and "name resolution" in msg and str(tmp_path / "mnist") in msg


# ---------------------------------------------------------------- PTB


@pytest.fixture(scope="module")
def ptb():
    return load_ptb(SHARED)


def _file_lines(name: str) -> list[list[str]]:
    return [line.split() for line in (PTB_DIR / name).read_text().splitlines()]


def test_ptb_vocabulary(ptb):
    words = {w for line in _file_lines("ptb.train.txt") for w in line}
    assert ptb.vocab_size == len(ptb.vocab) == len(words | {EOS, UNK}) == 6022
    assert ptb.vocab == sorted(set(ptb.vocab)) and UNK in ptb.vocab and EOS in ptb.vocab
    assert ptb.task == "language_model" and isinstance(ptb, TextSplits)
    for s in (ptb.train, ptb.val, ptb.test):
        assert s.dtype == torch.int64 and s.dim() == 1 and 0 <= int(s.min()) and int(s.max()) < ptb.vocab_size


@pytest.mark.parametrize(
    "split, name", [("train", "ptb.train.txt"), ("val", "ptb.valid.txt"), ("test", "ptb.test.txt")]
)
def test_ptb_streams_match_files(ptb, split, name):
    lines = _file_lines(name)
    stream = getattr(ptb, split)
    assert int((stream == ptb.vocab.index(EOS)).sum()) == len(lines)
    assert len(stream) == sum(len(line) + 1 for line in lines)
    known = set(ptb.vocab)
    expected = [w if w in known else UNK for line in lines for w in line + [EOS]]
    assert [ptb.vocab[i] for i in stream.tolist()] == expected


def test_ptb_unseen_word_maps_to_unk(ptb):
    train_words = {w for line in _file_lines("ptb.train.txt") for w in line} | {EOS}
    val_words = [w for line in _file_lines("ptb.valid.txt") for w in line + [EOS]]
    pos, word = next((i, w) for i, w in enumerate(val_words) if w not in train_words)
    assert word not in ptb.vocab
    assert int(ptb.val[pos]) == ptb.vocab.index(UNK)
    unseen = sum(w not in train_words for w in val_words) / len(val_words)
    assert 0.02 < unseen < 0.08  # the README's ~4%


def test_batchify_layout(ptb):
    assert batchify(torch.arange(10), 3).tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    b = batchify(ptb.train, 20)
    n = len(ptb.train) // 20
    assert b.shape == (n, 20) and b.is_contiguous()
    for j in (0, 7, 19):
        assert torch.equal(b[:, j], ptb.train[j * n : (j + 1) * n])
    with pytest.raises(HoexpError):
        batchify(torch.arange(5), 6)


def test_bptt_windows(ptb):
    source = batchify(ptb.val, 10)
    x, y = bptt_batch(source, 35, 35)
    assert x.shape == y.shape == (35, 10)
    assert torch.equal(y, source[36:71]) and torch.equal(x[1:], y[:-1])
    windows = list(bptt_windows(source, 35))
    assert sum(len(x) for x, _ in windows) == len(source) - 1
    last_x, last_y = windows[-1]
    assert torch.equal(last_y[-1], source[-1]) and torch.equal(last_x[0], source[35 * (len(windows) - 1)])
    assert torch.equal(torch.cat([y for _, y in windows]), source[1:])


def test_text_splits_to(ptb):
    moved = ptb.to("meta")
    assert moved.train.device.type == "meta" and moved.vocab is ptb.vocab and moved.vocab_size == 6022


def _ptb_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "ptb"
    folder.mkdir()
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        shutil.copyfile(PTB_DIR / name, folder / name)
    return folder


def test_ptb_missing(tmp_path):
    with pytest.raises(HoexpError) as e:
        load_ptb(tmp_path)
    msg = _one_line(e)
    assert str(tmp_path / "ptb") in msg and "ptb.train.txt" in msg and "download=true" in msg
    folder = _ptb_copy(tmp_path)
    (folder / "ptb.test.txt").unlink()
    with pytest.raises(HoexpError) as e:
        load_ptb(tmp_path)
    assert "missing: ptb.test.txt" in _one_line(e)


@pytest.mark.parametrize("content, word", [(b"", "empty"), (b"\n \n", "empty"), (b"ab\xff\xfe\n", "corrupt")])
def test_ptb_empty_or_corrupt_file(tmp_path, content, word):
    folder = _ptb_copy(tmp_path)
    (folder / "ptb.valid.txt").write_bytes(content)
    with pytest.raises(HoexpError) as e:
        load_ptb(tmp_path)
    msg = _one_line(e)
    assert word in msg and str(folder / "ptb.valid.txt") in msg


def _serve(monkeypatch, payloads: dict[str, bytes]) -> list[str]:
    """Stub urlopen: serve ``payloads[file name]``; record the URLs asked for."""
    asked = []

    def urlopen(url, timeout=None):
        asked.append(url)
        assert url.startswith(URL)
        return io.BytesIO(payloads[url[len(URL) :]])

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    return asked


def _fake(n: int, seed: int) -> bytes:
    line = f"the w{seed} of N <unk> words\n".encode()
    return (line * (n // len(line) + 1))[: n - 1] + b"\n"


def test_ptb_download_writes_verified_files(tmp_path, monkeypatch):
    payloads = {name: _fake(size // 100, i) for i, (name, (size, _)) in enumerate(OFFICIAL.items())}
    monkeypatch.setattr(ptb_mod, "OFFICIAL", {n: (len(b), hashlib.md5(b).hexdigest()) for n, b in payloads.items()})
    asked = _serve(monkeypatch, payloads)
    t = load_ptb(tmp_path, download=True)
    folder = tmp_path / "ptb"
    assert sorted(os.listdir(folder)) == sorted(payloads)
    for name, data in payloads.items():
        assert (folder / name).read_bytes() == data
    assert len(asked) == 3 and "w1" not in t.vocab  # valid's word is not in the train vocabulary
    assert load_ptb(tmp_path, download=True).vocab == t.vocab and len(asked) == 3  # nothing fetched again


def test_ptb_download_real_official_checksums(tmp_path, monkeypatch):
    # The shared train file is the official valid file and valid + test concatenated is the official
    # test file, so the shipped sizes and md5s of those two are checked against real bytes here.
    official_valid = (PTB_DIR / "ptb.train.txt").read_bytes()
    official_test = (PTB_DIR / "ptb.valid.txt").read_bytes() + (PTB_DIR / "ptb.test.txt").read_bytes()
    folder = tmp_path / "ptb"
    folder.mkdir()
    shutil.copyfile(PTB_DIR / "ptb.train.txt", folder / "ptb.train.txt")  # present: not fetched
    asked = _serve(monkeypatch, {"ptb.valid.txt": official_valid, "ptb.test.txt": official_test})
    written = download_ptb(folder)
    assert written == [folder / "ptb.valid.txt", folder / "ptb.test.txt"] and len(asked) == 2
    assert (folder / "ptb.test.txt").stat().st_size == 449_945


@pytest.mark.parametrize("bad", ["short", "long", "md5"])
def test_ptb_download_rejects_wrong_files(tmp_path, monkeypatch, bad):
    payloads = {name: _fake(size // 100, i) for i, (name, (size, _)) in enumerate(OFFICIAL.items())}
    table = {n: (len(b), hashlib.md5(b).hexdigest()) for n, b in payloads.items()}
    size = table["ptb.test.txt"][0]  # the last file fetched: the first two pass, yet nothing is kept
    payloads["ptb.test.txt"] = {
        "short": payloads["ptb.test.txt"][:-10],
        "long": payloads["ptb.test.txt"] + b"extra\n",
        "md5": b"x" + payloads["ptb.test.txt"][1:],
    }[bad]
    monkeypatch.setattr(ptb_mod, "OFFICIAL", table)
    _serve(monkeypatch, payloads)
    with pytest.raises(HoexpError) as e:
        load_ptb(tmp_path, download=True)
    msg = _one_line(e)
    assert URL + "ptb.test.txt" in msg and "nothing was written" in msg
    assert ("md5" in msg) if bad == "md5" else (f"{size:,}" in msg)
    assert os.listdir(tmp_path / "ptb") == []


def test_ptb_download_network_error(tmp_path, monkeypatch):
    import urllib.error

    def urlopen(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    with pytest.raises(HoexpError) as e:
        load_ptb(tmp_path, download=True)
    assert "name resolution" in _one_line(e) and os.listdir(tmp_path / "ptb") == []
