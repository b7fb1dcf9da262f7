"""`hoexp check`: method fidelity against references, with JSON and PNG output."""

import io
import json

import pytest
from rich.console import Console

from hoexp.cli import compose_spec, main
from hoexp.tools.check import run_check

# A tiny tanh MLP with a strong decay, trained long enough that the Hessian is positive definite.
TINY = [
    "model.width=4",
    "model.depth=1",
    "model.activation=tanh",
    "hp.weight_decay.init=0.1",
    "hp.weight_decay.granularity=per_layer",
    "inner_steps=400",
    "optim.inner.lr=0.1",
    "dtype=float64",
    "progress=false",
    "method=neumann",
    "method.alpha=0.5",
]


@pytest.mark.slow
def test_check_reports_every_method_against_references(tmp_path):
    spec, _ = compose_spec(TINY)
    report = run_check(spec, tmp_path, iterations=(0, 5, 50, 200), console=Console(file=io.StringIO()))
    assert "exact dense solve" in report["ift_reference"]
    rows = {(r["method"], r["iterations"]): r for r in report["rows"]}
    assert {m for m, _ in rows} == {"neumann", "fixed_point", "cg", "t1t2", "truncated", "unrolled", "forward"}
    assert rows[("cg", 50)]["cosine"] > 0.9999 and rows[("cg", 50)]["rel_error"] < 1e-6
    neumann = [rows[("neumann", k)]["rel_error"] for k in (0, 5, 50, 200)]
    assert all(b < a for a, b in zip(neumann, neumann[1:])), neumann
    assert rows[("t1t2", 0)]["rel_error"] == rows[("neumann", 0)]["rel_error"]
    assert rows[("unrolled", 400)]["rel_error"] == 0
    assert rows[("forward", 400)]["rel_error"] < 1e-8  # forward mode = reverse mode, float64
    trunc = [rows[("truncated", k)]["rel_error"] for k in (5, 50, 200)]
    assert trunc[0] > trunc[1] > trunc[2]
    # Graph memory grows with the truncation length; an IFT solve holds one graph.
    assert rows[("truncated", 200)]["graph_mib"] > rows[("truncated", 5)]["graph_mib"] > 0
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["rows"] == report["rows"]
    assert (tmp_path / "check.png").stat().st_size > 10_000


def test_check_command_line(tmp_path, capsys):
    main(["check", *TINY, "inner_steps=50", "--iterations", "0,3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "hoexp check" in out and "neumann" in out and "exact dense solve" in out
    assert (tmp_path / "check.json").exists()


def test_check_composes_validates_and_builds_its_run_once(tmp_path, monkeypatch):
    """``hoexp check`` takes the config → checks → build path of ``hoexp run``: the build takes what the checks
    built (the optimizers and the method were built twice)."""
    from collections import Counter

    from tests.counting import BUILT, count_composes_and_builds

    counts = count_composes_and_builds(monkeypatch)
    main(["check", "model.width=4", "inner_steps=2", "method=neumann", "--iterations", "0", "--out", str(tmp_path)])
    assert (tmp_path / "check.json").exists()
    assert counts == Counter({"compose": 1, "validate": 1, **{f"build {k}": 1 for k in BUILT}}), counts


def test_check_runs_on_the_language_model(tmp_path):
    """dataset=ptb: the validation batch is a BPTT window (it was an AttributeError on the token stream)."""
    spec, _ = compose_spec(
        [
            "experiment=ptb_lstm_dropout_gaussian",
            "model.embed_dim=4",
            "model.hidden=4",
            "dataset.bptt=3",
            "inner_steps=2",
            "hp.dropout.granularity=per_layer",
            "progress=false",
        ]
    )
    report = run_check(spec, tmp_path, iterations=(0, 1), reference_cg=5, console=Console(file=io.StringIO()))
    rows = {(r["method"], r["iterations"]) for r in report["rows"]}
    assert ("unrolled", 2) in rows and ("neumann", 1) in rows


def _one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hoexp: error: "), err
    return err


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--dense-max", "-5"], "--dense-max must be >= 0"),
        (["--dense-max", "nan"], "check: argument --dense-max: invalid int value: 'nan'"),
        (["--iterations", "-1"], "--iterations must be integers >= 0, got '-1'"),
        (["--iterations", "0,5,x"], "--iterations must be comma-separated integers"),
        (["--horizon", "--at", "0,-2"], "--at must be integers >= 0"),
        (["--horizon", "--eps", "0"], "--eps must be a finite number > 0"),
        (["--horizon", "--eps", "-0.1"], "--eps must be a finite number > 0"),
        (["--horizon", "--eps", "nan"], "--eps must be a finite number > 0"),
        (["--horizon", "--eps", "inf"], "--eps must be a finite number > 0"),
        (["--frobnicate"], "check: unrecognized arguments: --frobnicate"),
    ],
)
def test_every_numeric_check_option_is_bounded_in_one_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    err = _one_line_error(capsys, ["check", "inner_steps=2", *args, "--out", str(tmp_path / "out")])
    assert expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("horizon", [[], ["--horizon"]])
