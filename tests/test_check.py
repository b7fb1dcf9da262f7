"""`hoexp check`: method fidelity against references, with JSON and PNG output."""

import io
import json

import pytest
from rich.console import Console

from hoexp.check import run_check
from hoexp.cli import compose_spec, main

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


def test_check_runs_on_the_language_model(tmp_path):
    """dataset=ptb: the validation batch is a BPTT window (it was an AttributeError on the token stream)."""
    spec, _ = compose_spec(
        [
            "experiment=ptb_lstm_dropout",
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
