"""Pure curvature products, the compiled IFT, batched exact solves and checkpointed unrolling (issue 15).

Every path is compared in float64 with an exact answer: a dense direct solve, the closed-form ridge
hypergradient, or the existing reference path it replaces (the eager reverse-over-reverse IFT, the
stored-trajectory unroll).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import hoexp
from hoexp import tree
from hoexp.cli import compose_spec
from hoexp.config.build import build_method
from hoexp.errors import ConfigError, HoexpError
from hoexp.method.base import outer_step, train_inner
from hoexp.method.curvature import GaussNewtonOperator, HessianOperator, SplitLoss
from hoexp.method.functional import (
    FunctionalOperator,
    ggn_product,
    hvp_fwd_rev,
    hvp_rev_rev,
    linearized_ggn,
    linearized_hvp,
)
from hoexp.method.ift import CompiledIFT, ift_hypergradient, ift_tensors
from hoexp.method.implicit import ImplicitMethod
from hoexp.method.solvers import ConjugateGradient, Exact, FixedPoint, Neumann
from hoexp.method.unrolled import unrolled_hypergradient
from hoexp.optim import build_optimizer
from tests.problems import Ridge, rel_err
from tests.test_host_syncs import SMALL_MNIST, setup

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_peers import make_problem  # noqa: E402

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="torch.compile on CPU needs a C++ compiler"
)


@pytest.fixture(scope="module")
def logreg():
    return make_problem(n=200, p=12, seed=1)


def _losses(prob):
    return (
        lambda W, H: prob.train_loss(W["w"], H["lam"]),
        lambda W, H: prob.val_loss(W["w"], H["lam"]),
        {"w": prob.w},
        {"lam": prob.lam},
    )


def _mlp(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 5, generator=g, dtype=dtype), torch.randint(0, 3, (30,), generator=g)
    w = {"a": 0.5 * torch.randn(7, 5, generator=g, dtype=dtype), "b": 0.5 * torch.randn(3, 7, generator=g, dtype=dtype)}
    lam = {"a": torch.randn(7, 5, generator=g, dtype=dtype) - 3, "b": torch.randn(3, 7, generator=g, dtype=dtype) - 3}
    outputs = lambda w_, lam_: torch.tanh(X @ w_["a"].T) @ w_["b"].T  # noqa: E731
    output_loss = lambda z: torch.nn.functional.cross_entropy(z, y)  # noqa: E731
    penalty = lambda w_, lam_: 0.5 * sum((lam_[k].exp() * w_[k].square()).sum() for k in w_)  # noqa: E731
    return SplitLoss(outputs, output_loss, penalty), w, lam


def test_pure_products_equal_the_kept_graph_products():
    split, w, lam = _mlp()
    wl = tree.detached(w, True)
    g = torch.autograd.grad(split(wl, lam), list(wl.values()), create_graph=True)
    ref_h = HessianOperator(tree.flatten(g), list(wl.values()))
    ref_g = GaussNewtonOperator(split, w, lam)
    v = torch.randn(ref_h.n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vd = tree.unflatten(v, w)
    for fn in (hvp_fwd_rev, hvp_rev_rev):
        torch.testing.assert_close(tree.flatten(fn(split, w, lam, vd).values()), ref_h.matvec(v))
    grad_w, value, hv = linearized_hvp(split, w, lam)  # one gradient, then products from its pullback
    torch.testing.assert_close(tree.flatten(grad_w.values()), tree.flatten(g).detach())
    torch.testing.assert_close(value, split(w, lam))
    for _ in range(2):  # the kept pullback serves more than one product
        torch.testing.assert_close(tree.flatten(hv(vd).values()), ref_h.matvec(v))
    torch.testing.assert_close(tree.flatten(ggn_product(split, w, lam, vd).values()), ref_g.matvec(v))
    grad_w, value, gv = linearized_ggn(split, w, lam)  # the gradient and loss from the same forward pass
    torch.testing.assert_close(tree.flatten(grad_w.values()), tree.flatten(g).detach())
    torch.testing.assert_close(value, split(w, lam))
    for _ in range(2):
        torch.testing.assert_close(tree.flatten(gv(vd).values()), ref_g.matvec(v))


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev", "linearized"])
def test_batched_dense_hessian_equals_torch_func_hessian(mode):
    split, w, lam = _mlp()
    if mode == "linearized":
        hv = linearized_hvp(split, w, lam)[2]
        product = lambda a, b, c: hv(c)  # noqa: E731
    else:
        fn = hvp_fwd_rev if mode == "fwd_rev" else hvp_rev_rev
        product = lambda a, b, c: fn(split, a, b, c)  # noqa: E731
    op = FunctionalOperator(product, w, lam, damping=0.1, chunk=16)  # 56 = 4 chunks
    flat = tree.flatten(w.values())
    H = torch.func.hessian(lambda x: split(tree.unflatten(x, w), lam))(flat)
    torch.testing.assert_close(op.dense(), H + 0.1 * torch.eye(len(flat), dtype=H.dtype))
    assert op.hvps == op.n


def test_exact_from_batched_products_equals_the_dense_direct_solve(logreg):
    tl, vl, w, lam = _losses(logreg)
    truth = logreg.direct()
    for hvp in ("rev_rev", "fwd_rev"):
        hg = hoexp.hypergradient(tl, vl, w, lam, method="exact", hvp=hvp)["lam"]
        assert rel_err(hg, truth) < 1e-10, hvp


@pytest.mark.parametrize(
    "solver",
    [
        Neumann(8, 0.5, residual=True),
        Neumann(8, 0.5, residual=False),
        ConjugateGradient(12, 0.0),
        ConjugateGradient(50, 1e-8),
        FixedPoint(6, 0.5),
        Exact(),
    ],
    ids=["neumann", "neumann-nores", "cg", "cg-converges", "fixed_point", "exact"],
)
@pytest.mark.parametrize("hvp", ["fwd_rev", "rev_rev"])
def test_the_pure_ift_equals_the_eager_reference(logreg, solver, hvp):
    tl, vl, w, lam = _losses(logreg)
    ref, ref_stats = ift_hypergradient(tl, vl, w, lam, solver)
    hg, sol, host = ift_tensors(tl, vl, solver, w, lam, hvp=hvp)
    torch.testing.assert_close(hg["lam"], ref["lam"], rtol=1e-9, atol=1e-14)
    if ref_stats.residual is not None:
        assert float(sol.residual) == pytest.approx(ref_stats.residual, rel=1e-6, abs=1e-14)
    assert int(sol.iterations) == ref_stats.iterations
    if isinstance(solver, ConjugateGradient) and solver.tol > 0:
        assert rel_err(hg["lam"], logreg.direct()) < 1e-6  # converged CG: the dense solve's answer
    assert float(host[1]) == pytest.approx(ref_stats.val_loss)


def test_the_pure_ift_with_gauss_newton_damping_and_a_warm_start():
    split, w, lam = _mlp()
    val = lambda w_, lam_: split.output_loss(split.outputs(w_, lam_)) * 0.5  # noqa: E731
    from hoexp.method.curvature import GaussNewton

    x0 = torch.randn(tree.numel(w), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.01
    ref, _ = ift_hypergradient(
        split, val, w, lam, ConjugateGradient(6, 0.0), curvature=GaussNewton(), damping=0.1, x0=x0
    )
    hg, _, _ = ift_tensors(split, val, ConjugateGradient(6, 0.0), w, lam, x0, curvature="gauss_newton", damping=0.1)
    for k in ref:
        torch.testing.assert_close(hg[k], ref[k], rtol=1e-9, atol=1e-14)


class _NoForwardAD(torch.autograd.Function):
    """``tanh`` with a backward (twice differentiable through autograd) and no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_a_loss_torch_func_cannot_transform_falls_back_to_the_eager_path():
    ridge = Ridge.make(n=30, m=20, d=5, seed=4)
    tl = lambda W, H: ridge.train_loss({"w": _NoForwardAD.apply(W["w"])}, H)  # noqa: E731
    vl, w, lam = ridge.val_loss, {"w": ridge.w_star(ridge.raw)}, {"log_decay": ridge.raw}
    fn = CompiledIFT(ConjugateGradient(5, 0.0), lambda W, H: tl(W, H), lambda W, H: vl(W, H), compile=False)
    hg, stats = fn(w, lam)
    assert fn.fallback is not None and "failed" in fn.fallback and "eager" in stats.info
    ref, _ = ift_hypergradient(tl, vl, w, lam, ConjugateGradient(5, 0.0))
    torch.testing.assert_close(hg["log_decay"], ref["log_decay"])


