"""Long-horizon hypergradients: the horizon diagnostic's truth and carried forward mode (RTHO)."""

import io
import json

import torch
from rich.console import Console

from hoexp import tree
from hoexp.cli import compose_spec
from hoexp.config.build import build, build_method
from hoexp.engine import start
from hoexp.method.base import InnerState, outer_step, train_inner
from hoexp.tools.horizon import agreement, central_differences, parse_contender, run_horizon
from tests.problems import Ridge, rel_err

TINY = [
    "model.width=5",
    "model.depth=1",
    "model.activation=tanh",
    "model.bias=false",
    "dtype=float64",
    "progress=false",
    "optim/inner=momentum",
    "optim.inner.lr=0.2",
    "optim.inner.momentum=0.5",
]


def test_central_differences_of_a_converged_run_are_the_ift_answer():
    """On ridge, the final validation loss of a run long enough to converge is L_V(w*(λ)), so the
    diagnostic's truth must equal the closed-form hypergradient."""
    ridge = Ridge.make(n=40, m=30, d=6, seed=3)
    H = ridge.hessian()
    lr = 1.0 / float(torch.linalg.eigvalsh(H)[-1])

    def final_val(raw):
        w = torch.zeros(6, dtype=torch.float64)
        for _ in range(4000):
            wg = w.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(ridge.train_loss({"w": wg}, {"log_decay": raw}), [wg])
            w = w - lr * g
        return float(ridge.val_loss({"w": w}, None))

    truth = central_differences(final_val, ridge.raw, 1e-4)
    assert rel_err(truth, ridge.exact_hypergradient()) < 1e-6


def test_agreement_scores():
    a, b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([2.0, -1.0, -0.5], dtype=torch.float64)
    s = agreement(a, b)
    assert abs(s["sign"] - 2 / 3) < 1e-12
    assert abs(s["cosine"] - 3.75 / 5.25) < 1e-12
    assert agreement(-b, b)["sign"] == 0.0 and agreement(b, b)["rel_error"] == 0.0


def test_horizon_truth_matches_exact_ift_when_training_converges(tmp_path):
    """Full-batch training that converges within each outer step: the long-horizon truth at every
    checkpoint is the IFT hypergradient at w*, which method=exact computes."""
    base = TINY + [
        "hp.weight_decay.granularity=per_layer",
        "hp.weight_decay.init=0.05",
        "outer_steps=2",
        "inner_steps=1500",
        "optim.inner.lr=0.3",
    ]
    spec, _ = compose_spec(base)
    contenders = [
        (parse_contender(t), compose_spec(base + parse_contender(t).overrides)[0])
        for t in ("exact", "t1t2:method.alpha=0.3")
    ]
    res = run_horizon(spec, contenders, tmp_path, at=[0, 1], eps=1e-4)
    for s in (0, 1):
        exact = torch.tensor(res.hypergradients["exact"][s])
        assert rel_err(exact, torch.tensor(res.truth[s])) < 1e-3, (exact, res.truth[s])
    assert res.scores["exact"]["sign"] == 1.0 and res.scores["exact"]["cosine"] > 0.999
    report = json.loads((tmp_path / "horizon.json").read_text())
    assert set(report["scores"]) == {"exact", "t1t2:method.alpha=0.3"} and report["at"] == [0, 1]
    assert (tmp_path / "horizon.png").stat().st_size > 0


