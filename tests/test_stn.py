"""Self-tuning networks (``method=stn``): the structured response at its centre, the hypergradient against
the closed-form ridge answer as the perturbation shrinks, checkpoint/resume, refusals and the CLI."""

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from rich.console import Console

from hoexp import tree
from hoexp.cli import compose_spec
from hoexp.config.run import Preempted, Run
from hoexp.errors import ConfigError
from hoexp.hp.weight_decay import WeightDecay
from hoexp.method.base import InnerState, outer_step
from hoexp.method.stn import STN, init_response, offset, respond, shift, stn_hypergradient
from hoexp.optim import build_optimizer
from hoexp.types import OuterStep
from tests.problems import Ridge, rel_err
from tests.test_long_horizon_ift import _StopAt, relu_mlp, tiny_lstm

D = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def random_response(params, raw, seed=0):
    """A response with non-zero ``V`` (the initial one is flat), so the centre test means something."""
    g = torch.Generator().manual_seed(seed)
    response = init_response(params, list(params), tree.numel(raw), g)
    return {
        k: (torch.randn(v.shape, generator=g, dtype=v.dtype) if k.startswith("v:") else v) for k, v in response.items()
    }


@pytest.mark.parametrize("make", [relu_mlp, tiny_lstm], ids=["mlp", "lstm"])
def test_response_is_the_base_model_at_the_centre_and_row_scales_away_from_it(make):
    problem, w, raw, batch = make()
    response = random_response(w, raw)
    at_centre = respond(w, response, offset(raw, raw))
    assert all(torch.equal(at_centre[k], w[k]) for k in w)  # exactly W0
    for masks in (None, problem.masks(raw, batch)):
        assert torch.equal(problem.logits(at_centre, batch[0], masks), problem.logits(w, batch[0], masks))
    # Away from the centre: W0 + (V δ) ⊙_rows W1, per parameter, linear in δ.
    delta = torch.randn(tree.numel(raw), generator=torch.Generator().manual_seed(1), dtype=D)
    moved = respond(w, response, delta)
    for k, p in w.items():
        s = response["v:" + k] @ delta
        expected = p + (s.reshape(s.shape + (1,) * (p.ndim - 1)) if p.ndim else s[0]) * response["w1:" + k]
        assert torch.allclose(moved[k], expected, rtol=0, atol=1e-14)
    twice = shift(response, 2 * delta)
    assert all(torch.allclose(twice[k], 2 * (moved[k] - w[k]), rtol=0, atol=1e-13) for k in w)


def test_hypergradient_is_the_validation_gradient_through_the_response():
    """``∇_λ L_V(ŵ(λ))`` at λ0 = ``∂L_V/∂w · (V ⊙_rows W1)`` (no direct term in the classification loss)."""
    problem, w, raw, batch = relu_mlp()
    response = random_response(w, raw)
    hg, _ = stn_hypergradient(problem, w, response, raw, batch)
    w_ = tree.detached(w, requires_grad=True)
    gw = dict(zip(w_, torch.autograd.grad(problem.val_loss(w_, raw, batch), list(w_.values()))))
    flat = sum(
        (gw[k].reshape(response["w1:" + k].shape[0], -1) * response["w1:" + k].reshape(gw[k].shape[0], -1)).sum(1)
        @ response["v:" + k]
        for k in w
    )
    assert rel_err(tree.flatten(hg[k] for k in raw), flat) < 1e-12


@dataclass
class GlobalRidge:
    """Ridge with one global decay: ``L_T = ½‖Xw − y‖²/n + ½ e^r ‖w‖²`` through :class:`WeightDecay`, ``w`` one
    output unit (``[1, d]``: its row scaling spans every direction), ``train_parts`` for Δ-STN's linearization."""

    ridge: Ridge
    family: WeightDecay = field(default_factory=lambda: WeightDecay("global", 0.1, ("*",)))

    def outputs(self, w, raw):
        return self.ridge.X @ w["w"][0]

    def output_loss(self, z):
        r = z - self.ridge.y
        return 0.5 * (r @ r) / len(r)

    def train_loss(self, params, raw, batch):
        return self.output_loss(self.outputs(params, raw)) + self.family.penalty(params, raw)

    def train_parts(self, batch):
        return self.outputs, self.output_loss, self.family.penalty

    def val_loss(self, params, raw, batch):
        return self.ridge.val_loss({"w": params["w"][0]}, None)

    def w_star(self, r):
        return self.ridge.w_star(r.expand(self.ridge.X.shape[1]))

    def exact_hypergradient(self, r):
        r = r.detach().clone().requires_grad_(True)
        return torch.autograd.grad(self.ridge.val_loss({"w": self.w_star(r)}, None), r)[0]