def test_a_compile_failure_or_a_disagreement_falls_back(logreg, monkeypatch):
    tl, vl, w, lam = _losses(logreg)
    ref, _ = ift_hypergradient(tl, vl, w, lam, ConjugateGradient(5, 0.0))

    def broken(fn, **kw):
        def call(*args):
            raise RuntimeError("no C++ compiler\ndetail")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    fn = CompiledIFT(ConjugateGradient(5, 0.0), tl, vl)
    hg, stats = fn(w, lam)
    assert "RuntimeError: no C++ compiler" in fn.fallback and "eager" in stats.info
    torch.testing.assert_close(hg["lam"], ref["lam"])

    def wrong(fn, **kw):  # a "compiled" function that gets the hypergradient wrong
        def call(*args):
            hg, sol, host = fn(*args)
            return {k: 2 * v for k, v in hg.items()}, sol, host

        return call

    monkeypatch.setattr(torch, "compile", wrong)
    fn = CompiledIFT(ConjugateGradient(5, 0.0), tl, vl)
    hg, _ = fn(w, lam)
    assert "disagreed" in fn.fallback
    torch.testing.assert_close(hg["lam"], ref["lam"])


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize(
    "method, options",
    [("cg", dict(iterations=30, tol=1e-14)), ("neumann", dict(iterations=10, alpha=1.0)), ("exact", {})],
)
def test_the_compiled_hypergradient_equals_the_dense_solve(logreg, method, options):
    tl, vl, w, lam = _losses(logreg)
    eager, es = hoexp.hypergradient(tl, vl, w, lam, method=method, return_stats=True, **options)
    compiled, cs = hoexp.hypergradient(
        tl, vl, w, lam, method=method, return_stats=True, compile=True, hvp="rev_rev", **options
    )
    assert "eager" not in cs.info  # the compiled path ran (and agreed with the eager one on its first call)
    torch.testing.assert_close(compiled["lam"], eager["lam"], rtol=1e-9, atol=1e-14)
    if method != "neumann":  # CG run to convergence (12 unknowns), and the dense solve: the exact answer
        assert rel_err(compiled["lam"], logreg.direct()) < 1e-8