def test_carried_forward_mode_is_the_derivative_since_step_zero():
    """method=forward with carry=true, after J outer steps at fixed λ, equals central differences of
    L_V(w_{J·T}(λ)) with λ held constant from step 0 (same batches and dropout noise)."""
    overrides = TINY + [
        "hp=[weight_decay,dropout]",
        "hp.weight_decay.granularity=per_layer",
        "hp.weight_decay.init=0.05",
        "hp.dropout.granularity=per_layer",
        "dataset.batch_size=16",
        "method=forward",
        "method.carry=true",
        "inner_steps=4",
    ]
    spec, _ = compose_spec(overrides)
    exp = build(spec)
    problem = exp.problem
    st = start(exp)
    params, raw = st.inner.params, st.raw
    J, T = 3, spec.run.inner_steps

    def streams():
        return (problem.train_stream(spec.run.seed), problem.val_stream(spec.run.seed))

    method = build_method(spec)
    train, val = streams()
    state = InnerState(params, exp.inner_opt.init(params))
    for _ in range(J):
        val_batch = next(val)
        hg, state, _ = outer_step(method, problem, exp.inner_opt, state, raw, train, val_batch, T)
    carried = tree.flatten(hg.values())

    def final_val(flat):
        lam = tree.unflatten(flat, raw)
        train, _ = streams()
        st, _, _ = train_inner(
            problem, exp.inner_opt, InnerState(params, exp.inner_opt.init(params)), lam, train, J * T
        )
        return float(problem.val_loss(st.params, lam, val_batch))

    fd = central_differences(final_val, tree.flatten(raw.values()), 1e-5)
    assert rel_err(carried, fd) < 1e-6, (carried, fd)

    # Without carry the same method sees only the last T steps: a different (short-horizon) answer.
    short = build_method(compose_spec(overrides[:-2] + ["method.carry=false"] + overrides[-1:])[0])
    train, val = streams()
    state = InnerState(params, exp.inner_opt.init(params))
    for _ in range(J):
        hg, state, _ = outer_step(short, problem, exp.inner_opt, state, raw, train, next(val), T)
    assert rel_err(tree.flatten(hg.values()), fd) > 1e-2

    # The carried tangents are the method's state: saved and restored they continue the same way.
    saved = method.state_dict()
    assert set(saved) == {"tangent_w", "tangent_s"}
    method.load_state_dict({})
    assert method.tangents is None
    method.load_state_dict(saved)
    assert method.tangents is not None


