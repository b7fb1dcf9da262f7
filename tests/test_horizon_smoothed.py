"""The horizon diagnostic's Gaussian-smoothed truth (``--smooth``) and its ES / best-response contenders."""

import math

import pytest
import torch

from hoexp.tools.horizon_truth import Smoothing, central_differences, resolved_sign, smoothed_gradient


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_smoothed_gradient_of_a_quadratic_is_its_exact_gradient_within_the_standard_error():
    """For a quadratic E f(x + σε) = f(x) + σ² tr(A)/2: the smoothed gradient is Ax + b at any σ. The estimate
    lies within 4 standard errors of it, and the error and its standard error shrink like 1/√M."""
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 0.7]], dtype=torch.float64)
    b = torch.tensor([0.3, -1.0, 0.2], dtype=torch.float64)
    x = torch.tensor([0.5, 0.4, -2.0], dtype=torch.float64)
    exact = a @ x + b

    def f(v: torch.Tensor) -> float:
        return float(0.5 * v @ a @ v + b @ v + 3.0)

    small = smoothed_gradient(f, x, 1.5, 100, _gen())
    big = smoothed_gradient(f, x, 1.5, 1600, _gen(1))
    for g in (small, big):
        assert torch.all((g.grad - exact).abs() < 4 * g.stderr), (g.grad, exact, g.stderr)
    ratio = big.stderr / small.stderr
    assert torch.all((ratio > 0.18) & (ratio < 0.32)), ratio  # √(100/1600) = 0.25
    # An estimator missing the 1/σ, or the antithetic halving, is off by a factor that 4 SE does not cover.
    assert (big.grad.norm() - exact.norm()).abs() < 0.1 * exact.norm()


def test_smoothed_gradient_is_the_smoothed_objectives_not_the_exact_one():
    """f = sin(aᵀx): E f(x + σε) = sin(aᵀx)·exp(−σ²‖a‖²/2), so its gradient is the exact one damped: the
    estimate matches the damped gradient within 4 SE and misses the exact one by many."""
    a = torch.tensor([1.0, -0.5], dtype=torch.float64)
    x = torch.tensor([0.2, 0.1], dtype=torch.float64)
    sigma = 0.8
    exact = a * math.cos(float(a @ x))
    smoothed = exact * math.exp(-(sigma**2) * float(a @ a) / 2)
    g = smoothed_gradient(lambda v: float(torch.sin(a @ v)), x, sigma, 2000, _gen(2))
    assert torch.all((g.grad - smoothed).abs() < 4 * g.stderr), (g.grad, smoothed, g.stderr)
    assert torch.all((g.grad - exact).abs() > 8 * g.stderr)


def test_a_linear_control_variate_keeps_the_estimate_unbiased_and_cuts_its_variance():
    """ĝ_j = d + ε_j(Δf_j/2σ − ε_jᵀd) is unbiased whatever d: with d the exact (not smoothed) gradient of sin(aᵀx)
    the estimate still finds the damped, smoothed gradient, with a far smaller standard error than without d
    (where σ‖a‖ is small: f nearly linear over the perturbations); on a quadratic with d its gradient, every pair
    gives the exact answer."""
    a = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    x = torch.tensor([0.2, 0.1, -0.3], dtype=torch.float64)
    sigma = 0.15
    exact = a * math.cos(float(a @ x))
    smoothed = exact * math.exp(-(sigma**2) * float(a @ a) / 2)
    plain = smoothed_gradient(lambda v: float(torch.sin(a @ v)), x, sigma, 400, _gen(4))
    cv = smoothed_gradient(lambda v: float(torch.sin(a @ v)), x, sigma, 400, _gen(4), baseline=exact)
    for g in (plain, cv):
        assert torch.all((g.grad - smoothed).abs() < 4 * g.stderr), (g.grad, smoothed, g.stderr)
    assert torch.all(cv.stderr < 0.6 * plain.stderr), (cv.stderr, plain.stderr)
    wrong = torch.tensor([5.0, 5.0, -5.0], dtype=torch.float64)  # a bad slope: unbiased still, just noisier
    g = smoothed_gradient(lambda v: float(torch.sin(a @ v)), x, sigma, 400, _gen(5), baseline=wrong)
    assert torch.all((g.grad - smoothed).abs() < 4 * g.stderr)
    quad = smoothed_gradient(lambda v: float(v @ v + a @ v), x, 1.0, 8, _gen(6), baseline=2 * x + a)
    assert torch.allclose(quad.grad, 2 * x + a, atol=1e-12) and float(quad.stderr.max()) < 1e-12


