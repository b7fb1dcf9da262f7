"""method=fd: the finite-difference (first-order) hypergradient against exact answers on ridge."""

import pytest
import torch

from hoexp import hypergradient
from hoexp.cli import compose_spec
from hoexp.errors import ConfigError
from hoexp.method.first_order import FiniteDifferenceHessian, fd_hypergradient
from tests.problems import Ridge, rel_err


def _t1t2_exact(train_loss, val_loss, w, raw, alpha):
    """∂L_V/∂λ − α (∂²L_T/∂λ∂w) ∂L_V/∂w by double backward."""
    w = {k: v.detach().clone().requires_grad_(True) for k, v in w.items()}
    r = {k: v.detach().clone().requires_grad_(True) for k, v in raw.items()}
    (v,) = torch.autograd.grad(val_loss(w, r), [w["w"]])
    (g,) = torch.autograd.grad(train_loss(w, r), [w["w"]], create_graph=True)
    (m,) = torch.autograd.grad(g @ (alpha * v), [r["log_decay"]])
    return -m


@pytest.fixture
def ridge():
    p = Ridge.make()
    return p, {"w": p.w_star(p.raw)}, {"log_decay": p.raw}


def test_fd_equals_the_exact_one_step_hypergradient_on_ridge(ridge):
    """``∇_λ L_T = ½ e^λ w²`` is quadratic in ``w``: the central difference has no truncation error."""
    p, w, raw = ridge
    exact = _t1t2_exact(p.train_loss, p.val_loss, w, raw, 0.3)
    for eps in (1e-1, 1e-2, 1e-3):
        hg, stats = fd_hypergradient(p.train_loss, p.val_loss, w, raw, alpha=0.3, eps=eps)
        assert rel_err(hg["log_decay"], exact) < 1e-9, eps
        assert stats.hvps == 0 and stats.step == eps
    api = hypergradient(p.train_loss, p.val_loss, w, raw, "t1t2", alpha=0.3)
    assert rel_err(hg["log_decay"], api["log_decay"]) < 1e-9


def test_fd_with_terms_equals_neumann_on_ridge(ridge):
    p, w, raw = ridge
    hg, stats = fd_hypergradient(p.train_loss, p.val_loss, w, raw, alpha=0.5, eps=1e-3, terms=30)
    neumann = hypergradient(p.train_loss, p.val_loss, w, raw, "neumann", iterations=30, alpha=0.5)
    assert stats.hvps == 30
    assert rel_err(hg["log_decay"], neumann["log_decay"]) < 1e-9
    assert rel_err(hg["log_decay"], p.exact_hypergradient()) < 1e-3  # and 30 terms reach the exact IFT answer


def test_fd_error_is_second_order_in_eps():
    """Ridge with a quartic penalty ``¼ Σ e^λ w⁴``: ``∇_λ L_T`` is quartic in ``w``, the central difference's
    error is ``c·ε²`` (halving ε quarters it) until rounding (``δ/ε``) takes over."""
    p = Ridge.make()

    def train_loss(params, hparams):
        w = params["w"]
        return p.train_loss(params, hparams) + 0.25 * (torch.exp(hparams["log_decay"]) * w**4).sum()

    w, raw = {"w": p.w_star(p.raw)}, {"log_decay": p.raw}
    exact = _t1t2_exact(train_loss, p.val_loss, w, raw, 0.3)
    errors = [
        rel_err(fd_hypergradient(train_loss, p.val_loss, w, raw, alpha=0.3, eps=eps)[0]["log_decay"], exact)
        for eps in (0.08, 0.04, 0.02, 0.01)
    ]
    assert errors[0] > 1e-5
    for a, b in zip(errors, errors[1:]):
        assert 3.8 < a / b < 4.2, errors


def test_finite_difference_hessian_products(ridge):
    p, w, raw = ridge
    op = FiniteDifferenceHessian(p.train_loss, w, raw, 1e-3)
    v = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel_err(op.matvec(v), p.hessian() @ v) < 1e-9
    assert torch.equal(op.matvec(torch.zeros(8, dtype=torch.float64)), torch.zeros(8, dtype=torch.float64))


def test_fd_config_and_refusals():
    spec = compose_spec(["method=fd", "method.eps=0.001", "method.terms=2", "compile=true"])[0]
    assert (spec.method.alpha, spec.method.eps, spec.method.terms) == (0.01, 0.001, 2)
    with pytest.raises(ConfigError, match="method=fd: eps must be > 0"):
        compose_spec(["method=fd", "method.eps=0"])
    with pytest.raises(ConfigError, match="method=fd .*cannot tune hp=lr"):
        compose_spec(["method=fd", "hp=lr"])