def _run_ift(overrides, steps=2):
    spec, exp, state, raw, train, val = setup(*overrides)
    m = build_method(spec)
    torch.manual_seed(0)
    out = []
    vb = next(val)
    for _ in range(steps):
        hg, state, stats = outer_step(m, exp.problem, exp.inner_opt, state, raw, train, vb, 3)
        out.append((hg, stats))
    return m, out


@pytest.mark.parametrize(
    "method",
    [["method=neumann"], ["method=cg", "method.iterations=4"], ["method=cg_gn"]],
    ids=["neumann", "cg", "cg_gn"],
)
def test_the_runner_s_hvp_modes_and_compiled_path_agree(method, monkeypatch):
    base = [*SMALL_MNIST, "hp=weight_decay", "dtype=float64", *method]
    _, ref = _run_ift(base)
    _, fwd = _run_ift([*base, "method.hvp=fwd_rev"])
    m, auto = _run_ift([*base, "method.hvp=auto"])
    assert isinstance(m, ImplicitMethod) and m.hvp.chosen.name in ("fwd_rev", "rev_rev")
    assert "solver/fwd_rev_over_rev_rev" in auto[0][1] and "solver/fwd_rev_over_rev_rev" not in auto[1][1]
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the pure function, run eagerly: no C++ here
    m, comp = _run_ift([*base, "method.compile=true"])
    assert all(f.fallback is None and f.checked for f in m._compiled.values())
    for other in (fwd, auto, comp):
        for (h0, s0), (h1, s1) in zip(ref, other):
            for k in h0:
                torch.testing.assert_close(h1[k], h0[k], rtol=1e-8, atol=1e-12)
            assert (
                s1["solver/hvps"] == s0["solver/hvps"] or "cg" in method[0]
            )  # eager CG stops early; the compiled one runs all


