"""scripts/bench_bilevel.py's pure helpers (curves from metrics.jsonl, errors at a time, times to a threshold, F1,
the summary table) and the hoexp commands it composes; the benchmark itself is a script (not run here)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_bilevel", ROOT / "scripts" / "bench_bilevel.py")
assert _spec is not None and _spec.loader is not None
bb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bb)

CURVE = [(0.0, 0.9), (2.0, 0.18), (4.0, 0.16), (6.0, 0.155), (8.0, 0.154)]


def test_error_at_takes_the_last_evaluation_reached_and_nan_past_the_run():
    assert bb.error_at(CURVE, 0.0) == 0.9
    assert bb.error_at(CURVE, 5.0) == 0.16  # held since 4 s
    assert bb.error_at(CURVE, 8.0) == 0.154
    assert math.isnan(bb.error_at(CURVE, 9.0))  # the run stopped at 8 s
    assert bb.error_at(CURVE, 9.0, end=9.5) == 0.154  # it ran to 9.5 s, past its last evaluation


def test_time_to_is_the_first_crossing_or_inf():
    assert bb.time_to(CURVE, 0.16) == 4.0
    assert bb.time_to(CURVE, 0.155) == 6.0
    assert bb.time_to(CURVE, 0.1) == math.inf


def test_hoexp_curve_sums_outer_step_times_and_skips_steps_without_evaluation():
    rows = [
        {"step": 0, "error/test": 0.9, "acc/val": 0.1, "loss/val": 2.3, "f1/flagged": 0.77},
        {"step": 1, "time/outer_step_s": 1.5},
        {"step": 2, "time/outer_step_s": 0.5, "error/test": 0.2, "acc/val": 0.75, "loss/val": 1.0, "f1/flagged": 0.9},
        {"step": 3, "time/outer_step_s": 0.25},
    ]
    curve = bb.hoexp_curve(rows)
    assert [p["solver_s"] for p in curve] == [0.0, 2.0]
    assert curve[1]["test_error"] == 0.2 and curve[1]["val_error"] == pytest.approx(0.25) and curve[1]["f1"] == 0.9
    # log_every skips steps: the run's own cumulative solver time, where logged, is the clock
    sparse = [rows[0], {"step": 4, "time/outer_step_s": 0.1, "time/solver_s": 2.6, "error/test": 0.1}]
    assert [p["solver_s"] for p in bb.hoexp_curve(sparse)] == [0.0, 2.6]


def test_f1_flags_negative_raw_weights():
    # flagged: 0, 1, 3; noisy: 0, 2, 3 → tp 2, F1 = 2·2 / (3 + 3)
    assert bb.f1_flagged([-1.0, -0.5, 2.0, -3.0], [True, False, True, True]) == pytest.approx(4 / 6)
    assert bb.f1_flagged([1.0, 2.0], [False, False]) == 1.0  # nothing flagged, nothing noisy


def test_mean_std_is_the_sample_std_and_inf_when_a_seed_never_reached():
    assert bb.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert bb.mean_std([0.5]) == (0.5, 0.0)
    assert bb.mean_std([1.0, math.inf])[0] == math.inf


def test_summary_table_reports_errors_at_times_and_time_ratios():
    pts = lambda c: [{"solver_s": s, "test_error": e, "val_error": e, "val_loss": 1.0, "f1": 0.9} for s, e in c]  # noqa: E731
    slow = [(s * 2, e) for s, e in CURVE]
    curves = {(32, "ref"): pts(CURVE), (32, "other"): pts(slow)}
    curves |= {(33, "ref"): pts(CURVE[:3]), (33, "other"): pts(slow)}  # ref never reaches 0.155 on seed 33
    table = bb.summary_table(curves, (5,), (0.16, 0.155), "ref")
    row = (
        "| ref (n=2) | 0.160 ± 0.000 | 0.157 ± 0.004 | 6.0 ± 2.8 | 0.900 ± 0.000 | 4.0 ± 0.0 s | 6.0 ± 0.0 s (1 of 2) |"
    )
    assert row in table
    assert "- 0.16: other / ref = 2.00 ± 0.00 over 2 of 2 seeds (32: 2.00, 33: 2.00)" in table
    assert "- 0.155: other / ref = 2.00 ± 0.00 over 1 of 2 seeds (32: 2.00, 33: ref never)" in table


def test_every_hoexp_solver_composes_on_arrays(compose, tmp_path):
    """The preset itself on ``dataset=arrays`` (it sets no mnist_cleaning-only key) and the SABA / AmIGO lines."""
    data = f"dataset.path={tmp_path / 'd.npz'}"  # composing does not read the file
    spec = compose(*bb.HOEXP["hoexp-cg"], data)
    assert spec.dataset.name == "arrays" and spec.method.name == "cg" and spec.model.name == "linear"
    for name in ("hoexp-saba", "hoexp-amigo"):
        assert compose(*bb.HOEXP[name], data).method.name == name.split("-")[1]


def test_the_saba_preset_is_the_benchmarked_compiled_saba(compose, tmp_path):
    """``experiment=mnist_hyper_cleaning`` composes the problem, method, step sizes, inner steps and evaluation
    cadence of the benchmark's ``hoexp-saba-compiled`` line, so that line's measured figures are the preset's."""
    data = ["dataset=arrays", f"dataset.path={tmp_path / 'd.npz'}"]
    preset = compose("experiment=mnist_hyper_cleaning", *data).raw
    bench = compose(*bb.HOEXP["hoexp-saba-compiled"], *data).raw
    for key in ("model", "hp", "method", "optim", "inner_steps", "eval_every", "dataset"):
        assert preset[key] == bench[key], key
    assert preset["method"]["compile"] is True and preset["method"]["_target_"].endswith(".saba")
    cg = compose("experiment=mnist_hyper_cleaning", "method=cg").raw  # CG keeps its double loop (its own file)
    assert (cg["inner_steps"], cg["optim"]["outer"]["lr"], cg["max_time"]) == (50, 30000, None)
    assert compose("experiment=mnist_hyper_cleaning", "method=neumann").raw["optim"]["outer"]["lr"] == 100
