"""Online hypergradient descent of the learning rate (SGD-HD, SGDN-HD, Adam-HD; Baydin et al. 2018)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hoexp.cli import compose_spec
from hoexp.config.build import build
from hoexp.engine import start
from hoexp.method.base import outer_step
from hoexp.method.hd import HDMethod, hd_init, hd_sgd_step
from hoexp.optim import build_optimizer
from hoexp.task.streams import FullBatch

MU, BETAS, EPS = 0.9, (0.9, 0.999), 1e-8


def logreg(n=96, d=5, classes=3, seed=0, dtype=torch.float32, noise=1.0):
    """A small multinomial logistic regression: data, initial weights, and its loss."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    W_true = torch.randn(classes, d, generator=g, dtype=dtype) * 2
    y = (X @ W_true.T + noise * torch.randn(n, classes, generator=g, dtype=dtype)).argmax(1)
    params = {"W": 0.1 * torch.randn(classes, d, generator=g, dtype=dtype), "b": torch.zeros(classes, dtype=dtype)}
    return X, y, params


def loss_fn(params, X, y):
    return F.cross_entropy(X @ params["W"].T + params["b"], y)


def grads_at(params, X, y):
    w = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    gs = torch.autograd.grad(loss_fn(w, X, y), list(w.values()))
    return dict(zip(w, gs))


def batch(X, y, t, size=16):
    """Deterministic minibatches, so that gradients change from step to step."""
    i = (t * size) % len(y)
    return X[i : i + size], y[i : i + size]


@pytest.mark.parametrize(
    "variant,torch_opt,ours",
    [
        ("sgd", lambda p, lr: torch.optim.SGD(p, lr=lr), lambda lr: build_optimizer("sgd", lr=lr)),
        (
            "sgdn",
            lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=MU, nesterov=True),
            lambda lr: build_optimizer("nesterov", lr=lr, momentum=MU),
        ),
        (
            "adam",
            lambda p, lr: torch.optim.Adam(p, lr=lr, betas=BETAS, eps=EPS),
            lambda lr: build_optimizer("adam", lr=lr, betas=BETAS, eps=EPS),
        ),
    ],
)
def test_beta_zero_is_the_plain_optimizer_bitwise(variant, torch_opt, ours):
    """β = 0: 20 steps equal torch.optim's and hoexp.optim's trajectories exactly (float32)."""
    lr = 0.2 if variant != "adam" else 0.05
    X, y, p0 = logreg()
    method = HDMethod(variant, beta=0.0, lr0=lr, momentum=MU, betas=BETAS, eps=EPS)
    params, state = dict(p0), hd_init(p0, lr, variant)  # a Python-number α
    tp = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    topt = torch_opt(list(tp.values()), lr)
    hopt = ours(lr)
    hp, hstate = dict(p0), hopt.init(p0)
    hs = []
    for t in range(20):
        xb, yb = batch(X, y, t)
        params, state = method.step(params, grads_at(params, xb, yb), state)
        topt.zero_grad()
        loss_fn(tp, xb, yb).backward()
        topt.step()
        hp, hstate = hopt.update(hp, grads_at(hp, xb, yb), hstate)
        for k in p0:
            assert torch.equal(params[k], tp[k].detach()), (variant, t, k)
            assert torch.equal(params[k], hp[k]), (variant, t, k)
        assert state["hd_lr"] == lr
        hs.append(state["hd_h"])
    assert hs[0] == 0.0 and all(h != 0.0 for h in hs[1:])  # h_1 = g_1·d_0 = 0; h is computed all the same


def reference_direction(variant, g, state):
    """d_t from the paper's formulas, written out independently of hoexp.method.hd."""
    if variant == "sgd":
        return dict(g)
    if variant == "sgdn":
        return {k: g[k] + MU * (MU * state["hd_momentum_buffer"][k] + g[k]) for k in g}
    t = state["hd_step"] + 1
    b1, b2 = BETAS
    out = {}
    for k in g:
        m = b1 * state["hd_exp_avg"][k] + (1 - b1) * g[k]
        s = b2 * state["hd_exp_avg_sq"][k] + (1 - b2) * g[k] ** 2
        out[k] = (m / (1 - b1**t)) / (torch.sqrt(s / (1 - b2**t)) + EPS)
    return out


