"""``method=pes`` (hoexp.method.es): PES and NRES are unbiased for the Gaussian-smoothed whole-horizon loss of a
linear recursion (closed form) while truncated ES is not; NRES has the lower variance where the loss forgets early
truncations; vmap and loop agree; a resumed run continues bit for bit; the CLI runs it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

import hoexp.method.es as es
from hoexp.cli import compose_spec
from hoexp.config.build import build, build_method
from hoexp.config.run import Preempted, Run
from hoexp.errors import ConfigError
from hoexp.method.base import InnerState, outer_step
from hoexp.method.es import ESMethod
from hoexp.optim.sgd import sgd
from hoexp.task.streams import FullBatch
from hoexp.types import OuterStep
from tests.stopping import StopAt, metrics

ROOT = Path(__file__).resolve().parents[1]
D = torch.float64


# ------------------------------------------------------------------------------------ a closed-form problem
class LinearRecursion:
    """``L_T = ½ Σ h (w − λ)²`` trained by plain SGD (rate η): ``w ← a w + (1 − a) λ``, ``a = 1 − ηh``, per step, so
    after truncation ``t`` of ``K`` steps at ``λ + σε_s`` in truncation ``s``,
    ``w_t = A^t w_0 + Σ_{s≤t} A^{t−s}(1 − A)(λ + σε_s)`` with ``A = a^K``. ``L_V = Σ (w − c)²``: its expectation over
    the perturbations is ``Σ (μ_t − c)² + const``, ``μ_t = A^t w_0 + (1 − A^t) λ``, whose gradient is exact."""

    compile, precision, batch_dim = False, None, 0

    def __init__(self, h, c, eta, steps):
        self.h, self.c, self.eta, self.steps = h, c, eta, steps
        self.compiled = {}
        self.family = SimpleNamespace(optimizer_overrides=lambda raw, t: {})

    def train_loss(self, params, raw, batch):
        return 0.5 * (self.h * (params["w"] - raw["lam"]) ** 2).sum()

    step_loss = train_loss

    def val_loss(self, params, raw, batch):
        return ((params["w"] - self.c) ** 2).sum()

    def means(self, w0, lam, truncations):
        """``(μ_t, 1 − A^t)`` for t = 1..truncations."""
        A = (1 - self.eta * self.h) ** self.steps
        return [(A**t * w0 + (1 - A**t) * lam, 1 - A**t) for t in range(1, truncations + 1)]

    def whole_horizon_gradient(self, w0, lam, truncations):
        """``∇_λ Σ_t E L_V(w_t)``: every truncation's perturbation reaches ``w_t`` (PES's and NRES's objective)."""
        return sum(2 * (mu - self.c) * s for mu, s in self.means(w0, lam, truncations))

    def truncated_gradient(self, w0, lam, truncations):
        """What truncated ES estimates: each truncation from the unperturbed state, ``Σ_t 2(μ_t − c)(1 − A)``."""
        A = (1 - self.eta * self.h) ** self.steps
        return sum(2 * (mu - self.c) * (1 - A) for mu, _ in self.means(w0, lam, truncations))


H, C, W0, LAM = (torch.tensor(v, dtype=D) for v in ([1.0, 4.0], [1.0, -1.0], [0.0, 0.0], [0.3, 0.2]))
ETA, K, T, SIGMA, PARTICLES = 0.05, 5, 6, 0.5, 4096