@pytest.mark.parametrize("variant", ["stn", "delta"])
def test_hypergradient_approaches_the_exact_ridge_answer_as_sigma_shrinks(variant):
    """After fitting the response at a fixed λ0 from the trained weights w*(λ0), STN's hypergradient has the
    error of its O(σ)-wide perturbations (Δ-STN's linearization is exact on a linear model)."""
    task = GlobalRidge(Ridge.make(d=4))
    r0 = torch.tensor(-1.0, dtype=D)
    truth = task.exact_hypergradient(r0)
    A = task.ridge.X.T @ task.ridge.X / len(task.ridge.y)
    opt = build_optimizer("sgd", lr=0.1 / (float(torch.linalg.eigvalsh(A).max()) + float(torch.exp(r0))))
    errors = []
    for sigma in (1.0, 0.3, 0.03):
        method = STN(variant, sigma)
        w0 = {"w": task.w_star(r0).reshape(1, -1)}
        st = OuterStep(task, opt, InnerState(w0, opt.init(w0)), {"weight_decay": r0}, [None] * 400, [], None)
        res = method(st)
        errors.append(rel_err(res.hypergrad["weight_decay"], truth))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01, errors
    assert errors[0] < 0.05  # even σ = 1 (e^{±1} in the decay) is close


@pytest.mark.parametrize("variant", ["stn", "delta"])
def test_response_clip_bounds_each_step_of_the_response_and_a_loose_one_changes_nothing(variant):
    """``response_clip=c``: one plain-SGD step moves the response by at most ``lr·c`` (the logged norm is the one
    before the clip); a clip above every step's norm gives the unclipped run bit for bit."""
    task = GlobalRidge(Ridge.make(d=4))
    r0, opt = torch.tensor(-1.0, dtype=D), build_optimizer("sgd", lr=0.05)

    def one_step(clip, steps=1):
        w0 = {"w": task.w_star(r0).reshape(1, -1) + 0.1}
        st = OuterStep(task, opt, InnerState(w0, opt.init(w0)), {"weight_decay": r0}, [None] * steps, [], None)
        method = STN(variant, 0.3, response_clip=clip)
        res = method(st)
        return method.carried["response"], res.scalars["stn/response_grad_max"]

    fresh = init_response({"w": torch.zeros(1, 4, dtype=D)}, ["w"], 1, STN(variant, 0.3).generator(0, 1))
    free, norm = one_step(None)
    assert norm > 1e-3  # the clip below must bind
    clipped, norm_clipped = one_step(norm / 100)
    assert norm_clipped == norm  # logged before the clip
    moved = tree.norm({k: clipped[k] - fresh[k] for k in fresh})
    assert float(moved) <= 0.05 * norm / 100 * (1 + 1e-9) and float(moved) > 0
    assert float(tree.norm({k: free[k] - fresh[k] for k in fresh})) > 10 * float(moved)
    loose, _ = one_step(1e9, steps=6)
    free6, _ = one_step(None, steps=6)
    assert all(torch.equal(loose[k], free6[k]) for k in free6)


@pytest.mark.parametrize("variant", ["stn", "delta"])
def test_one_outer_step_on_the_lstm_and_a_reset(variant):
    problem, w, raw, batch = tiny_lstm()
    opt = build_optimizer("adam", lr=1e-2)
    method = STN(variant, 0.5)
    st = OuterStep(problem, opt, InnerState(w, opt.init(w)), raw, [batch] * 3, [], batch)
    res = method(st)
    assert set(res.hypergrad) == set(raw) and all(torch.isfinite(v).all() for v in res.hypergrad.values())
    assert float(tree.norm(res.hypergrad)) > 0 and res.inner.step == 3
    assert set(method.state_dict()) == {"response", "response_opt", "centre", "calls"}
    method.load_state_dict({})  # reset_inner: a fresh response, initialized from (seed, step)
    assert method.carried == {} and method.calls == 1  # the steps run are counted over the run (method.hold)
    again = method(st)
    assert torch.equal(tree.flatten(again.hypergrad.values()), tree.flatten(res.hypergrad.values()))


@pytest.mark.parametrize("variant", ["stn", "delta"])
def test_an_outer_step_reads_the_device_a_fixed_number_of_times(variant, monkeypatch):
    """Perturbations are drawn on the host and moved; the inner steps never wait for the device."""
    from hoexp.config.build import build_method
    from tests.test_host_syncs import SMALL_MNIST, HostSyncs, setup

    counts = []
    for T in (3, 9):
        spec, exp, state, raw, train, val = setup(*SMALL_MNIST, "hp=dropout", "method=stn", f"method.variant={variant}")
        m = build_method(spec)
        outer_step(m, exp.problem, exp.inner_opt, state, raw, train, next(val), 2)  # warm-up: the response exists
        with HostSyncs(monkeypatch) as syncs:
            outer_step(m, exp.problem, exp.inner_opt, state, raw, train, next(val), T)
        counts.append(syncs.count)
    assert counts[0] == counts[1] <= 2, counts  # the logged scalars, read together at the end