@pytest.mark.parametrize("variant", ["sgd", "sgdn", "adam"])
def test_h_is_the_true_one_step_hypergradient(variant):
    """h_{t+1} = −∂f(θ_t(α))/∂α, by autograd through θ_t(α) = θ_{t−1} − α d_t (float64)."""
    X, y, params = logreg(dtype=torch.float64)
    beta = 1e-3 if variant != "adam" else 1e-5
    method = HDMethod(variant, beta=beta, lr0=0.1, momentum=MU, betas=BETAS, eps=EPS)
    state = hd_init(params, 0.1, variant)
    for t in range(4):  # a non-trivial history: buffers, previous direction, α ≠ α_0
        xb, yb = batch(X, y, t)
        params, state = method.step(params, grads_at(params, xb, yb), state)
    x1, y1 = batch(X, y, 4)
    x2, y2 = batch(X, y, 5)
    g1 = grads_at(params, x1, y1)
    d = reference_direction(variant, g1, state)
    p1, s1 = method.step(params, g1, state)
    alpha = torch.tensor(s1["hd_lr"], dtype=torch.float64, requires_grad=True)
    (df,) = torch.autograd.grad(loss_fn({k: params[k] - alpha * d[k] for k in d}, x2, y2), alpha)
    for k in d:  # the step moved along the reference direction with the updated α
        torch.testing.assert_close(p1[k], params[k] - s1["hd_lr"] * d[k], rtol=1e-12, atol=1e-14)
    _, s2 = method.step(p1, grads_at(p1, x2, y2), s1)
    assert abs(df.item()) > 1e-4
    assert s2["hd_h"] == pytest.approx(-df.item(), rel=1e-10)
    assert s2["hd_lr"] == pytest.approx(s1["hd_lr"] + beta * -df.item(), rel=1e-12)


