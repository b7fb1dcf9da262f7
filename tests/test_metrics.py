"""Tests for hoexp.engine.metrics and hoexp.engine.progress (fast, CPU only)."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
import torch
from rich.console import Console

from hoexp.engine.metrics import (
    JsonlLogger,
    MemoryLogger,
    MetricLogger,
    MultiLogger,
    TensorBoardLogger,
    read_json,
    read_jsonl,
    tensor_stats,
    write_json_atomic,
)
from hoexp.engine.progress import NullProgress, PlainProgress, RichProgress, RunProgress, format_fields, make_progress


def _strict_loads(line: str):
    """json.loads that rejects the non-standard NaN/Infinity literals."""

    def bad(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=bad)


# ------------------------------------------------------------------ TensorBoard


def _accumulator(log_dir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def test_tensorboard_logger_roundtrip(tmp_path):
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    log_dir = tmp_path / "run"
    lg = TensorBoardLogger(log_dir)
    assert isinstance(lg, MetricLogger)
    losses = [0.9, 0.5123456789, 0.25]
    for step, loss in zip([0, 5, 10], losses):
        lg.log_scalars(step, {"loss/val": loss, "hp/mean": torch.tensor(step * 0.1)})
    hp = torch.linspace(-1.0, 1.0, 101, dtype=torch.float64, requires_grad=True)
    lg.log_histograms(10, {"hp/values": hp * 2})
    yaml_text = "model:\n  width: 64\n  depth: 2\n"
    lg.log_text("config", yaml_text)
    lg.log_hparams({"lr": 0.01, "inner_steps": 20, "method": "unroll", "nesterov": True}, {"final/val_loss": 0.25})
    lg.flush()
    lg.close()

    # Everything in one folder: no sub-run directory (unlike SummaryWriter.add_hparams).
    entries = list(log_dir.iterdir())
    assert all(p.is_file() for p in entries), entries
    assert len([p for p in entries if p.name.startswith("events.out.tfevents")]) == 1

    acc = _accumulator(log_dir)
    tags = acc.Tags()

    ev = acc.Scalars("loss/val")
    assert [e.step for e in ev] == [0, 5, 10]
    assert [e.value for e in ev] == [float(np.float32(x)) for x in losses]
    assert [e.value for e in acc.Scalars("hp/mean")] == [float(np.float32(x)) for x in (0.0, 0.5, 1.0)]

    assert "hp/values" in tags["histograms"]
    (h,) = acc.Histograms("hp/values")
    assert h.step == 10
    assert h.histogram_value.num == 101
    assert h.histogram_value.min == pytest.approx(-2.0)
    assert h.histogram_value.max == pytest.approx(2.0)
    assert h.histogram_value.sum == pytest.approx(0.0, abs=1e-4)

    text_tags = acc.PluginTagToContent("text")
    assert any(t.startswith("config") for t in text_tags), text_tags
    (text_tag,) = [t for t in tags["tensors"] if t.startswith("config")]
    stored = acc.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert stored.startswith("```\n") and stored.endswith("\n```")
    assert yaml_text in stored

    content = acc.PluginTagToContent("hparams")
    assert content, "no hparams plugin data in the run folder"
    assert "_hparams_/session_start_info" in content
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hps = data.session_start_info.hparams
    assert hps["lr"].number_value == pytest.approx(0.01)
    assert hps["inner_steps"].number_value == 20
    assert hps["method"].string_value == "unroll"
    assert hps["nesterov"].bool_value is True
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert [m.name.tag for m in exp.experiment.metric_infos] == ["final/val_loss"]
    types = {i.name: api_pb2.DataType.Name(i.type) for i in exp.experiment.hparam_infos}
    assert types == {
        "lr": "DATA_TYPE_FLOAT64",
        "inner_steps": "DATA_TYPE_FLOAT64",
        "method": "DATA_TYPE_STRING",
        "nesterov": "DATA_TYPE_BOOL",
    }
    (final,) = acc.Scalars("final/val_loss")
    assert final.step == 10  # defaults to the last logged step
    assert final.value == pytest.approx(0.25)


def test_tensorboard_text_fence_longer_than_content(tmp_path):
    lg = TensorBoardLogger(tmp_path)
    lg.log_text("notes", "a\n```\ncode\n```")
    lg.close()
    acc = _accumulator(tmp_path)
    (tag,) = acc.Tags()["tensors"]
    stored = acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    assert stored.startswith("````\n") and stored.endswith("\n````")


def test_tensorboard_histogram_skips_nonfinite(tmp_path):
    lg = TensorBoardLogger(tmp_path)
    lg.log_histograms(
        1, {"mixed": torch.tensor([1.0, float("nan"), 3.0, float("inf")]), "all_nan": torch.full((3,), float("nan"))}
    )
    lg.close()
    acc = _accumulator(tmp_path)
    assert acc.Tags()["histograms"] == ["mixed"]
    (h,) = acc.Histograms("mixed")
    assert h.histogram_value.num == 2
    assert h.histogram_value.sum == pytest.approx(4.0)


# ------------------------------------------------------------------------ JSONL


def test_jsonl_logger_lines_flush_and_nan(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lg = JsonlLogger(path)
    assert isinstance(lg, MetricLogger)
    lg.log_scalars(0, {"loss/val": 1.5, "loss/train": 2})
    # Flushed per line: readable before close.
    assert path.read_text().count("\n") == 1
    assert _strict_loads(path.read_text()) == {"step": 0, "loss/val": 1.5, "loss/train": 2.0}

    lg.log_scalars(1, {"loss/val": float("nan"), "x": float("inf"), "y": -math.inf})
    lg.log_scalars(2, {"loss/val": torch.tensor(0.125)})
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    raw = [_strict_loads(ln) for ln in lines]  # every line valid strict JSON
    assert raw[1] == {"step": 1, "loss/val": "nan", "x": "inf", "y": "-inf"}

    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert math.isnan(recs[1]["loss/val"])
    assert recs[1]["x"] == math.inf and recs[1]["y"] == -math.inf
    assert recs[2]["loss/val"] == 0.125
    lg.close()
    lg.close()  # idempotent
    with pytest.raises(ValueError):
        lg.log_scalars(3, {"a": 1.0})


def test_jsonl_logger_appends_and_accepts_dir(tmp_path):
    lg = JsonlLogger(tmp_path)  # a directory -> metrics.jsonl inside it
    assert lg.path == tmp_path / "metrics.jsonl"
    lg.log_scalars(0, {"a": 1.0})
    lg.close()
    lg = JsonlLogger(tmp_path / "metrics.jsonl")
    lg.log_scalars(1, {"a": 2.0})
    lg.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "a": 1.0}, {"step": 1, "a": 2.0}]


def test_jsonl_histogram_summary(tmp_path):
    lg = JsonlLogger(tmp_path / "m.jsonl")
    lg.log_histograms(4, {"hp": torch.tensor([1.0, 2.0, 3.0, 10.0])})
    lg.close()
    (rec,) = read_jsonl(tmp_path / "m.jsonl")
    assert rec["step"] == 4
    assert rec["hist/hp/mean"] == pytest.approx(4.0)
    assert rec["hist/hp/median"] == pytest.approx(2.5)
    assert rec["hist/hp/max"] == 10.0
    lg2 = JsonlLogger(tmp_path / "n.jsonl", summarize_histograms=False)
    lg2.log_histograms(4, {"hp": torch.ones(3)})
    lg2.close()
    assert read_jsonl(tmp_path / "n.jsonl") == []


def test_read_jsonl_skips_truncated_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 0, "a": 1.0}\n{"step": 1, "a": 2.0}\n{"step": 2, "a"')
    assert read_jsonl(p) == [{"step": 0, "a": 1.0}, {"step": 1, "a": 2.0}]
    p.write_text('{"step": 0, "a"\n{"step": 1, "a": 2.0}\n')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(p)


# ------------------------------------------------------------ write_json_atomic


def test_write_json_atomic(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    obj = {
        "best_val_loss": float("nan"),
        "bounds": [float("-inf"), 1.5, float("inf")],
        "name": "run",
        "steps": np.int64(7),
        "hp": torch.tensor([0.5, 0.25]),
        "nested": {"x": np.float32(0.5)},
    }
    write_json_atomic(path, obj)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    raw = _strict_loads(path.read_text())
    assert raw == {
        "best_val_loss": "nan",
        "bounds": ["-inf", 1.5, "inf"],
        "name": "run",
        "steps": 7,
        "hp": [0.5, 0.25],
        "nested": {"x": 0.5},
    }
    back = read_json(path)
    assert math.isnan(back["best_val_loss"])
    assert back["bounds"] == [-math.inf, 1.5, math.inf]


def test_write_json_atomic_failure_leaves_old_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert read_json(path) == {"a": 1}


# ------------------------------------------------------------------ MultiLogger


class _Boom(MemoryLogger):
    def close(self) -> None:
        super().close()
        raise RuntimeError("boom")

    def log_scalars(self, step, values) -> None:
        raise RuntimeError("scalars boom")


def test_multi_logger_fan_out():
    a, b = MemoryLogger(), MemoryLogger()
    multi = MultiLogger([a, b])
    assert isinstance(multi, MetricLogger)
    t = torch.arange(3.0)
    multi.log_scalars(3, {"loss/val": 0.5})
    multi.log_histograms(3, {"hp": t})
    multi.log_text("config", "a: 1")
    multi.log_hparams({"lr": 0.1}, {"final/val_loss": 0.5})
    multi.flush()
    multi.close()
    for lg in (a, b):
        assert lg.scalars == [(3, {"loss/val": 0.5})]
        assert lg.series("loss/val") == [(3, 0.5)]
        ((step, hists),) = lg.histograms
        assert step == 3 and torch.equal(hists["hp"], t)
        assert lg.texts == [("config", "a: 1")]
        assert lg.hparams == [({"lr": 0.1}, {"final/val_loss": 0.5})]
        assert lg.flushes == 1 and lg.closed


def test_multi_logger_close_all_even_if_one_raises(tmp_path):
    first, boom, last = MemoryLogger(), _Boom(), MemoryLogger()
    jl = JsonlLogger(tmp_path / "m.jsonl")
    multi = MultiLogger([first, boom, jl, last])
    with pytest.raises(RuntimeError, match="scalars boom"):
        multi.log_scalars(0, {"a": 1.0})
    assert first.scalars and last.scalars  # the others still got the step
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 0, "a": 1.0}]
    with pytest.raises(RuntimeError, match="^boom$"):
        multi.close()
    assert first.closed and boom.closed and last.closed
    assert jl._f is None


# ------------------------------------------------------------------ tensor_stats


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_stats_against_numpy(n, dtype):
    g = torch.Generator().manual_seed(n)
    t = (torch.randn(n, generator=g) * 3 + 1).to(dtype)
    if n > 2:
        t = t.reshape(1, -1) if n % 2 else t.reshape(2, -1)
    a = t.double().numpy().ravel()
    s = tensor_stats("hp", t)
    assert list(s) == ["hp/mean", "hp/std", "hp/min", "hp/max", "hp/median"]
    assert all(type(v) is float for v in s.values())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert s["hp/mean"] == pytest.approx(np.mean(a), rel=tol, abs=tol)
    expected_std = 0.0 if n == 1 else np.std(a, ddof=1)
    assert s["hp/std"] == pytest.approx(expected_std, rel=tol, abs=tol)
    assert s["hp/min"] == pytest.approx(np.min(a), rel=tol)
    assert s["hp/max"] == pytest.approx(np.max(a), rel=tol)
    assert s["hp/median"] == pytest.approx(np.median(a), rel=tol, abs=tol)


def test_tensor_stats_small_cases():
    s = tensor_stats("x", torch.tensor([4, 1, 3, 2]))  # integer input, even count
    assert s == {
        "x/mean": 2.5,
        "x/std": pytest.approx(np.std([1, 2, 3, 4], ddof=1)),
        "x/min": 1.0,
        "x/max": 4.0,
        "x/median": 2.5,
    }
    one = tensor_stats("y", torch.tensor(5.0, requires_grad=True))
    assert one == {"y/mean": 5.0, "y/std": 0.0, "y/min": 5.0, "y/max": 5.0, "y/median": 5.0}
    empty = tensor_stats("z", torch.empty(0))
    assert len(empty) == 5 and all(math.isnan(v) for v in empty.values())
    assert list(tensor_stats("", torch.ones(2))) == ["mean", "std", "min", "max", "median"]


def test_tensor_stats_single_host_sync(monkeypatch):
    calls = []
    orig = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return orig(self)

    for name in ("item", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a: pytest.fail(name))
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    tensor_stats("hp", torch.randn(10))
    assert calls == [torch.Size([5])]


# --------------------------------------------------------------------- progress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=100), buf


def _run(progress: RunProgress, total_outer: int, total_inner: int, stop_at=None):
    with progress as p:
        for step in range(1, (total_outer if stop_at is None else stop_at) + 1):
            p.start_outer(step)
            for _ in range(total_inner):
                p.advance_inner()
            p.end_outer(step, {"val_loss": 1.0 / (step + 1), "val_acc": 0.95})


def test_format_fields():
    assert (
        format_fields({"val_loss": 0.42131, "val_acc": 0.95, "hypergrad_norm": 1.234e-5})
        == "val_loss=0.4213 val_acc=0.950 hypergrad_norm=1.234e-05"
    )
    assert format_fields({"val_loss": float("nan"), "n": 3}) == "val_loss=nan n=3"


def test_plain_progress_every_step():
    console, buf = _console(terminal=False)
    progress = make_progress(3, 4, console=console)
    assert isinstance(progress, PlainProgress)
    with progress as p:
        p.message("starting [bold]run[/bold]")
        for step in range(1, 4):
            p.start_outer(step)
            p.advance_inner(4)
            p.end_outer(step, {"val_loss": 0.42131, "val_acc": 0.95})
    lines = buf.getvalue().splitlines()
    assert lines[0] == "starting [bold]run[/bold]"  # no markup interpretation
    assert len(lines) == 4
    pat = re.compile(r"^\[outer (\d+)/3\] val_loss=0\.4213 val_acc=0\.950 elapsed=\d+\.\ds$")
    assert [int(pat.match(ln).group(1)) for ln in lines[1:]] == [1, 2, 3]
    assert "\x1b" not in buf.getvalue()


def test_plain_progress_throttles_long_runs():
    console, buf = _console(terminal=False)
    _run(make_progress(1001, 1, console=console), 1001, 1)
    steps = [int(m) for m in re.findall(r"^\[outer (\d+)/1001\]", buf.getvalue(), re.M)]
    assert steps == list(range(21, 1001, 21)) + [1001]  # every ceil(1001/50)=21, plus last
    assert len(steps) <= 51


def test_plain_progress_prints_last_step_on_early_stop():
    console, buf = _console(terminal=False)
    _run(make_progress(200, 1, console=console), 200, 1, stop_at=10)
    steps = [int(m) for m in re.findall(r"^\[outer (\d+)/200\]", buf.getvalue(), re.M)]
    assert steps == [4, 8, 10]


def test_rich_progress_runs_on_terminal():
    console, buf = _console(terminal=True)
    progress = make_progress(5, 3, console=console)
    assert isinstance(progress, RichProgress)
    with progress as p:
        p.message("hello")
        for step in range(1, 6):
            p.start_outer(step)
            for _ in range(3):
                p.advance_inner()
            assert p.progress.tasks[1].completed == 3
            p.end_outer(step, {"val_loss": 0.42131, "val_acc": 0.95})
        assert p.progress.tasks[0].completed == 5
        assert p.progress.tasks[0].fields["info"] == "val_loss=0.4213 val_acc=0.950"
    out = buf.getvalue()
    assert "hello" in out and "val_loss=0.4213" in out and "5/5" in out


def test_disabled_progress_prints_nothing():
    for terminal in (False, True):
        console, buf = _console(terminal)
        progress = make_progress(5, 3, console=console, enabled=False)
        assert isinstance(progress, NullProgress)
        with progress as p:
            p.message("hello")
        _run(progress, 5, 3)
        assert buf.getvalue() == ""
