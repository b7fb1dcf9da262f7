"""The IFT's product mode as a part (hoexp/method/products.py): each mode's eager operator and pure form equal the
dense Hessian (and the mixed term) in float64; ``auto`` keeps the faster and logs once; a mode of one's own is used
as given (no dispatch on its name), from Python and from a YAML node, and the config spellings still build."""

from __future__ import annotations

import pytest
import torch

from hoexp import tree
from hoexp.cli import compose_spec
from hoexp.config.build import build_method
from hoexp.method import implicit, products, solvers
from hoexp.method.ift import ift_hypergradient, ift_tensors
from hoexp.method.products import Auto, FwdRev, ProductMode, RevRev
from hoexp.method.solvers import ConjugateGradient, Exact, FixedPoint, Neumann
from tests.test_speed2 import _mlp


def _dense_hessian_and_mixed(loss, w, lam):
    """``∂²L/∂w²`` and ``∂²L/∂λ∂w`` (rows: λ, columns: w) by torch.func, flat."""
    flat_w, flat_l = tree.flatten(w.values()), tree.flatten(lam.values())

    def f(x, y):
        return loss(tree.unflatten(x, w), tree.unflatten(y, lam))

    h = torch.func.hessian(f, argnums=(0, 1))(flat_w, flat_l)
    return h[0][0], h[1][0]


@pytest.mark.parametrize("mode", [RevRev(), FwdRev()], ids=lambda m: m.name)
@pytest.mark.parametrize("dense", [False, True])
def test_each_mode_s_operator_and_pure_form_are_the_hessian(mode, dense):
    split, w, lam = _mlp()
    loss = lambda w_, lam_: split(w_, lam_)  # noqa: E731 -- the Hessian of the plain loss
    H, M = _dense_hessian_and_mixed(loss, w, lam)
    wl, ll = tree.detached(w, True), tree.detached(lam, True)
    g = torch.autograd.grad(loss(wl, ll), list(wl.values()), create_graph=True)
    op = mode.operator(loss, wl, ll, tree.flatten(g), None, dense=dense)
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(op.dense() if dense else op.matvec(v), H if dense else H @ v, rtol=1e-10, atol=1e-12)
    grad_w, value, product, mixed_of = mode.linearize(loss, w, lam)
    torch.testing.assert_close(tree.flatten(product(w, lam, tree.unflatten(v, w)).values()), H @ v)
    torch.testing.assert_close(tree.flatten(grad_w.values()), tree.flatten(g).detach())
    torch.testing.assert_close(value, loss(w, lam))
    if mixed_of is not None:  # rev_rev's pullback in (w, λ) gives the mixed term too
        torch.testing.assert_close(tree.flatten(mixed_of(tree.unflatten(v, w)).values()), M @ v)


def test_auto_keeps_the_faster_mode_and_logs_once(monkeypatch):
    split, w, lam = _mlp()
    times = {"rev_rev": 2e-3, "fwd_rev": 1e-3}
    monkeypatch.setattr(products, "_seconds_per_product", lambda modes, *a: [times[m.name] for m in modes])
    auto = Auto()
    with pytest.raises(TypeError, match="resolve"):  # the pure form does not time inside a compiled function
        auto.linearize(split, w, lam)
    mode, extra = auto.resolve(split, w, lam)
    assert (mode, extra) == (FwdRev(), {"solver/fwd_rev_over_rev_rev": 0.5})
    assert auto.resolve(split, w, lam) == (FwdRev(), {})  # timed once
    times.update(rev_rev=1e-3, fwd_rev=3e-3)
    assert Auto().resolve(split, w, lam)[0] == RevRev()
    hg, stats = ift_hypergradient(split, split, w, lam, Exact(), hvp=Auto())
    assert stats.extra["solver/fwd_rev_over_rev_rev"] == 3.0