@pytest.mark.parametrize("variant", ["sgd", "sgdn", "adam"])
def test_tensor_lr_follows_the_number_lr(variant):
    """A 0-d tensor α (the runner's form: no host sync) gives the Python-number trajectory."""
    X, y, p0 = logreg(dtype=torch.float64)
    beta = 1e-2 if variant != "adam" else 1e-4
    method = HDMethod(variant, beta=beta, lr0=0.05, momentum=MU, betas=BETAS, eps=EPS)
    pn, sn = dict(p0), hd_init(p0, 0.05, variant)
    pt, st = dict(p0), hd_init(p0, torch.tensor(0.05, dtype=torch.float64), variant)
    for t in range(20):
        xb, yb = batch(X, y, t)
        pn, sn = method.step(pn, grads_at(pn, xb, yb), sn)
        pt, st = method.step(pt, grads_at(pt, xb, yb), st)
    assert isinstance(sn["hd_lr"], float) and isinstance(st["hd_lr"], torch.Tensor)
    assert sn["hd_lr"] != 0.05
    assert st["hd_lr"].item() == pytest.approx(sn["hd_lr"], rel=1e-12)
    for k in p0:
        torch.testing.assert_close(pt[k], pn[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant,beta", [("sgd", 0.02), ("sgdn", 2e-3), ("adam", 1e-4)])
def test_lr_grows_from_tiny_and_beats_the_fixed_lr(variant, beta):
    """Baydin et al.'s behaviour: from α_0 = 1e-3 the learning rate rises and training goes further
    than the same optimizer at the fixed α_0 (noisy minibatch logistic regression, 300 steps)."""
    X, y, p0 = logreg(n=512, d=10, classes=4, seed=3, noise=2.0)
    lr0 = 1e-3
    hd = HDMethod(variant, beta=beta, lr0=lr0, momentum=MU, betas=BETAS, eps=EPS)
    plain = HDMethod(variant, beta=0.0, lr0=lr0, momentum=MU, betas=BETAS, eps=EPS)
    runs = {}
    for name, m in (("hd", hd), ("plain", plain)):
        params, state = dict(p0), hd_init(p0, lr0, variant)
        peak = lr0
        for t in range(300):
            xb, yb = batch(X, y, t, size=32)
            params, state = m.step(params, grads_at(params, xb, yb), state)
            peak = max(peak, state["hd_lr"])
        runs[name] = (loss_fn(params, X, y).item(), peak)
    (hd_loss, hd_peak), (plain_loss, plain_peak) = runs["hd"], runs["plain"]
    assert plain_peak == lr0 and hd_peak > 10 * lr0, runs
    assert hd_loss < plain_loss - 0.05, runs


def test_sgd_hd_step_by_hand():
    """Two SGD-HD steps on f(θ) = ½‖θ‖² (∇f = θ), worked out by hand."""
    state = hd_init({"x": torch.zeros(2)}, 0.5)
    p, state = hd_sgd_step({"x": torch.tensor([2.0, -4.0])}, {"x": torch.tensor([2.0, -4.0])}, state, beta=0.01)
    assert state["hd_h"] == 0.0 and state["hd_lr"] == 0.5 and torch.equal(p["x"], torch.tensor([1.0, -2.0]))
    # h = g_2·g_1 = (1,−2)·(2,−4) = 10; α = 0.5 + 0.01·10 = 0.6; θ = (1,−2) − 0.6·(1,−2) = (0.4, −0.8)
    p, state = hd_sgd_step(p, dict(p), state, beta=0.01)
    assert state["hd_h"] == 10.0 and state["hd_lr"] == pytest.approx(0.6)
    torch.testing.assert_close(p["x"], torch.tensor([0.4, -0.8]))
    _, clamped = hd_sgd_step(p, dict(p), state, beta=10.0, max_lr=0.7)
    assert clamped["hd_lr"] == 0.7


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown HD variant"):
        HDMethod("rmsprop", beta=1e-3, lr0=1e-3)
    with pytest.raises(ValueError, match="beta"):
        HDMethod("sgd", beta=-1.0, lr0=1e-3)
    with pytest.raises(KeyError, match="hd_exp_avg"):
        HDMethod("adam", beta=0.0, lr0=0.1).step(
            {"x": torch.ones(1)}, {"x": torch.ones(1)}, hd_init({"x": torch.ones(1)}, 0.1, "sgd")
        )


@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_runner_method_keeps_lr_across_outer_steps(variant):
    """Two outer steps of 5 inner steps on the Iris MLP equal 10 uninterrupted HD steps: α, the previous
    direction and the buffers persist in ``state.opt_state``."""
    spec, _ = compose_spec(["model.width=8", "model.depth=1", "progress=false", "dtype=float64", "method=none"])
    exp = build(spec)
    problem = exp.problem
    st = start(exp)
    state, p0, raw = st.inner, st.inner.params, st.raw
    batches = FullBatch(exp.data.train)
    val = (exp.data.val.x, exp.data.val.y)
    beta, lr0 = (1e-2, 0.05) if variant == "sgd" else (1e-5, 0.01)
    method = HDMethod(variant, beta=beta, lr0=lr0)
    calls = []
    hg, state, stats1 = outer_step(method, problem, exp.inner_opt, state, raw, batches, val, 5, lambda: calls.append(1))
    alpha1 = state.opt_state["hd_lr"].clone()
    assert hg is None and state.step == 5 and stats1["hd/lr"] == alpha1.item() != lr0
    hg, state, stats2 = outer_step(method, problem, exp.inner_opt, state, raw, batches, val, 5, lambda: calls.append(1))
    assert hg is None and state.step == 10 and len(calls) == 10
    assert set(exp.inner_opt.init(p0)) <= set(state.opt_state)  # the runner's keys are left alone

    # reference: 10 steps in one loop, gradients of the problem's training loss taken here
    params, ref = dict(p0), hd_init(p0, torch.tensor(lr0, dtype=torch.float64), variant)
    for _ in range(10):
        w = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = problem.train_loss(w, raw, next(batches))
        grads = dict(zip(w, torch.autograd.grad(loss, list(w.values()))))
        params, ref = method.step(params, grads, ref)
    assert torch.equal(state.opt_state["hd_lr"], ref["hd_lr"]) and ref["hd_lr"].item() != alpha1.item()
    assert {k: stats2[k] for k in ("hd/lr", "hd/h")} == {"hd/lr": ref["hd_lr"].item(), "hd/h": ref["hd_h"].item()}
    assert stats2["inner/loss"] == pytest.approx(loss.item(), rel=1e-12)
    for k in p0:
        assert torch.equal(state.params[k], params[k]), k


def test_summary_reports_the_adapted_learning_rate(tiny_experiment):
    """``hp_final`` (and the ``hp/*`` scalars) of a method=hd run show the learning rate HD adapted, not the lr
    family's initial value (issue 28: summary.json said 0.01 while hd/lr ended at 0.036)."""
    import hoexp
    from hoexp.engine.metrics import MemoryLogger

    exp = tiny_experiment("hp=lr", "method=hd", "method.beta=1e-2", "outer_steps=3", "inner_steps=10")
    logger = MemoryLogger()
    summary = hoexp.run(exp, hoexp.RunIO(loggers=[logger]))
    start_lr = exp.inner_opt.defaults["lr"]
    (_, adapted), *_ = reversed(logger.series("hd/lr"))
    assert adapted != pytest.approx(start_lr, rel=1e-3)  # HD moved it
    final = summary["hp_final"]
    assert final["mean"] == pytest.approx(adapted, rel=1e-12) and final["moved_fraction"] == 1.0, final
    hp_mean = dict(logger.series("hp/mean"))
    assert hp_mean[3] == pytest.approx(adapted, rel=1e-12)
    assert hp_mean[0] == pytest.approx(start_lr, rel=1e-6)  # before any HD step: the start