def test_smoothed_gradient_of_a_discontinuous_objective_where_finite_differences_see_nothing():
    """A hard threshold, as a Bernoulli mask is in its rate: f(x) = 1[x₀ > c]. Central differences at a small ε
    are 0 (no jump within ±ε); the smoothed gradient is φ((x₀ − c)/σ)/σ along x₀, and the estimate finds it."""
    c, sigma = 0.3, 0.5
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def f(v: torch.Tensor) -> float:
        return float(v[0] > c)

    assert torch.equal(central_differences(f, x, 1e-3), torch.zeros(2, dtype=torch.float64))
    z = (float(x[0]) - c) / sigma
    want = torch.tensor([math.exp(-z * z / 2) / math.sqrt(2 * math.pi) / sigma, 0.0], dtype=torch.float64)
    g = smoothed_gradient(f, x, sigma, 2000, _gen(3))
    assert torch.all((g.grad - want).abs() < 4 * g.stderr), (g.grad, want, g.stderr)
    assert g.grad[0] > 10 * g.stderr[0]  # resolved: a clearly positive derivative


def test_resolved_sign_counts_only_coordinates_beyond_two_standard_errors():
    truth = torch.tensor([1.0, -1.0, 0.1, -0.05], dtype=torch.float64)
    se = torch.tensor([0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    hg = torch.tensor([2.0, 1.0, -3.0, 1.0], dtype=torch.float64)
    assert resolved_sign(hg, truth, se) == (0.5, 2)
    assert math.isnan(resolved_sign(hg, truth, 10 * se)[0]) and resolved_sign(hg, truth, 10 * se)[1] == 0


def test_smoothing_options_are_refused_in_one_line():
    from hoexp.errors import ConfigError

    with pytest.raises(ConfigError, match="--smooth must be"):
        Smoothing(0.0)
    with pytest.raises(ConfigError, match="--smooth-pairs must be >= 2"):
        Smoothing(0.5, pairs=1)


TINY = ["model.width=5", "model.depth=1", "model.activation=tanh", "model.bias=false", "dtype=float64",
        "progress=false", "optim/inner=momentum", "optim.inner.lr=0.2", "optim.inner.momentum=0.5"]  # fmt: skip


def _horizon(base, texts, tmp_path, **kw):
    from hoexp.cli import compose_spec
    from hoexp.tools.horizon import parse_contender, run_horizon

    spec, _ = compose_spec(base + ["method=none"])
    contenders = [(parse_contender(t), compose_spec(base + parse_contender(t).overrides)[0]) for t in texts]
    return run_horizon(spec, contenders, tmp_path, **kw)


@pytest.mark.slow
def test_es_contenders_estimate_the_smoothed_truth_on_bernoulli_dropout(tmp_path):
    """Standard (Bernoulli) dropout on Iris, 2 outer steps. NRES's particles, started at step 0 with one ε each and
    trained on the reference's batches and masks, estimate at the last step ∇ E L_V(w_{2T}(λ + σε)) with λ from step
    0: exactly the smoothed truth at checkpoint 0 (same σ, runs and noise). PES (ξ = ε₀ + ε₁: λ perturbed per
    truncation) estimates a nearly equal gradient. Both within 4 combined standard errors (the truth's, and an ES
    estimate's from N/2 antithetic pairs, √((‖g‖² + g_i²)/(N/2)) near linearity), all signs resolved and equal."""
    sigma, n = 0.3, 512
    base = TINY + ["hp=dropout", "hp.dropout.granularity=per_layer", "hp.dropout.relaxation=bernoulli",
                   "hp.dropout.init=0.3", "outer_steps=2", "inner_steps=8"]  # fmt: skip
    texts = [f"pes:method.sigma={sigma} method.particles={n}", f"pes:method.variant=nres method.sigma={sigma} "
             f"method.particles={n}", "stn"]  # fmt: skip
    res = _horizon(base, texts, tmp_path, at=[0, 1], eps=sigma, smoothing=Smoothing(sigma, 32))
    truth, se = torch.tensor(res.smoothed[0]), torch.tensor(res.smoothed_stderr[0])
    assert torch.all(truth.abs() > 4 * se), (truth, se)  # the truth is resolved: the test has power
    es_se = ((truth.norm() ** 2 + truth**2) / (n / 2)).sqrt()
    for label in texts[:2]:
        hg = torch.tensor(res.hypergradients[label][1])
        assert torch.all((hg - truth).abs() < 4 * (se**2 + es_se**2).sqrt()), (label, hg, truth, se, es_se)
        assert res.smoothed_scores[label]["sign"] == 1.0 and res.smoothed_scores[label]["resolved"] == 4
    assert set(res.scores) == set(texts) and not res.errors  # STN runs and is scored (its answer: the next test)


@pytest.mark.slow
def test_stn_contender_is_the_exact_hypergradient_where_the_best_response_is_exact(tmp_path):
    """A linear model with one weight decay, trained to convergence in each outer step: the final validation loss
    is L_V(w*(λ)), so the truth is the IFT answer, and STN's response (one scale per output row times a fitted
    direction) can represent dw*/dλ exactly. Its hypergradient in the diagnostic (response fitted since step 0,
    carried across outer steps) is within 1% of the truth once fitted."""
    base = ["model.depth=0", "model.bias=false", "dtype=float64", "progress=false", "optim/inner=momentum",
            "optim.inner.lr=0.3", "optim.inner.momentum=0.5", "hp.weight_decay.granularity=global",
            "hp.weight_decay.init=0.1", "outer_steps=2", "inner_steps=300"]  # fmt: skip
    res = _horizon(base, ["stn:method.sigma=0.1"], tmp_path, at=[0, 1], eps=1e-3)
    for s, tol in ((0, 0.02), (1, 0.01)):
        hg, truth = res.hypergradients["stn:method.sigma=0.1"][s][0], res.truth[s][0]
        assert abs(hg - truth) < tol * abs(truth), (s, hg, truth)


@pytest.mark.slow
def test_a_contender_may_model_the_hyperparameters_its_own_way_but_change_nothing_else(tmp_path):
    """t1t2 cannot take Bernoulli masks; on the Gaussian relaxation of the same rates it runs against the Bernoulli
    reference (its own problem: the reference's weights, batches and noise). A contender changing the model or
    the data is refused in one line naming it."""
    from hoexp.errors import ConfigError

    base = TINY + ["hp=dropout", "hp.dropout.granularity=per_layer", "hp.dropout.relaxation=bernoulli",
                   "outer_steps=2", "inner_steps=2"]  # fmt: skip
    res = _horizon(base, ["t1t2:hp.dropout.relaxation=gaussian"], tmp_path, at=[1])
    assert not res.errors and len(res.hypergradients["t1t2:hp.dropout.relaxation=gaussian"][1]) == 2
    with pytest.raises(ConfigError, match=r"--method t1t2:model.width=3 .*change only method.\* and hp.\*"):
        _horizon(base, ["t1t2:model.width=3 hp.dropout.relaxation=gaussian"], tmp_path, at=[1])
    with pytest.raises(ConfigError, match="hyperparameters .* differ from the reference"):
        _horizon(base, ["t1t2:hp.dropout.relaxation=gaussian hp.dropout.granularity=global"], tmp_path, at=[1])


def test_cli_refuses_bad_smoothing_in_one_line(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "hoexp", "check", "--horizon", "--smooth", "0", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "hoexp: error: --smooth must be a finite perturbation scale > 0 (raw units), got 0.0"
    ]