# ------------------------------------------------------------------------------------------ runs
IRIS = ["model.width=8", "progress=false", "outer_steps=5", "inner_steps=4", "checkpoint_every=1", "method=stn"]


def _metrics(run_dir):
    lines = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if not k.startswith("time/")} for ln in lines]


@pytest.mark.parametrize("variant", ["stn", "delta"])
def test_resume_mid_run_is_bit_exact_and_needs_the_carried_response(tmp_path, variant):
    args = [*IRIS, f"method.variant={variant}"]
    quiet = dict(console=Console(file=io.StringIO()))
    ref = Run(compose_spec(args)[0], tmp_path / "ref", **quiet)
    ref.execute()
    with pytest.raises(Preempted):
        Run(compose_spec(args)[0], tmp_path / "cut", loggers=[_StopAt(3)], **quiet).execute()
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and set(ckpt["method_state"]) == {"response", "response_opt", "centre", "calls"}
    Run(compose_spec([*args, "resume=true"])[0], tmp_path / "cut", **quiet).execute()
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "ref")  # bit for bit
    # Without the carried response the resumed run departs from the reference.
    with pytest.raises(Preempted):
        Run(compose_spec(args)[0], tmp_path / "cold", loggers=[_StopAt(3)], **quiet).execute()
    ckpt = torch.load(tmp_path / "cold" / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "method_state": {}}, tmp_path / "cold" / "checkpoint.pt")
    Run(compose_spec([*args, "resume=true"])[0], tmp_path / "cold", **quiet).execute()
    assert _metrics(tmp_path / "cold")[:3] == _metrics(tmp_path / "ref")[:3]
    assert _metrics(tmp_path / "cold")[3] != _metrics(tmp_path / "ref")[3]


def test_hold_fits_the_response_with_the_rates_held_then_tunes_and_resumes_holding_the_same_steps(tmp_path):
    """``method.hold=3``: outer steps 1-3 train W0 and the response but leave λ where it started (no outer update,
    the hypergradient logged); step 4 moves it. A run cut at step 2 and resumed holds step 3 as well."""
    args = [*IRIS, "hp=dropout", "method.hold=3"]
    quiet = dict(console=Console(file=io.StringIO()))
    summary = Run(compose_spec(args)[0], tmp_path / "ref", **quiet).execute()
    rows = [r for r in _metrics(tmp_path / "ref") if "hp/mean" in r]
    start = rows[0]["hp/mean"]
    assert [r["hp/mean"] for r in rows if 1 <= r["step"] <= 3] == [start] * 3
    assert all(r["hypergrad/norm"] > 0 for r in rows if 1 <= r["step"] <= 3)  # computed and logged while held
    assert [r for r in rows if r["step"] == 4][0]["hp/mean"] != start
    assert summary["hypergradients"] == 2  # steps 4 and 5
    with pytest.raises(Preempted):
        Run(compose_spec(args)[0], tmp_path / "cut", loggers=[_StopAt(3)], **quiet).execute()
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["method_state"]["calls"] == 2
    Run(compose_spec([*args, "resume=true"])[0], tmp_path / "cut", **quiet).execute()
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "ref")


def _build(*args):
    from hoexp.config.build import build

    return build(compose_spec(list(args))[0])


def test_refuses_path_only_families_too_many_hyperparameters_and_unmatched_include():
    with pytest.raises(ConfigError, match=r"method=stn fits the best response .* hp=lr .* unrolled"):
        _build("method=stn", "hp=lr", "model.width=4")
    with pytest.raises(ConfigError, match=r"above method.max_hparams=100; use a coarser granularity"):
        _build("method=stn", "method.max_hparams=100", "model.width=16")
    with pytest.raises(ConfigError, match=r"method.include \['nothing\*'\] matches no parameter"):
        _build("method=stn", "method.include=[nothing*]", "model.width=4")
    with pytest.raises(ConfigError, match=r"compile=true"):
        _build("method=stn", "compile=true", "model.width=4")
    assert STN.needs_pathwise_hp is False and STN.differentiates_steps and STN.extra_batches == 0


def _cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", "hoexp", "run", "progress=false", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_cli_runs_on_iris_and_mnist_dropout(tmp_path):
    r = _cli("method=stn", "outer_steps=2", "inner_steps=2", f"hydra.run.dir={tmp_path / 'iris'}")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "iris" / "summary.json").read_text())["hypergradients"] == 2
    r = _cli(
        "experiment=mnist_dropout",
        "method=stn",
        "outer_steps=2",
        "inner_steps=2",
        "eval_every=1",
        f"hydra.run.dir={tmp_path / 'mnist'}",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "mnist" / "summary.json").read_text())
    assert summary["hypergradients"] == 2 and summary["status"] == "completed"
