"""Metric loggers for the bilevel training loop (one call per outer step).

``MetricLogger`` is the protocol; ``TensorBoardLogger``, ``JsonlLogger``,
``MemoryLogger`` and ``MultiLogger`` implement it. JSON output encodes
non-finite floats as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so the
files stay valid JSON; ``read_jsonl`` / ``read_json`` turn them back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import torch

from hoexp.engine.rundir import write_atomic

__all__ = ["HParamValue", "MetricLogger", "TensorBoardLogger", "JsonlLogger", "MemoryLogger", "MultiLogger"]
__all__ += ["write_json_atomic", "read_json", "read_jsonl", "tensor_stats"]

HParamValue = float | int | str | bool

_NONFINITE_TO_STR: dict[float, float | str] = {math.inf: "inf", -math.inf: "-inf"}
_STR_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@runtime_checkable
class MetricLogger(Protocol):
    """What the training loop logs to, once per outer step."""

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log scalars under tags such as ``"loss/val"`` or ``"hp/mean"``."""
        ...

    def log_histograms(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        """Log the value distribution of each tensor."""
        ...

    def log_text(self, tag: str, text: str) -> None:
        """Log a block of text (e.g. the resolved YAML config)."""
        ...

    def log_hparams(self, hparams: Mapping[str, HParamValue], metrics: Mapping[str, float]) -> None:
        """Log the run's hyperparameters with its final metrics."""
        ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- JSON


def _to_json_value(obj: Any) -> Any:
    """Recursively make ``obj`` JSON-serializable with non-finite floats as strings."""
    if isinstance(obj, (bool, str, type(None))):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return "nan" if math.isnan(obj) else _NONFINITE_TO_STR.get(float(obj), float(obj))
    if isinstance(obj, Mapping):
        return {str(k): _to_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json_value(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return _to_json_value(obj.tolist())
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def _from_json_value(obj: Any) -> Any:
    if isinstance(obj, str):
        return _STR_TO_NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _from_json_value(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json_value(v) for v in obj]
    return obj


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(_to_json_value(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    path = Path(path)
    text = _dumps(obj, indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable; best effort (not possible everywhere)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Inverse of ``write_json_atomic`` ("nan"/"inf"/"-inf" strings become floats)."""
    with open(path, encoding="utf-8") as f:
        return _from_json_value(json.load(f))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a ``JsonlLogger`` file back, one dict per line.

    A truncated last line (a crash mid-write) is skipped; a bad line elsewhere raises.
    """
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(_from_json_value(json.loads(line)))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return records


# ------------------------------------------------------------------------- stats


def tensor_stats(prefix: str, t: torch.Tensor) -> dict[str, float]:
    """Mean, std (unbiased; 0 for one element), min, max and median of ``t`` flattened.

    Keys are ``f"{prefix}/mean"`` etc. The median is numpy's (average of the two
    middle values for an even count). One host sync for all five numbers; an empty
    tensor gives NaN for each.
    """
    x = t.detach().reshape(-1)
    if x.dtype != torch.float64:
        x = x.float()
    n = x.numel()
    names = ("mean", "std", "min", "max", "median")
    key = (lambda s: f"{prefix}/{s}") if prefix else (lambda s: s)
    if n == 0:
        return {key(s): math.nan for s in names}
    std = x.std() if n > 1 else x.new_zeros(())
    lo = x.kthvalue((n + 1) // 2).values
    median = lo if n % 2 else (lo + x.kthvalue(n // 2 + 1).values) / 2
    vals = torch.stack([x.mean(), std, x.min(), x.max(), median]).tolist()
    return {key(s): float(v) for s, v in zip(names, vals)}


def _float(tag: str, v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise TypeError(f"scalar {tag!r} is not a number: {v!r}") from e


# ----------------------------------------------------------------------- loggers


def _fix_bool_hparams(exp: Any, ssi: Any, keys: list[str]) -> None:
    """Mark bool hparams as bools (torch's ``hparams`` records them as numbers)."""
    if not keys:
        return
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    for summary in (exp, ssi):
        pd = summary.value[0].metadata.plugin_data
        data = plugin_data_pb2.HParamsPluginData.FromString(pd.content)
        if summary is exp:  # the experiment: each hparam's declared type
            for info in data.experiment.hparam_infos:
                if info.name in keys:
                    info.type = api_pb2.DataType.Value("DATA_TYPE_BOOL")
        else:  # the session start: each hparam's value
            for k in keys:
                data.session_start_info.hparams[k].bool_value = bool(data.session_start_info.hparams[k].number_value)
        pd.content = data.SerializeToString()


class TensorBoardLogger:
    """Logs to TensorBoard event files in ``log_dir`` (hparams included, same folder); ``files``: those it opened.

    TensorBoard writes from a thread of its own. A write that fails there (a full disk) is raised by the next
    call here, as an ``OSError`` naming the event file, and the thread ends without printing a traceback.
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, flush_secs: int = 30, purge_step: int | None = None) -> None:
        """``purge_step``: when resuming, TensorBoard hides events at or after this step from earlier files."""
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        before = set(self.log_dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs, purge_step=purge_step)
        self.files = sorted(set(self.log_dir.glob("events.out.tfevents.*")) - before)
        self._last_step = 0
        _quiet_writer_thread(self.writer)

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        """An OSError without a file name (a write from TensorBoard's thread) names the event file."""
        try:
            yield
        except OSError as e:
            if e.filename is None and e.errno is not None:
                where = str(self.files[-1]) if self.files else str(self.log_dir)
                raise OSError(e.errno, e.strerror, where) from None
            raise

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._last_step = step
        with self._named():
            for tag, v in values.items():
                self.writer.add_scalar(tag, _float(tag, v), global_step=step)

    def log_histograms(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        """Non-finite entries are dropped; a tensor with no finite entry is skipped."""
        self._last_step = step
        with self._named():
            for tag, t in values.items():
                x = t.detach().reshape(-1).to("cpu", torch.float32)
                x = x[torch.isfinite(x)]
                if x.numel():
                    self.writer.add_histogram(tag, x, global_step=step)

    def log_text(self, tag: str, text: str) -> None:
        """Text is put in a Markdown code block so that YAML keeps its layout."""
        fence = "```"
        while fence in text:
            fence += "`"
        with self._named():
            self.writer.add_text(tag, f"{fence}\n{text}\n{fence}")

    def log_hparams(
        self, hparams: Mapping[str, HParamValue], metrics: Mapping[str, float], *, step: int | None = None
    ) -> None:
        """Write the HPARAMS summaries into this run's own event file.

        Unlike ``SummaryWriter.add_hparams`` (which makes a sub-run folder), the run
        itself becomes the hparams session. Each metric is also written as a scalar at
        ``step`` (default: the last logged step) so the HPARAMS table has its value;
        use tags not logged elsewhere (e.g. ``"final/val_loss"``).
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
        mets = {k: _float(k, v) for k, v in metrics.items()}
        exp, ssi, sei = hparams_summary(clean, mets)
        _fix_bool_hparams(exp, ssi, [k for k, v in clean.items() if isinstance(v, bool)])
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)
        at = self._last_step if step is None else step
        for k, v in mets.items():
            self.writer.add_scalar(k, v, global_step=at)

    def flush(self) -> None:
        with self._named():
            self.writer.flush()

    def close(self) -> None:
        with self._named():
            self.writer.close()


def _quiet_writer_thread(writer: Any) -> None:
    """TensorBoard's writer thread keeps an exception for the next write to raise, then re-raises it, which
    prints a traceback from the thread; an OSError (a full disk) is then reported once, by that write."""
    import threading

    worker = writer  # writer.file_writer.event_writer._async_writer._worker, where each exists
    for name in ("file_writer", "event_writer", "_async_writer", "_worker"):
        worker = getattr(worker, name, None)
    hook = getattr(worker, "_invoke_excepthook", None)
    if not isinstance(worker, threading.Thread) or hook is None:
        return

    def quiet(thread: threading.Thread) -> None:
        if not isinstance(getattr(thread, "exception", None), OSError):
            hook(thread)

    worker._invoke_excepthook = quiet  # type: ignore[attr-defined]


def _line_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return math.inf  # a torn last line: dropped


class JsonlLogger:
    """Appends one JSON object per ``log_scalars`` call to ``path`` (``metrics.jsonl``).

    ``path`` may be a directory, in which case ``path/metrics.jsonl`` is used. Each
    line is flushed as soon as it is written. Histograms are not stored: each
    ``log_histograms`` call writes one line of their ``tensor_stats`` under keys
    ``f"hist/{tag}/mean"`` etc. (``summarize_histograms=False`` drops them).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, summarize_histograms: bool = True, keep_until: int | None = None
    ) -> None:
        """``keep_until``: when resuming, drop earlier lines with a step after it (logged after the checkpoint)."""
        path = Path(path)
        if path.is_dir():
            path = path / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and path.exists():
            kept = [
                ln
                for ln in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if ln.strip() and _line_step(ln) <= keep_until
            ]
            write_atomic(path, "".join(kept).encode("utf-8"))
        self.path = path
        self.summarize_histograms = summarize_histograms
        self._f: IO[str] | None = open(path, "a", encoding="utf-8")

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._f is None:
            raise ValueError(f"JsonlLogger({self.path}) is closed")
        try:
            self._f.write(_dumps(record) + "\n")
            self._f.flush()
        except OSError as e:  # a full disk: say which file
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._write({"step": int(step), **{k: _float(k, v) for k, v in values.items()}})

    def log_histograms(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        if not self.summarize_histograms or not values:
            return
        record: dict[str, Any] = {"step": int(step)}
        for tag, t in values.items():
            record.update(tensor_stats(f"hist/{tag}", t))
        self._write(record)

    def log_text(self, tag: str, text: str) -> None:
        pass

    def log_hparams(self, hparams: Mapping[str, HParamValue], metrics: Mapping[str, float]) -> None:
        pass

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class MemoryLogger:
    """Keeps everything in memory (for tests)."""

    def __init__(self) -> None:
        self.scalars: list[tuple[int, dict[str, float]]] = []
        self.histograms: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.texts: list[tuple[str, str]] = []
        self.hparams: list[tuple[dict[str, HParamValue], dict[str, float]]] = []
        self.flushes = 0
        self.closed = False

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.scalars.append((step, {k: _float(k, v) for k, v in values.items()}))

    def log_histograms(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        self.histograms.append((step, {k: t.detach().to("cpu", copy=True) for k, t in values.items()}))

    def log_text(self, tag: str, text: str) -> None:
        self.texts.append((tag, text))

    def log_hparams(self, hparams: Mapping[str, HParamValue], metrics: Mapping[str, float]) -> None:
        self.hparams.append((dict(hparams), {k: _float(k, v) for k, v in metrics.items()}))

    def series(self, tag: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs logged for one scalar tag."""
        return [(s, vals[tag]) for s, vals in self.scalars if tag in vals]

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


class MultiLogger:
    """Fans every call out to several loggers.

    Every logger is called even if an earlier one raises; the first error is
    re-raised afterwards.
    """

    def __init__(self, loggers: Iterable[MetricLogger]) -> None:
        self.loggers = list(loggers)

    def _each(self, method: str, *args: Any) -> None:
        error: BaseException | None = None
        for lg in self.loggers:
            try:
                getattr(lg, method)(*args)
            except Exception as e:  # noqa: BLE001 - re-raised below
                if error is None:
                    error = e
        if error is not None:
            raise error

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._each("log_scalars", step, values)

    def log_histograms(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        self._each("log_histograms", step, values)

    def log_text(self, tag: str, text: str) -> None:
        self._each("log_text", tag, text)

    def log_hparams(self, hparams: Mapping[str, HParamValue], metrics: Mapping[str, float]) -> None:
        self._each("log_hparams", hparams, metrics)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        self._each("close")