class Counting:
    """A product mode of one's own: rev_rev's products, counted (its name is none of the spellings)."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def resolve(self, train_loss, w, lam):
        return self, {}

    def operator(self, *args, **kw):
        self.calls += 1
        return RevRev().operator(*args, **kw)

    def linearize(self, *args):
        self.calls += 1
        return RevRev().linearize(*args)


def test_a_mode_of_one_s_own_is_used_as_given():
    split, w, lam = _mlp()
    mine = Counting()
    assert isinstance(mine, ProductMode)
    solver = ConjugateGradient(30, 1e-14)
    ref, _ = ift_hypergradient(split, split, w, lam, solver)
    hg, _ = ift_hypergradient(split, split, w, lam, solver, hvp=mine)
    pure, _, _ = ift_tensors(split, split, solver, w, lam, hvp=mine)
    assert mine.calls == 2
    for k in ref:
        torch.testing.assert_close(hg[k], ref[k], rtol=1e-12, atol=0)
        torch.testing.assert_close(pure[k], ref[k], rtol=1e-9, atol=1e-14)
    assert implicit.ift(solvers.cg(), hvp=mine).hvp is mine


@pytest.mark.parametrize("solver", [Neumann(10, 0.05), FixedPoint(10, 0.05), ConjugateGradient(10, 1e-14)], ids=str)
def test_the_pure_ift_is_the_eager_ift_bit_for_bit(solver):
    """The function ``torch.compile`` takes (:func:`ift_tensors`, reverse-over-reverse) run eagerly does the eager IFT's
    arithmetic exactly in float64: its hypergradient and solve are bit-identical, so a compiled run differs from an
    eager one only by what the compiler fuses. (The eager default keeps autograd's graph for speed: the pure form's
    joint pullback also computes the λ half of every product.)"""
    split, w, lam = _mlp()
    ref, stats = ift_hypergradient(split, split, w, lam, solver)
    pure, sol, host = ift_tensors(split, split, solver, w, lam, hvp="rev_rev")
    for k in ref:
        assert torch.equal(pure[k], ref[k]), k
    assert torch.equal(sol.x, stats.solution)
    assert float(host[0]) == stats.train_loss and float(host[1]) == stats.val_loss


def test_the_config_spells_a_mode_or_names_one(tmp_path):
    """``method.hvp=fwd_rev`` (the old spelling) and a nested ``_target_`` node build the same method."""
    assert build_method(compose_spec(["method=cg"])[0]).hvp == RevRev()
    spelled = build_method(compose_spec(["method=cg", "method.hvp=fwd_rev"])[0])
    assert spelled.hvp == FwdRev() and spelled == implicit.ift(solvers.cg(), hvp="fwd_rev", name="cg")
    assert isinstance(build_method(compose_spec(["method=neumann", "method.hvp=auto"])[0]).hvp, Auto)
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "cg_fwd.yaml").write_text(
        "_target_: hoexp.method.implicit.cg\nhvp: {_target_: hoexp.method.products.FwdRev}\n"
    )
    node = build_method(compose_spec(["method=cg_fwd", "method.name=cg"], config_dir=tmp_path)[0])
    assert node == spelled


class ProductCurvature:
    """A curvature of one's own that asks for the product mode's operator (``uses_product_mode``), named neither
    ``hessian`` nor anything the IFT knows; its own ``operator`` must not be called."""

    name = "mine"
    uses_product_mode = True

    def operator(self, *args, **kw):
        raise AssertionError("the IFT should have used the product mode's operator")


def test_a_curvature_says_what_it_needs_by_attribute_not_by_name():
    split, w, lam = _mlp()
    solver = ConjugateGradient(30, 1e-14)
    ref, _ = ift_hypergradient(split, split, w, lam, solver)
    mode = Counting()
    hg, _ = ift_hypergradient(split, split, w, lam, solver, curvature=ProductCurvature(), hvp=mode)
    assert mode.calls == 1
    for k in ref:
        torch.testing.assert_close(hg[k], ref[k], rtol=1e-12, atol=0)