def sample(variant, antithetic=True, particles=PARTICLES, seed=0, monkeypatch=None):
    """One run of ``T`` truncations at fixed λ; returns the estimates ``[T, d]`` and every pair's (or particle's)
    contribution to them ``[T, n, d]`` (i.i.d. over ``n``: each pair's particles see only their own noise), read by
    a spy on :func:`hoexp.method.es.es_estimate`, whose mean is checked to be the estimate."""
    task, opt = LinearRecursion(H, C, ETA, K), sgd(ETA)
    method = ESMethod(variant, particles, SIGMA, antithetic, vectorize=True, seed=seed)
    seen = []
    original = es.es_estimate
    monkeypatch.setattr(es, "es_estimate", lambda losses, v, s: seen.append((losses, v)) or original(losses, v, s))
    inner, estimates = InnerState({"w": W0.clone()}, opt.init({"w": W0})), []
    for _ in range(T):
        res = method(OuterStep(task, opt, inner, {"lam": LAM}, [None] * K, [], None))
        inner = res.inner
        estimates.append(res.hypergrad["lam"])
    contributions = []
    for losses, v in seen:
        c = losses[:, None] * v["lam"] / SIGMA  # each particle's term, times N
        contributions.append((c[: particles // 2] + c[particles // 2 :]) / 2 if antithetic else c)
    contributions = torch.stack(contributions)
    estimates = torch.stack(estimates)
    assert torch.allclose(contributions.mean(1), estimates, rtol=1e-12, atol=1e-12)  # what the method averaged
    return estimates, contributions


def mean_and_se(per_pair):
    return per_pair.mean(0), per_pair.std(0) / per_pair.shape[0] ** 0.5


@pytest.mark.parametrize("variant,antithetic", [("pes", True), ("pes", False), ("nres", True)])
def test_pes_and_nres_are_unbiased_for_the_smoothed_whole_horizon_loss(variant, antithetic, monkeypatch):
    """Without antithetic pairs each particle's term carries ``L²``'s noise: 4x the particles for the same power."""
    task = LinearRecursion(H, C, ETA, K)
    _, contributions = sample(variant, antithetic, PARTICLES * (1 if antithetic else 4), monkeypatch=monkeypatch)
    mean, se = mean_and_se(contributions.sum(0))  # the whole horizon: Σ_t ĝ_t, per pair
    truth = task.whole_horizon_gradient(W0, LAM, T)
    assert ((mean - truth).abs() < 4 * se).all(), (mean, truth, se)
    bias = (truth - task.truncated_gradient(W0, LAM, T)).abs()
    assert (8 * se < bias).all(), (se, bias)  # the power to tell a truncation-biased estimator apart
    for t in range(T):  # and every truncation's estimate is unbiased for its own smoothed loss
        m, s = mean_and_se(contributions[t])
        assert (
            (m - task.whole_horizon_gradient(W0, LAM, t + 1) + task.whole_horizon_gradient(W0, LAM, t)).abs() < 4 * s
        ).all()


def test_truncated_es_is_biased_by_the_short_horizon(monkeypatch):
    task = LinearRecursion(H, C, ETA, K)
    _, contributions = sample("tes", monkeypatch=monkeypatch)
    mean, se = mean_and_se(contributions.sum(0))
    truth = task.whole_horizon_gradient(W0, LAM, T)
    assert ((mean - truth).abs() > 4 * se).all(), (mean, truth, se)  # off by far more than its noise ...
    assert ((mean - task.truncated_gradient(W0, LAM, T)).abs() < 4 * se).all()  # ... by exactly the truncation


def test_nres_has_lower_variance_than_pes_at_equal_cost(monkeypatch):
    """The same particles and truncations; the estimate of the last truncation (what an outer step uses). PES's
    ``ξ`` sums ``T`` perturbations while this loss forgets the early ones (``A`` = 0.77 and 0.33 per truncation)."""
    _, pes = sample("pes", monkeypatch=monkeypatch)
    _, nres = sample("nres", monkeypatch=monkeypatch)
    var_pes, var_nres = pes[-1].var(0), nres[-1].var(0)
    assert (var_nres < 0.8 * var_pes).all(), (var_nres, var_pes)


# ----------------------------------------------------------------------------------------- real problems
BASE = [
    "model.width=5",
    "model.depth=1",
    "model.activation=tanh",
    "dtype=float64",
    "progress=false",
    "optim/inner=momentum",
    "optim.inner.lr=0.2",
    "method=pes",
    "method.particles=4",
    "method.sigma=0.3",
]
FAMILIES = {
    "decay_and_gaussian_dropout": [
        "hp=[weight_decay,dropout]",
        "hp.weight_decay.init=0.05",
        "hp.dropout.relaxation=gaussian",
        "hp.dropout.init=0.1",
    ],
    "lr": ["hp=lr"],  # a path-only family: its perturbed rates reach the optimizer as per-particle overrides
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["pes", "nres"])
def test_vmap_and_loop_give_the_same_estimate(family, variant):
    out = {}
    for vectorize in (True, False):
        spec = compose_spec([*BASE, *FAMILIES[family], f"method.variant={variant}", f"method.vectorize={vectorize}"])[0]
        exp = build(spec)
        params = {k: v.detach().clone() for k, v in exp.model.named_parameters()}
        raw = exp.problem.family.init(params)
        stream = exp.problem.with_noise(FullBatch(exp.data.train), 0)
        val = (exp.data.val.x, exp.data.val.y)
        inner, hgs = InnerState(params, exp.inner_opt.init(params)), []
        for _ in range(2):  # the second truncation starts from the carried particles
            hg, inner, _ = outer_step(exp.method, exp.problem, exp.inner_opt, inner, raw, stream, val, 3)
            hgs.append(hg)
        out[vectorize] = hgs, exp.method.state_dict()
    (hg_v, state_v), (hg_l, state_l) = out[True], out[False]
    for a, b in zip(hg_v, hg_l):
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-10, atol=1e-12), k
    assert any(float(v.abs().max()) > 1e-6 for v in hg_v[-1].values())
    for k, w in state_v["params"].items():
        assert torch.allclose(w, state_l["params"][k], rtol=1e-10, atol=1e-12), k
    assert torch.equal(state_v["rng"], state_l["rng"])


def test_one_truncation_estimates_the_unrolled_hypergradient():
    """From a common state, one truncation of every variant is ES on ``L_V(w_K(λ))``: as σ → 0 its mean is the
    hypergradient that reverse mode through the same ``K`` steps (same batches, same dropout noise) computes."""
    problem = [
        *[o for o in BASE if not o.startswith("method")],
        *FAMILIES["decay_and_gaussian_dropout"],
        "hp.weight_decay.granularity=global",
        "hp.dropout.granularity=per_layer",
    ]
    exp = build(compose_spec([*problem, "method=pes", "method.particles=2048", "method.sigma=1e-4"])[0])
    unrolled = build_method(compose_spec([*problem, "method=unrolled"])[0])
    params = {k: v.detach().clone() for k, v in exp.model.named_parameters()}
    raw = exp.problem.family.init(params)
    stream = exp.problem.with_noise(FullBatch(exp.data.train), 0)
    batches, val = [next(stream) for _ in range(4)], (exp.data.val.x, exp.data.val.y)
    inner = InnerState(params, exp.inner_opt.init(params))
    es_hg, _, _ = outer_step(exp.method, exp.problem, exp.inner_opt, inner, raw, iter(batches), val, 4)
    exact, _, _ = outer_step(unrolled, exp.problem, exp.inner_opt, inner, raw, iter(batches), val, 4)
    a, b = (torch.cat([h[k].reshape(-1) for k in sorted(h)]) for h in (es_hg, exact))
    assert len(a) == 3 and float(b.norm()) > 1e-3
    assert float((a - b).norm() / b.norm()) < 0.2  # 1024 pairs, dimension 3: relative noise ≈ √(4/1024) ≈ 0.06


def test_particles_restart_with_the_inner_run_and_refusals():
    spec = compose_spec([*BASE, "hp=weight_decay", "hp.weight_decay.granularity=global"])[0]
    method = build_method(spec)
    exp = build(spec)
    params = {k: v.detach().clone() for k, v in exp.model.named_parameters()}
    raw = exp.problem.family.init(params)
    batch = (exp.data.train.x, exp.data.train.y)
    outer_step(
        method,
        exp.problem,
        exp.inner_opt,
        InnerState(params, exp.inner_opt.init(params)),
        raw,
        iter([batch] * 3),
        batch,
        3,
    )
    assert set(method.state_dict()) == {"params", "opt", "rest", "noise", "rng"}
    method.load_state_dict({})  # what reset_inner does: the particles go, the generator goes on
    assert set(method.state_dict()) == {"rng"}
    for bad, why in (("method.particles=3", "particles must be even"), ("method.sigma=0", "sigma must be > 0")):
        with pytest.raises(ConfigError, match=why) as e:
            build(compose_spec(["method=pes", "model.width=8", bad])[0])
        assert "\n" not in str(e.value)


def test_data_parallel_needs_the_loop_and_spread_particles_need_not():
    from hoexp.engine.distributed import Context

    data_parallel = compose_spec(["method=pes", "model.width=8", "method.spread=false"])[0]
    with pytest.raises(ConfigError, match="method=pes does not run data-parallel .*method.vectorize=false") as e:
        build(data_parallel, Context(rank=0, world_size=2))  # 2 processes
    assert "\n" not in str(e.value)
    exp = build(compose_spec(["method=pes", "model.width=8"])[0], Context(rank=0, world_size=2))  # spread: vmapped
    assert exp.runtime.spread and not exp.runtime.data_parallel


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("variant", ["pes", pytest.param("nres", marks=pytest.mark.slow)])
def test_checkpoint_and_resume_mid_run_is_bit_exact(tmp_path, variant):
    args = [
        "model.width=8",
        "progress=false",
        "outer_steps=4",
        "inner_steps=3",
        "checkpoint_every=1",
        "method=pes",
        f"method.variant={variant}",
        "method.particles=4",
        "optim.outer.lr=0.05",
        "hp.weight_decay.granularity=per_layer",
    ]
    quiet = dict(console=Console(file=io.StringIO()))
    Run(compose_spec(args)[0], tmp_path / "ref", **quiet).execute()
    with pytest.raises(Preempted):
        Run(compose_spec(args)[0], tmp_path / "cut", loggers=[StopAt(3)], **quiet).execute()
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["method_state"]["params"]["layers.0.weight"].shape[0] == 4
    Run(compose_spec([*args, "resume=true"])[0], tmp_path / "cut", **quiet).execute()
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "ref")  # bit for bit
    ref, cut = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ref", "cut"))
    assert cut["final"] == ref["final"] and cut["hp_final"] == ref["hp_final"]
    # ... and the carried particles are what make it so: resuming without them departs from the reference.
    with pytest.raises(Preempted):
        Run(compose_spec(args)[0], tmp_path / "cold", loggers=[StopAt(3)], **quiet).execute()
    ckpt = torch.load(tmp_path / "cold" / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "method_state": {"rng": ckpt["method_state"]["rng"]}}, tmp_path / "cold" / "checkpoint.pt")
    Run(compose_spec([*args, "resume=true"])[0], tmp_path / "cold", **quiet).execute()
    assert metrics(tmp_path / "cold")[:3] == metrics(tmp_path / "ref")[:3]
    assert metrics(tmp_path / "cold")[3] != metrics(tmp_path / "ref")[3]


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [[], ["experiment=mnist_dropout", "dataset.val_size=1000", "eval_every=1"]], ids=["iris", "mnist_dropout"]
)
def test_cli_runs_pes(tmp_path, extra):
    r = subprocess.run(
        [sys.executable, "-m", "hoexp", "run", *extra, "method=pes", "outer_steps=2", "inner_steps=2", "progress=false"]
        + [f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["hypergradients"] == 2
    lines = metrics(tmp_path)
    assert all(k in lines[-1] for k in ("hypergrad/norm", "es/val_loss_mean", "es/val_loss_std"))
