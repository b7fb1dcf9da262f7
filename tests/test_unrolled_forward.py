"""Unrolled, truncated and forward-mode hypergradients: against each other, finite differences and the IFT."""

import pytest
import torch

from hoexp.method.forward import forward_hypergradient
from hoexp.method.unrolled import unrolled_hypergradient
from hoexp.optim import build_optimizer
from tests.problems import Ridge, rel_err

OPTIMIZERS = {
    "sgd": dict(lr=0.3),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "adam": dict(lr=0.05),
    "adamw": dict(lr=0.05, weight_decay=0.01),
}


def make(name):
    kw = dict(OPTIMIZERS[name])
    return build_optimizer("sgd" if name in ("momentum", "nesterov") else name, **kw)


@pytest.fixture(scope="module")
def ridge():
    return Ridge.make(n=30, m=20, d=5, seed=2)


def t_loss(ridge):
    # A different "minibatch" per step: a rotating subset of rows, so step indices matter.
    def loss(w, h, t):
        idx = torch.arange(len(ridge.y)).roll(3 * t)[:20]
        r = ridge.X[idx] @ w["w"] - ridge.y[idx]
        return 0.5 * (r @ r) / 20 + 0.5 * (torch.exp(h["log_decay"]) * w["w"] ** 2).sum()

    return loss


def v_loss(ridge):
    return lambda w, h: ridge.val_loss(w, h)


def fd_hypergradient(ridge, opt, w0, steps, eps=1e-6):
    """Central finite differences of L_V(w_T(λ)) over every scalar λ_i (float64)."""

    def final_val(raw):
        w, s = {"w": w0.clone()}, opt.init({"w": w0})
        for t in range(steps):
            wg = {"w": w["w"].clone().requires_grad_(True)}
            (g,) = torch.autograd.grad(t_loss(ridge)(wg, {"log_decay": raw}, t), [wg["w"]])
            with torch.no_grad():
                w, s = opt.update(w, {"w": g}, s)
        return float(ridge.val_loss(w, None))

    out = torch.zeros_like(ridge.raw)
    for i in range(len(out)):
        e = torch.zeros_like(out)
        e[i] = eps
        out[i] = (final_val(ridge.raw + e) - final_val(ridge.raw - e)) / (2 * eps)
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unrolled_and_forward_agree_and_match_finite_differences(ridge, name):
    opt = make(name)
    w0 = torch.zeros(5, dtype=torch.float64)
    params, state, lam = {"w": w0}, opt.init({"w": w0}), {"log_decay": ridge.raw}
    steps = 15
    rev = unrolled_hypergradient(t_loss(ridge), v_loss(ridge), opt, params, state, lam, steps)
    fwd = forward_hypergradient(t_loss(ridge), v_loss(ridge), opt, params, state, lam, steps)
    assert rel_err(fwd.hypergrad["log_decay"], rev.hypergrad["log_decay"]) < 1e-10
    assert torch.allclose(fwd.params["w"], rev.params["w"], rtol=0, atol=1e-14)
    fd = fd_hypergradient(ridge, opt, w0, steps)
    assert rel_err(rev.hypergrad["log_decay"], fd) < 1e-6, (rev.hypergrad["log_decay"], fd)
    assert float(rev.hypergrad["log_decay"].norm()) > 1e-6


def test_unrolled_training_matches_plain_training(ridge):
    """The unrolled pass trains exactly like the plain loop (same w_T, same optimizer state)."""
    opt = make("nesterov")
    w0 = torch.randn(5, dtype=torch.float64)
    res = unrolled_hypergradient(
        t_loss(ridge), v_loss(ridge), opt, {"w": w0}, opt.init({"w": w0}), {"log_decay": ridge.raw}, 10
    )
    w, s = {"w": w0.clone()}, opt.init({"w": w0})
    for t in range(10):
        wg = {"w": w["w"].clone().requires_grad_(True)}
        (g,) = torch.autograd.grad(t_loss(ridge)(wg, {"log_decay": ridge.raw}, t), [wg["w"]])
        with torch.no_grad():
            w, s = opt.update(w, {"w": g}, s)
    assert torch.equal(res.params["w"], w["w"])
    assert torch.equal(res.opt_state["momentum_buffer"]["w"], s["momentum_buffer"]["w"])
    assert res.opt_state["step"] == 10 and not res.params["w"].requires_grad