def _hoexp(*args, cwd):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", "hoexp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_horizon_cli_refuses_many_hyperparameters_and_foreign_truth(tmp_path):
    p = _hoexp(
        "check",
        "--horizon",
        "model.width=4",
        "outer_steps=2",
        "inner_steps=2",
        "--out",
        str(tmp_path / "a"),
        cwd=tmp_path,
    )
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "per_layer" in p.stderr and "hoexp: error:" in p.stderr
    small = ["model.width=4", "hp.weight_decay.granularity=global", "outer_steps=2", "inner_steps=2", "dtype=float64"]
    ok = _hoexp(
        "check", "--horizon", *small, "--method", "t1t2", "--at", "0,1", "--out", str(tmp_path / "b"), cwd=tmp_path
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    truth = tmp_path / "b" / "horizon.json"
    again = _hoexp(
        "check",
        "--horizon",
        *small,
        "--method",
        "neumann",
        "--at",
        "0,1",
        "--truth",
        str(truth),
        "--out",
        str(tmp_path / "c"),
        cwd=tmp_path,
    )
    assert again.returncode == 0 and "truth at outer step" not in again.stdout  # reused, not measured again
    assert json.loads((tmp_path / "c" / "horizon.json").read_text())["truth"] == json.loads(truth.read_text())["truth"]
    foreign = _hoexp(
        "check",
        "--horizon",
        *small[:-1],
        "--method",
        "t1t2",
        "--at",
        "0,1",
        "--truth",
        str(truth),
        "--out",
        str(tmp_path / "d"),
        cwd=tmp_path,
    )
    assert foreign.returncode == 2 and "another configuration" in foreign.stderr


def test_horizon_builds_each_contender_once(tmp_path, monkeypatch):
    """``hoexp check --horizon``: each contender composed, validated and checked once, and its method built once
    (the checks' build is reused; it was built a second time for the measurement), a contender with its own
    ``hp.*`` (its own experiment) included."""
    from hoexp.cli import main
    from tests.counting import count_composes_and_builds

    counts = count_composes_and_builds(monkeypatch)
    small = ["model.width=4", "hp.weight_decay.granularity=global", "outer_steps=1", "inner_steps=2", "dtype=float64"]
    contenders = ["--method", "t1t2", "--method", "neumann:hp.weight_decay.init=0.05"]
    main(["check", "--horizon", *small, *contenders, "--at", "0", "--out", str(tmp_path)])
    assert (tmp_path / "horizon.json").exists()
    assert counts["compose"] == counts["validate"] == 3  # the reference (method=none) and two contenders
    built_once = ("method", "optim.inner", "optim.outer", "hp.weight_decay")  # by each of the three checks
    assert all(counts[f"build {k}"] == 3 for k in built_once), counts
    assert counts["build model"] == counts["build dataset"] == 2, counts  # the reference's, the own experiment's


def test_contender_overrides_are_space_separated_like_compare_and_commas_before_a_key_still_split():
    assert parse_contender("neumann").overrides == ["method=neumann"]
    want = ["method=forward", "method.carry=true", "method.decay=0.7"]
    assert parse_contender("forward:method.carry=true method.decay=0.7").overrides == want
    assert parse_contender("forward:method.carry=true,method.decay=0.7").overrides == want
    assert parse_contender("cg:hp.dropout.include=[input,hidden0]").overrides == [
        "method=cg",
        "hp.dropout.include=[input,hidden0]",
    ]


class _Spy:
    """A method that carries state and draws one batch beyond its inner steps (as the IFT's Hessian batch): it
    trains plainly and records the weights each outer step starts from."""

    name = "spy"
    extra_batches = 1
    needs_stationary_point = False
    needs_pathwise_hp = False
    differentiates_steps = False

    def __init__(self):
        self.seen: list[dict] = []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def __call__(self, s):
        from hoexp.types import OuterResult

        self.seen.append({k: v.clone() for k, v in s.inner.params.items()})
        state, _, _ = train_inner(s.task, s.inner_opt, s.inner, s.raw, s.train)
        return OuterResult({k: torch.zeros_like(v) for k, v in s.raw.items()}, state, {})


def test_a_stateful_contender_trains_on_the_reference_batches_on_minibatched_mnist():
    """A contender replayed from step 0 (warm start, carried tangents) must follow the trajectory the truth is
    measured on. Drawing its extra batch from the same stream shifted every later step's batches: on minibatched
    MNIST its weights differed from the reference's from step 2 on."""
    from hoexp.tools.horizon import _contender_hypergradients, reference_run

    spec, _ = compose_spec(
        ["dataset=mnist", "model.width=8", "model.depth=1", "dataset.batch_size=16", "dataset.train_size=256",
         "hp=weight_decay", "hp.weight_decay.granularity=per_layer", "outer_steps=4", "inner_steps=3",
         "progress=false"]
    )  # fmt: skip
    exp = build(spec)
    s0 = start(exp)
    at = [0, 1, 3]
    checkpoints, _ = reference_run(exp, s0, at)
    spy = _Spy()
    _contender_hypergradients(spy, exp, s0.raw, checkpoints, at)
    assert len(spy.seen) == 4
    for step in at:
        ref = checkpoints[step].state
        assert ref is not None
        assert all(torch.equal(spy.seen[step][k], ref.params[k]) for k in ref.params), f"drifted at step {step}"


def test_the_truth_differentiates_the_rest_of_the_run_as_the_engine_takes_it(tmp_path):
    """The truth's remaining run is the engine's outer steps, so a per-step learning rate restarts its schedule at
    every outer step, as in the reference run and in a real one. From checkpoint 0 the truth is then what forward
    mode carried since step 0 gives at the last outer step (same λ, batches and validation split). Trained as one
    stretch of N·T steps instead, every step after the first T took the schedule's last rate: 58% off here."""
    base = TINY[:6] + ["hp=lr", "hp.lr.granularity=per_step", "dataset.batch_size=16", "outer_steps=3", "inner_steps=2"]
    spec, _ = compose_spec(base + ["method=none"])
    carried = parse_contender("forward:method.carry=true")
    quiet = Console(file=io.StringIO())
    res = run_horizon(
        spec, [(carried, compose_spec(base + carried.overrides)[0])], tmp_path, at=[0, 2], eps=1e-5, console=quiet
    )
    hg = torch.tensor(res.hypergradients[carried.label][2], dtype=torch.float64)
    truth = torch.tensor(res.truth[0], dtype=torch.float64)
    assert rel_err(hg, truth) < 1e-6, (hg, truth)