@pytest.mark.parametrize("where", ["/proc/hoexp-nope/out", "{tmp}/a-file/out"])
def test_an_unwritable_out_is_one_line_naming_the_folder(tmp_path, monkeypatch, capsys, where, horizon):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    out = where.format(tmp=tmp_path)
    err = _one_line_error(capsys, ["check", *horizon, "model.width=4", "inner_steps=2", "--out", out])
    assert f"cannot write the output folder {out}" in err and "choose a writable folder with --out" in err


@pytest.mark.parametrize(
    "overrides,method,expected",
    [
        (["hp.weight_decay.granularity=global"], "hd", "--method hd: method=hd adapts one global learning rate"),
        (["hp=lr", "hp.lr.granularity=global", "method=hd"], "hd", "--method hd: method=hd gives no hypergradient"),
        (["hp=lr", "hp.lr.granularity=global", "method=hd"], "unrolled:method.nope=1", "unknown key 'nope'"),
    ],
)
def test_horizon_contenders_are_checked_before_any_truth_is_computed(tmp_path, capsys, overrides, method, expected):
    """A contender that cannot give a hypergradient here is refused in one line before the truth
    (2·H whole remaining runs per checkpoint) is computed, not after it (or with a traceback)."""
    argv = ["check", "--horizon", "model.width=4", "outer_steps=3", "inner_steps=2", *overrides]
    err = _one_line_error(capsys, [*argv, "--method", "unrolled", "--method", method, "--out", str(tmp_path / "o")])
    assert expected in err
    assert not (tmp_path / "o" / "horizon.json").exists()


def test_a_reference_that_did_not_converge_is_said_in_the_table_the_output_and_check_json(tmp_path):
    """--dense-max 0 takes the CG reference; on this tiny indefinite problem CG stops at non-positive
    curvature far from the solution: every IFT row is marked, a line says why, check.json records it.
    With the dense reference (the default) nothing is marked."""
    spec, _ = compose_spec(["model.width=4", "inner_steps=5", "progress=false", "dtype=float64"])
    buf = io.StringIO()
    report = run_check(spec, tmp_path / "a", iterations=(0, 1), dense_max=0, console=Console(file=buf, width=250))
    problem = report["ift_reference_problem"]
    assert problem.startswith("not converged: relative residual") and "--dense-max" in problem
    text = buf.getvalue()
    assert "IFT reference not converged: relative residual" in text
    ift_rows = [r for r in report["rows"] if r["against"] == "ift"]
    assert ift_rows and all("reference not converged" in r["info"] for r in ift_rows)
    assert all("reference" not in r["info"] for r in report["rows"] if r["against"] == "path")
    saved = json.loads((tmp_path / "a" / "check.json").read_text())
    assert saved["ift_reference_problem"] == problem and saved["rows"] == report["rows"]

    dense = run_check(spec, tmp_path / "b", iterations=(0, 1), console=Console(file=io.StringIO()))
    assert "exact dense solve" in dense["ift_reference"] and dense["ift_reference_problem"] is None
    assert all("reference" not in r["info"] for r in dense["rows"])
