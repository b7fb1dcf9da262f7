"""precision=bf16|fp16: inner training steps under autocast, the hypergradient path in float32."""

import pytest
import torch

from hoexp.cli import compose_spec
from hoexp.config.build import build, build_method
from hoexp.engine import start
from hoexp.engine.precision import Precision
from hoexp.errors import ConfigError
from hoexp.method.base import InnerState, outer_step, train_inner
from hoexp.method.curvature import SplitLoss
from hoexp.method.ift import ift_hypergradient
from hoexp.method.solvers import Neumann
from hoexp.task.streams import FullBatch

SMALL = ["model.width=32", "progress=false", "hp.weight_decay.granularity=per_layer", "method.terms=3"]


def _setup(*overrides):
    spec = compose_spec([*SMALL, *overrides])[0]
    exp = build(spec)
    st = start(exp)
    return spec, exp, st.inner.params, st.raw


def test_bf16_inner_steps_train_and_leave_the_hypergradient_in_fp32():
    spec, exp, params, raw = _setup("precision=bf16")
    problem = exp.problem
    stream = problem.with_noise(FullBatch(exp.data.train), 0)
    val = (exp.data.val.x, exp.data.val.y)
    before = float(problem.train_loss(params, raw, next(stream)))
    calls = []
    logits = problem.logits

    def recording(*args, **kwargs):
        out = logits(*args, **kwargs)
        calls.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    problem.logits = recording
    inner = InnerState(params, exp.inner_opt.init(params))
    hg, state, stats = outer_step(
        build_method(spec), problem, exp.inner_opt, inner, raw, stream, val, 40, step=exp.runtime.step()
    )
    inner, hyper = calls[:40], calls[40:]
    assert all(c == (True, torch.bfloat16) for c in inner)  # the 40 training steps: autocast, bf16 logits
    assert hyper and all(c == (False, torch.float32) for c in hyper)  # validation gradient, HVPs, mixed term
    assert stats["inner/loss"] < 0.8 * before  # the loss falls
    assert all(p.dtype == torch.float32 for p in state.params.values()) and all(
        h.dtype == torch.float32 for h in hg.values()
    )
    # The hypergradient is the float32 one at the weights the bf16 steps reached.
    problem.logits = logits
    batch = next(problem.with_noise(FullBatch(exp.data.train), 0))  # full batch: the method's Hessian batch
    ref, _ = ift_hypergradient(
        SplitLoss(*problem.train_parts(batch)),
        lambda w, lam: problem.val_loss(w, lam, val),
        state.params,
        raw,
        Neumann(3, spec.method.alpha, True),
    )
    assert all(torch.equal(hg[k], ref[k]) for k in hg)


def test_fp16_scales_the_loss_and_skips_overflowing_steps():
    spec, exp, params, raw = _setup("precision=fp16")
    problem = exp.problem
    precision = exp.runtime.precision = Precision("fp16", "cpu", init_scale=2.0**40, growth_interval=3)  # overflows
    step = exp.runtime.step()
    stream = problem.with_noise(FullBatch(exp.data.train), 0)
    state = InnerState(params, exp.inner_opt.init(params))
    state, _, _ = train_inner(problem, exp.inner_opt, state, raw, stream, 1, step=step)
    assert all(torch.equal(state.params[k], params[k]) for k in params)  # skipped
    assert precision.state == {"scale": 2.0**39, "good": 0}
    before = float(problem.train_loss(params, raw, next(stream)))
    state, loss, _ = train_inner(problem, exp.inner_opt, state, raw, stream, 60, step=step)
    assert precision.scale() < 2.0**39 and float(loss) < 0.8 * before
    good = dict(precision.state)
    precision.load_state_dict(precision.state_dict())
    assert precision.state == good


def test_precision_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="precision=bf16 applies to plain training steps, and method=unrolled"):
        compose_spec(["precision=bf16", "method=unrolled"])
    with pytest.raises(ConfigError, match="with dtype=float64 use precision=fp32"):
        compose_spec(["precision=bf16", "dtype=float64"])
    with pytest.raises(ConfigError, match="precision=fp16 .* compile=true"):
        compose_spec(["precision=fp16", "compile=true"])
    with pytest.raises(ConfigError, match="precision='fp8' is not valid"):
        compose_spec(["precision=fp8"])
    for ok in (["precision=bf16", "method=fd", "compile=true"], ["precision=fp16", "method=cg"]):
        compose_spec(ok)