def test_compile_with_alpha_auto_is_refused():
    with pytest.raises(ConfigError, match="compile=true needs a fixed alpha"):
        compose_spec(["method=neumann", "method.alpha=auto", "method.compile=true"])
    with pytest.raises(ConfigError, match="method.hvp"):
        compose_spec(["method=cg", "method.hvp=sideways"])


# ------------------------------------------------------------------------------ fused last step
def _counting(problem, monkeypatch):
    """Count the training-loss evaluations (one per gradient; a plain step's ``step_loss`` calls it) of ``problem``."""
    calls, fn = {"n": 0}, problem.train_loss

    def counted(*a, **k):
        calls["n"] += 1
        return fn(*a, **k)

    monkeypatch.setattr(problem, "train_loss", counted)
    return calls


@pytest.mark.parametrize(
    "hp",
    [["hp=weight_decay", "optim/inner=nesterov"], ["hp=dropout", "optim/inner=adam"]],
    ids=["decay-nesterov", "dropout-adam"],
)
def test_a_fused_step_is_the_ift_before_the_last_step_and_plain_training(hp, monkeypatch):
    """``fuse_step``: the hypergradient is the unfused one at the weights before the last inner step (its
    Hessian batch the last step's), the inner state is that of plain training, one gradient fewer is taken,
    and the stream moves by ``inner_steps`` batches (no extra batch)."""
    base = [*SMALL_MNIST, "dtype=float64", "method=neumann", "method.terms=3", *hp]
    spec, exp, state, raw, train, val = setup(*base, "method.fuse_step=true")
    fused = build_method(spec)
    assert fused.extra_batches == 0
    calls = _counting(exp.problem, monkeypatch)
    hg_f, state_f, stats_f = outer_step(fused, exp.problem, exp.inner_opt, state, raw, train, next(val), 3)
    assert calls["n"] == 3  # 2 plain steps + the IFT's create_graph gradient, which the 3rd step reuses (unfused: 4)
    after_f = next(train)

    spec, exp, state, raw, train, val = setup(*base)
    plain = build_method(spec)
    calls = _counting(exp.problem, monkeypatch)
    hg_p, _, stats_p = outer_step(plain, exp.problem, exp.inner_opt, state, raw, train, next(val), 2)
    assert calls["n"] == 3  # unfused: 2 plain steps + the IFT's gradient, on the batch after them
    for k in hg_p:
        torch.testing.assert_close(hg_f[k], hg_p[k], rtol=1e-10, atol=1e-14)
    assert stats_f["solver/hvps"] == stats_p["solver/hvps"]

    spec, exp, state, raw, train, _ = setup(*base)
    ref, _, _ = train_inner(exp.problem, exp.inner_opt, state, raw, train, 3)
    assert state_f.step == ref.step == 3
    torch.testing.assert_close(state_f.params, ref.params, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state_f.opt_state, ref.opt_state, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(after_f, next(train))  # the same stream position


def test_fuse_step_refuses_compile_and_zero_inner_steps():
    with pytest.raises(ConfigError, match="fuse_step=true takes the last inner step's gradient from the eager IFT"):
        compose_spec(["method=neumann", "method.fuse_step=true", "method.compile=true"])
    spec, exp, state, raw, train, val = setup(*SMALL_MNIST, "hp=weight_decay", "method=t1t2", "method.fuse_step=true")
    with pytest.raises(HoexpError, match="fuse_step=true needs inner_steps >= 1"):
        outer_step(build_method(spec), exp.problem, exp.inner_opt, state, raw, train, next(val), 0)


# ------------------------------------------------------------------------------ checkpointing
def _rotating(ridge):
    def loss(w, h, t):
        idx = torch.arange(len(ridge.y)).roll(3 * t)[:20]
        r = ridge.X[idx] @ w["w"] - ridge.y[idx]
        return 0.5 * (r @ r) / 20 + 0.5 * (torch.exp(h["log_decay"]) * w["w"].square()).sum()

    return loss


@pytest.mark.parametrize(
    "opt_name, kw",
    [
        ("sgd", dict(lr=0.3, momentum=0.9, nesterov=True)),
        ("adam", dict(lr=0.05)),
        ("rmsprop", dict(lr=0.01, momentum=0.5)),
    ],
)
@pytest.mark.parametrize("truncate, every", [(None, 1), (None, 3), (None, 7), (None, 50), (5, 2)])
def test_checkpointed_unroll_equals_the_stored_trajectory(opt_name, kw, truncate, every):
    ridge = Ridge.make(n=30, m=20, d=5, seed=2)
    opt = build_optimizer(opt_name, **kw)
    w0 = {"w": torch.zeros(5, dtype=torch.float64)}
    args = (_rotating(ridge), lambda w, h: ridge.val_loss(w, h), opt, w0, opt.init(w0), {"log_decay": ridge.raw}, 12)
    ref = unrolled_hypergradient(*args, truncate=truncate)
    ck = unrolled_hypergradient(*args, truncate=truncate, checkpoint_every=every)
    torch.testing.assert_close(ck.hypergrad["log_decay"], ref.hypergrad["log_decay"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ck.params["w"], ref.params["w"], rtol=0, atol=0)
    assert ck.val_loss == ref.val_loss and ck.last_train_loss == ref.last_train_loss


def test_checkpointed_unroll_of_learning_rates_per_step_equals_the_stored_trajectory():
    ridge = Ridge.make(n=30, m=20, d=5, seed=3)
    opt = build_optimizer("sgd", lr=0.1, momentum=0.9)
    w0 = {"w": torch.zeros(5, dtype=torch.float64)}
    lrs = {"log_lr": torch.log(torch.full((8,), 0.1, dtype=torch.float64))}
    loss = lambda w, h, t: ridge.train_loss(w, {"log_decay": ridge.raw})  # noqa: E731
    args = (loss, lambda w, h: ridge.val_loss(w, h), opt, w0, opt.init(w0), lrs, 8)
    over = lambda h, t: {"lr": h["log_lr"][t].exp()}  # noqa: E731
    ref = unrolled_hypergradient(*args, overrides=over)
    ck = unrolled_hypergradient(*args, overrides=over, checkpoint_every=3)
    torch.testing.assert_close(ck.hypergrad["log_lr"], ref.hypergrad["log_lr"], rtol=1e-10, atol=1e-14)


def test_checkpointed_unroll_in_the_runner_with_dropout():
    base = [*SMALL_MNIST, "hp=dropout", "dtype=float64", "optim/inner=adam"]
    for method in (["method=unrolled"], ["method=truncated", "method.k=3"]):
        _, ref = _run_path([*base, *method])
        _, ck = _run_path([*base, *method, "method.checkpoint_every=2"])
        for k in ref:
            torch.testing.assert_close(ck[k], ref[k], rtol=1e-9, atol=1e-13)


def _run_path(overrides):
    spec, exp, state, raw, train, val = setup(*overrides)
    m = build_method(spec)
    hg, state, _ = outer_step(m, exp.problem, exp.inner_opt, state, raw, train, next(val), 5)
    return state, hg