def test_truncated_is_unrolled_from_the_truncation_point(ridge):
    opt = make("momentum")
    w0 = torch.zeros(5, dtype=torch.float64)
    lam = {"log_decay": ridge.raw}
    T, k = 12, 4
    full = unrolled_hypergradient(t_loss(ridge), v_loss(ridge), opt, {"w": w0}, opt.init({"w": w0}), lam, T)
    same = unrolled_hypergradient(t_loss(ridge), v_loss(ridge), opt, {"w": w0}, opt.init({"w": w0}), lam, T, truncate=T)
    assert rel_err(same.hypergrad["log_decay"], full.hypergrad["log_decay"]) < 1e-14
    trunc = unrolled_hypergradient(
        t_loss(ridge), v_loss(ridge), opt, {"w": w0}, opt.init({"w": w0}), lam, T, truncate=k
    )
    # Reference: run T − k steps plainly, then unroll k steps from there (step indices shifted).
    head = unrolled_hypergradient(t_loss(ridge), v_loss(ridge), opt, {"w": w0}, opt.init({"w": w0}), lam, T - k)

    def shifted(w, h, t):
        return t_loss(ridge)(w, h, t + T - k)

    tail = unrolled_hypergradient(shifted, v_loss(ridge), opt, head.params, head.opt_state, lam, k)
    assert rel_err(trunc.hypergrad["log_decay"], tail.hypergrad["log_decay"]) < 1e-12
    assert rel_err(trunc.hypergrad["log_decay"], full.hypergrad["log_decay"]) > 1e-3  # truncation is biased
    assert torch.equal(trunc.params["w"], full.params["w"])


def test_unrolled_from_the_optimum_approaches_the_ift_answer():
    """Started at w*, many small full-batch steps: the unrolled hypergradient → the IFT one (Ridge closed form)."""
    ridge = Ridge.make(n=40, m=30, d=6, seed=5)
    truth = ridge.exact_hypergradient()
    opt = build_optimizer("sgd", lr=0.5)
    w_star = ridge.w_star(ridge.raw)

    def loss(w, h, t):
        return ridge.train_loss(w, h)

    errs = []
    for steps in (3, 10, 200):
        res = unrolled_hypergradient(
            loss,
            lambda w, h: ridge.val_loss(w, h),
            opt,
            {"w": w_star},
            opt.init({"w": w_star}),
            {"log_decay": ridge.raw},
            steps,
        )
        errs.append(rel_err(res.hypergrad["log_decay"], truth))
    assert errs[0] > errs[1] > 1e-8 and errs[2] < 1e-10, errs


def test_learning_rate_override_gets_a_hypergradient(ridge):
    """An optimizer lr given through `overrides` is differentiated by both modes (finite-difference check)."""
    opt = build_optimizer("sgd", lr=0.1, momentum=0.9)
    w0 = torch.zeros(5, dtype=torch.float64)
    lam = {"log_decay": ridge.raw, "log_lr": torch.tensor(-2.0, dtype=torch.float64)}

    def overrides(h, t):
        return {"lr": torch.exp(h["log_lr"])}

    rev = unrolled_hypergradient(
        t_loss(ridge), v_loss(ridge), opt, {"w": w0}, opt.init({"w": w0}), lam, 10, overrides=overrides
    )
    fwd = forward_hypergradient(
        t_loss(ridge), v_loss(ridge), opt, {"w": w0}, opt.init({"w": w0}), lam, 10, overrides=overrides
    )
    assert rel_err(fwd.hypergrad["log_lr"], rev.hypergrad["log_lr"]) < 1e-10

    def final(log_lr):
        h = {**lam, "log_lr": torch.tensor(log_lr, dtype=torch.float64)}
        return unrolled_hypergradient(
            t_loss(ridge), v_loss(ridge), opt, {"w": w0}, opt.init({"w": w0}), h, 10, overrides=overrides
        ).val_loss

    fd = (final(-2.0 + 1e-6) - final(-2.0 - 1e-6)) / 2e-6
    assert float(rev.hypergrad["log_lr"]) == pytest.approx(fd, rel=1e-6)
