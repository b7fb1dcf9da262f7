"""``run.compile=true``: plain training steps through ``torch.compile`` give the eager steps' results."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from rich.console import Console

from hoexp.cli import compose_spec
from hoexp.config.build import build
from hoexp.config.run import run_experiment
from hoexp.engine import start
from hoexp.errors import ConfigError, HoexpError
from hoexp.method.base import train_inner

# torch.compile's CPU backend (inductor) builds C++ kernels; without a compiler compile=true reports
# a one-line error (tested below) and these comparisons cannot run.
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="torch.compile on CPU needs a C++ compiler"
)


def _train(overrides, compile_, steps=12):
    spec = compose_spec(["progress=false", "threads=1", *overrides])[0]
    exp = build(spec)
    exp.runtime.compile = compile_  # what compile=true sets (set here: path methods refuse the key)
    st = start(exp)
    state, loss, gnorm = train_inner(
        exp.problem, exp.inner_opt, st.inner, st.raw, st.train, steps, step=exp.runtime.step()
    )
    return exp, state, loss, gnorm


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize(
    "overrides",
    [
        ["hp=weight_decay", "optim/inner=nesterov"],  # the default problem: first-step branch of the buffer
        ["hp=lr", "hp.lr.granularity=per_step", "optim/inner=adam", "method=unrolled"],  # tensor overrides per step
        ["hp=dropout", "optim/inner=sgd"],  # dropout noise in the batch
    ],
    ids=["wd-nesterov", "lr-per-step-adam", "dropout-sgd"],
)
def test_compiled_steps_match_eager_steps(overrides):
    _, eager, loss_e, gnorm_e = _train(overrides, False)
    exp, compiled, loss_c, gnorm_c = _train(overrides, True)
    assert exp.runtime.compiled  # the compiled path ran
    assert compiled.step == eager.step == 12
    for k, v in eager.params.items():
        torch.testing.assert_close(compiled.params[k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gnorm_c, gnorm_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides", [["hp=weight_decay"], ["hp=weight_decay", "hp.weight_decay.granularity=layer_and_weight"]]
)
def test_the_compiled_training_step_is_one_graph(overrides):
    """No graph break in compile=true's step (dynamo only traces, no C++ compile): the weight-decay penalty's
    autograd.Function broke it into 7 graphs, 3.5× slower than eager, until it became the plain expression
    under torch.compile."""
    import functools

    from hoexp.method.base import plain_step

    spec = compose_spec(["progress=false", "threads=1", "model.width=16", *overrides])[0]
    exp = build(spec)
    st = start(exp)
    raw = {k: v.detach() for k, v in st.raw.items()}
    step = functools.partial(plain_step, exp.problem, exp.inner_opt)
    args = (st.inner.params, st.inner.opt_state, raw, next(st.train), exp.problem.family.optimizer_overrides(raw, 0))
    explained = torch._dynamo.explain(step)(*args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
@needs_compiler
def test_a_run_with_compile_completes(tmp_path):
    spec, text = compose_spec(["progress=false", "outer_steps=2", "inner_steps=5", "compile=true"])
    summary = run_experiment(spec, tmp_path, config_text=text, console=Console(file=io.StringIO()))
    assert summary["status"] == "completed" and summary["hypergradients"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_a_compile_failure_is_one_line_naming_the_fix(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler found\nlong detail")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(
        HoexpError,
        match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler found\); run with "
        r"compile=false$",
    ):
        _train(["hp=weight_decay"], True, steps=1)


@pytest.mark.parametrize("method", ["unrolled", "truncated", "forward", "reversible", "hd"])
def test_compile_is_refused_for_methods_without_plain_steps(method):
    extra = {
        "forward": ["hp.weight_decay.granularity=global"],
        "reversible": ["optim/inner=momentum"],
        "hd": ["hp=lr"],
    }.get(method, [])
    with pytest.raises(
        ConfigError, match=f"compile=true compiles plain training steps, and method={method} takes none"
    ):
        compose_spec([f"method={method}", "compile=true", *extra])


SABA = ["method=saba", "dataset.batch_size=0", "dataset.val_batch_size=0", "method.batch_size=16"]
SABA += ["method.val_batch_size=16", "optim/inner=sgd", "optim.inner.lr=0.05", "model.width=8", "threads=1"]


@pytest.mark.slow
@needs_compiler
def test_saba_with_method_compile_takes_the_eager_runs_steps_and_logs_its_compile_apart(tmp_path):
    """``method=saba method.compile=true`` (inductor) on Iris, chunks of 16 (tails of 12 and 8): the same run as
    eager to float32 rounding; its compile warm-up is logged at outer step 1 as ``time/compile_s``, summed in
    ``compile_time_s`` and not in ``time/outer_step_s``."""
    args = [*SABA, "outer_steps=20", "inner_steps=2", "progress=false"]
    quiet = {"console": Console(file=io.StringIO())}
    eager = run_experiment(compose_spec(args)[0], tmp_path / "eager", **quiet)
    compiled = run_experiment(compose_spec([*args, "method.compile=true"])[0], tmp_path / "compiled", **quiet)
    assert compiled["final"]["val_loss"] == pytest.approx(eager["final"]["val_loss"], rel=1e-5)
    assert compiled["hp_final"] == pytest.approx(eager["hp_final"], rel=1e-4, abs=1e-6)
    lines = [json.loads(ln) for ln in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    first = lines[1]
    # Relative, not absolute: dynamo traces anew each run, but inductor's on-disk cache may already hold the graph
    # (CI measured a 0.84 s warm-up), and a step of 2 tiny Iris inner steps takes milliseconds either way.
    assert first["step"] == 1 and 0 < first["time/outer_step_s"] < first["time/compile_s"]
    assert compiled["compile_time_s"] == pytest.approx(sum(ln.get("time/compile_s", 0.0) for ln in lines))
    assert "compile_time_s" not in eager


def test_method_compile_is_what_compile_true_points_single_loop_methods_to():
    with pytest.raises(ConfigError, match=r"method=saba takes none .*; method.compile=true compiles its minibatch"):
        build(compose_spec([*SABA, "compile=true"])[0])
