"""Smoke test of the benchmark suite (scripts/bench.py --quick): it runs end to end and writes its JSON."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))  # torch.compile on CPU needs one


@pytest.mark.slow
def test_bench_quick_writes_positive_ratios(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env.setdefault("HOEXP_DATA", str(ROOT.parent / "shared" / "data"))
    env.pop("HOEXP_PEERS", None)  # the peer problem without peers: hoexp and the direct solve
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench.py"),
        "--quick",
        "--device",
        "cpu",
        "--methods",
        "neumann,neumann-nores,neumann-fused,unrolled",
        "--compile",
        "iris" if COMPILER else "",
        "--out",
        str(out),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Targets" in r.stdout and f"wrote {out}" in r.stdout

    result = json.loads(out.read_text())
    assert result["meta"]["quick"] is True and result["meta"]["inner_steps"] == 10
    assert set(result["problems"]) == {"iris", "mnist", "ptb"}

    def positive(x):
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    for name, p in result["problems"].items():
        assert p["num_params"] > 0 and p["num_hparams"] > 0 and p["threads"] >= 1
        assert all(positive(p["times_ms"][k]) for k in ("step", "grad", "hvp")), name
        assert positive(p["hvp_over_grad"]) and positive(p["step_over_grad"]) and positive(p["val_grad_over_grad"])
        assert positive(p["ift_floor_K_over_grad"]) and positive(p["times_ms"]["grad_create_graph"])
        assert set(p["methods"]) == {"neumann", "neumann-nores", "neumann-fused", "unrolled", "none"}
        for mname in ("neumann", "neumann-nores"):
            m = p["methods"][mname]
            assert positive(m["hg_over_step"]) and positive(m["hg_over_grad"]) and positive(m["hg_ms"]), (name, mname)
        # unrolled: a difference of two timings (outer step − plain steps), noisy at --quick's few rounds
        for mname in ("unrolled", "neumann-fused"):
            m = p["methods"][mname]
            assert math.isfinite(m["hg_over_step"]) and positive(m["outer_step_ms"]), (name, mname)
        assert p["methods"]["neumann-fused"]["hvps"] == 6
        assert p["methods"]["neumann"]["hvps"] == 6 and p["methods"]["neumann-nores"]["hvps"] == 5
        assert positive(p["methods"]["neumann"]["hg_over_floor"]) and positive(
            p["methods"]["neumann"]["floor_over_grad"]
        )
        for mname in ("neumann", "unrolled", "none"):  # memory: one fresh process each
            m = p["methods"][mname]
            assert "mem_error" not in m, m.get("mem_error")
            assert positive(m["mem_ratio"]) and positive(m["mem_peak_mib"]), (name, mname)
        assert p["methods"]["none"]["mem_ratio"] == 1.0
        assert p["methods"]["unrolled"]["mem_ratio"] > 1.0  # the graph of T steps is kept
        if name in ("iris", "mnist"):  # whole runs (skipped for ptb in --quick: its evaluation is slow)
            for mname in ("neumann", "none"):
                m = p["methods"][mname]
                assert m["run"]["status"] == "completed"
                assert positive(m["run_ratio"]) and positive(m["wall_ratio"]), (name, mname)
            assert p["methods"]["none"]["run"] == p["methods"]["neumann"]["run_reference"]
            assert "run" not in p["methods"]["unrolled"]  # whole runs: the run-time targets' rows only
    assert positive(result["problems"]["ptb"]["methods"]["neumann"]["tokens_per_s_from_timings"])
    assert result["problems"]["mnist"]["methods"]["neumann"]["num_hparams"] > 0
    if COMPILER:
        assert positive(result["problems"]["iris"]["compiled_step_over_step"])  # --compile iris
    assert "compiled_step_over_step" not in result["problems"]["mnist"]
    for p in result["problems"].values():  # forward-over-reverse products, timed beside the kept-graph ones
        assert positive(p["hvp_fwd_rev_over_grad"]) and positive(p["fwd_rev_over_rev_rev"])
    # the peer problem, without --peers: hoexp (eager, and compiled CG with a compiler) against the direct solve
    peers = result["peers"]
    assert set(peers["skipped"]) == {"hypertorch", "torchopt", "jaxopt"}
    assert peers["rel_error"]["direct solve"] == 0.0 and peers["rel_error"]["hoexp exact"] < 1e-10
    assert peers["rel_error"]["hoexp CG-10"] < 1e-2 and positive(peers["ratios"]["hoexp exact / direct solve"])
    if COMPILER:
        assert abs(peers["rel_error"]["hoexp CG-10 compiled"] - peers["rel_error"]["hoexp CG-10"]) < 1e-8
    targets = result["targets"]
    assert {t["problem"] for t in targets} == {"iris", "mnist", "ptb", "peers"}
    assert all(positive(t["value"]) and isinstance(t["met"], bool) for t in targets)
