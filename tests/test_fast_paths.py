"""Fast paths agree with the simple reference paths they replace.

* optimizers: the multi-tensor (``torch._foreach_*``) update vs the per-tensor loop, and the
  opt-in ``torch.compile`` wrapper's fallbacks;
* solvers: CG with sparse convergence checks vs CG checking every iteration;
* IFT: the mixed term gathered during the solve's HVPs vs one separate VJP;
* forward mode: tangents for all hyperparameter directions at once (``torch.func.vmap``) vs one
  ``jvp`` per direction in a Python loop.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hoexp.optim import build_optimizer
from hoexp.optim.base import fast_path, reference_paths
from tests.test_optim import CASES, _case_id, grads_of, make_data, make_params


def _trajectory(opt, steps=6, dtype=torch.float64, no_grad=True, **overrides):
    data = make_data(dtype)
    params = make_params(dtype)
    state = opt.init(params)
    for _ in range(steps):
        p_req = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        grads = {k: g.detach() for k, g in grads_of(p_req, data).items()}
        if no_grad:
            with torch.no_grad():
                params, state = opt.update(params, grads, state, **overrides)
        else:
            params, state = opt.update(params, grads, state, **overrides)
    return params, state


def _assert_trees_equal(a, b, atol=0.0):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
        return
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_trees_equal(a[k], b[k], atol)
        return
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_trees_equal(x, y, atol)
        return
    assert a == b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_optimizer_multi_tensor_path_matches_reference(case, dtype):
    """Same kernels, same order: the fast path reproduces the per-tensor loop (to the last bit or so)."""
    name, kw = case[0], case[1]
    opt = build_optimizer(name, **kw)
    fast = _trajectory(opt, dtype=dtype)
    with reference_paths():
        ref = _trajectory(opt, dtype=dtype)
    _assert_trees_equal(fast, ref, atol=0.0)


def test_fast_path_is_taken_only_when_nothing_is_differentiated():
    p = {"w": torch.ones(3)}
    g = {"w": torch.ones(3)}
    assert fast_path((p, g), (0.1, 0.0))
    assert not fast_path((p, g), (torch.tensor(0.1), 0.0))  # a tensor hyperparameter
    assert not fast_path((p, g), ({"w": 0.1}, 0.0))  # per-parameter values
    assert not fast_path(({},), (0.1,))  # nothing to update
    q = {"w": torch.ones(3, requires_grad=True)}
    assert not fast_path((q, g), (0.1,))
    with torch.no_grad():
        assert fast_path((q, g), (0.1,))
    with reference_paths():
        assert not fast_path((p, g), (0.1,))
    seen = []
    torch.func.vmap(lambda x: seen.append(fast_path(({"w": x},), (0.1,))) or x)(torch.ones(2, 3))
    assert seen == [False]


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "adagrad"])
def test_differentiable_update_keeps_reference_path(name):
    """With a graph being built (params requiring grad, tensor lr) the update stays differentiable."""
    opt = build_optimizer(name, lr=0.05, **({"momentum": 0.9} if name == "sgd" else {}))
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    data = make_data(torch.float64)
    params = {k: v.requires_grad_(True) for k, v in make_params(torch.float64).items()}
    state = opt.init(params)
    for _ in range(3):
        params, state = opt.update(params, grads_of(params, data, create_graph=True), state, lr=lr)
    from tests.test_optim import mlp_loss

    (g,) = torch.autograd.grad(mlp_loss(params, data), lr)
    assert torch.isfinite(g) and float(g) != 0.0


@pytest.mark.parametrize("case", CASES[:4] + CASES[8:10], ids=[_case_id(c) for c in CASES[:4] + CASES[8:10]])
def test_multi_tensor_update_is_pure(case):
    name, kw = case[0], case[1]
    opt = build_optimizer(name, **kw)
    params, state = _trajectory(opt, steps=2)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    before = copy.deepcopy((params, grads, state))
    with torch.no_grad():
        new_params, new_state = opt.update(params, grads, state)
    _assert_trees_equal((params, grads, state), before)
    for k in params:
        assert new_params[k].data_ptr() != params[k].data_ptr()


# ----------------------------------------------------------------------------------- solvers
from hoexp.method.ift import HessianOperator, ift_hypergradient, mixed_term_is_deep  # noqa: E402
from hoexp.method.solvers import ConjugateGradient, FixedPoint, Neumann  # noqa: E402
from tests.problems import Ridge, rel_err  # noqa: E402


class _MatrixOp:
    def __init__(self, A, M=None):
        self.A, self.M, self.n = A, M, A.shape[0]
        self.tracks_mixed = M is not None
        self.hvps = 0

    def matvec(self, v):
        self.hvps += 1
        return self.A @ v

    def matvec_mixed(self, v):
        self.hvps += 1
        return self.A @ v, self.M @ v


def _spd(n=10, cond=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("every", [2, 3, 8])
@pytest.mark.parametrize("case", ["converges", "max_iterations", "indefinite", "zero_rhs"])
def test_cg_with_deferred_checks_matches_checking_every_iteration(case, every):
    A = _spd()
    b = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    iterations, tol = 50, 1e-12
    if case == "max_iterations":
        iterations = 4
    elif case == "indefinite":
        A = torch.diag(torch.tensor([3.0, 1.0, -1.0, 2.0], dtype=torch.float64))
        b = torch.ones(4, dtype=torch.float64)
    elif case == "zero_rhs":
        b = torch.zeros(10, dtype=torch.float64)
    ref = ConjugateGradient(iterations, tol, check_every=1)(_MatrixOp(A), b)
    op = _MatrixOp(A)
    fast = ConjugateGradient(iterations, tol, check_every=every)(op, b)
    assert torch.equal(fast.x, ref.x)  # the same iterates, bit for bit
    assert (fast.iterations, fast.info) == (ref.iterations, ref.info)
    assert fast.residual == pytest.approx(ref.residual, rel=1e-12, abs=1e-300)
    assert ref.hvps <= fast.hvps == op.hvps <= ref.hvps + every  # at most every − 1 HVPs wasted (+1 at start)
    if case == "converges":
        assert ref.info == "converged" and rel_err(A @ fast.x, b) < 1e-10


@pytest.mark.parametrize(
    "solver",
    [
        Neumann(7, 0.02, True),
        FixedPoint(7, 0.02, True),
        ConjugateGradient(6, 0.0),
        ConjugateGradient(6, 0.0, check_every=4),
    ],
    ids=["neumann", "fixed_point", "cg", "cg_deferred"],
)
def test_solvers_return_the_mixed_term_of_their_answer(solver):
    A = _spd()
    M = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    b = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    res = solver(_MatrixOp(A, M), b)
    assert res.mixed is not None and rel_err(res.mixed, M @ res.x) < 1e-12
    plain = solver(_MatrixOp(A), b)
    assert plain.mixed is None and torch.allclose(plain.x, res.x, rtol=1e-14, atol=0)


def test_neumann_without_residual_leaves_the_mixed_term_to_the_caller():
    A, eye = _spd(), torch.eye(10, dtype=torch.float64)
    res = Neumann(5, 0.02, residual=False)(_MatrixOp(A, eye), torch.ones(10, dtype=torch.float64))
    assert res.mixed is None and res.hvps == 5


# ------------------------------------------------------------------------------------- IFT
def _mlp_problem(deep: bool):
    """A 3→6→2 tanh MLP in float64 with per-weight decays (λ in a penalty) or input "dropout"
    rates (λ scales the inputs of the first layer: deep in the graph)."""
    g = torch.Generator().manual_seed(4)
    X, Xv = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(30, 3, generator=g, dtype=torch.float64)
    y, yv = X.sum(1).gt(0).long(), Xv.sum(1).gt(0).long()
    w = {
        "w1": 0.5 * torch.randn(3, 6, generator=g, dtype=torch.float64),
        "w2": 0.5 * torch.randn(6, 2, generator=g, dtype=torch.float64),
    }
    if deep:
        lam = {"keep": torch.zeros(3, dtype=torch.float64), "decay": torch.tensor(-3.0, dtype=torch.float64)}

        def train_loss(p, h):
            x = X * torch.sigmoid(h["keep"]) * 2
            ce = torch.nn.functional.cross_entropy(torch.tanh(x @ p["w1"]) @ p["w2"], y)
            return ce + 0.5 * torch.exp(h["decay"]) * sum((v**2).sum() for v in p.values())
    else:
        lam = {k: torch.full_like(v, -3.0) for k, v in w.items()}

        def train_loss(p, h):
            ce = torch.nn.functional.cross_entropy(torch.tanh(X @ p["w1"]) @ p["w2"], y)
            return ce + 0.5 * sum((torch.exp(h[k]) * p[k] ** 2).sum() for k in p)

    def val_loss(p, h):
        return torch.nn.functional.cross_entropy(torch.tanh(Xv @ p["w1"]) @ p["w2"], yv)

    return train_loss, val_loss, w, lam


@pytest.mark.parametrize("deep", [False, True], ids=["penalty", "deep"])
@pytest.mark.parametrize(
    "solver",
    [
        Neumann(5, 0.1, True),
        Neumann(5, 0.1, False),
        FixedPoint(5, 0.1, True),
        ConjugateGradient(8, 0.0),
        ConjugateGradient(8, 0.0, check_every=3),
    ],
    ids=["neumann", "neumann_nores", "fixed_point", "cg", "cg_deferred"],
)
def test_ift_merged_mixed_term_matches_separate_pass(solver, deep):
    train_loss, val_loss, w, lam = _mlp_problem(deep)
    ref, ref_stats = ift_hypergradient(train_loss, val_loss, w, lam, solver, mixed="separate")
    got, stats = ift_hypergradient(train_loss, val_loss, w, lam, solver, mixed="merged")
    auto, _ = ift_hypergradient(train_loss, val_loss, w, lam, solver)
    for k in lam:
        assert rel_err(got[k], ref[k]) < 1e-12, k
        assert rel_err(auto[k], ref[k]) < 1e-12, k
    assert stats.hvps == ref_stats.hvps
    if ref_stats.residual is None:
        assert stats.residual is None
    else:
        assert stats.residual == pytest.approx(ref_stats.residual, rel=1e-10)
    assert float(sum(v.norm() for v in ref.values())) > 0


def test_merged_mixed_term_saves_the_separate_pass(monkeypatch):
    train_loss, val_loss, w, lam = _mlp_problem(deep=True)
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    for mixed in ("separate", "merged"):
        calls.clear()
        ift_hypergradient(train_loss, val_loss, w, lam, Neumann(4, 0.1, True), mixed=mixed)
        if mixed == "separate":
            n_separate = len(calls)
    assert len(calls) == n_separate - 1  # val gradient, train gradient, 5 HVPs (no mixed-term pass)


def test_auto_merges_only_when_the_hyperparameters_act_deep_in_the_graph():
    for deep in (False, True):
        train_loss, _, w, lam = _mlp_problem(deep)
        wl = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        hl = {k: v.clone().requires_grad_(True) for k, v in lam.items()}
        g = torch.autograd.grad(train_loss(wl, hl), list(wl.values()), create_graph=True)
        flat = torch.cat([x.reshape(-1) for x in g])
        assert mixed_term_is_deep(flat, list(hl.values())) is deep
    with pytest.raises(ValueError, match="mixed must be"):
        ift_hypergradient(train_loss, train_loss, w, lam, Neumann(1), mixed="sometimes")


def test_hessian_operator_matvec_mixed_is_matvec_plus_mixed_vjp():
    train_loss, _, w, lam = _mlp_problem(deep=True)
    wl = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    hl = {k: v.clone().requires_grad_(True) for k, v in lam.items()}
    g = torch.autograd.grad(train_loss(wl, hl), list(wl.values()), create_graph=True)
    flat = torch.cat([x.reshape(-1) for x in g])
    op = HessianOperator(flat, list(wl.values()), list(hl.values()))
    v = torch.randn(flat.numel(), dtype=torch.float64)
    hv, mv = op.matvec_mixed(v)
    assert torch.allclose(hv, op.matvec(v), rtol=1e-13, atol=1e-15)
    ref = torch.cat([x.reshape(-1) for x in torch.autograd.grad(flat, list(hl.values()), v, retain_graph=True)])
    assert torch.allclose(mv, ref, rtol=1e-13, atol=1e-15) and op.hvps == 2


# --------------------------------------------------------------------------------- forward
from hoexp.method.forward import forward_hypergradient  # noqa: E402
from tests.test_unrolled_forward import OPTIMIZERS, make, t_loss, v_loss  # noqa: E402


@pytest.fixture(scope="module")
def ridge():
    return Ridge.make(n=30, m=20, d=5, seed=2)


@pytest.mark.parametrize("strategy, chunk_size", [("hessian", None), ("vmap", None), ("vmap", 2)])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_forward_strategies_match_the_loop(ridge, name, strategy, chunk_size):
    import warnings

    opt = make(name)
    w0 = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    lam = {"log_decay": ridge.raw, "log_lr": torch.tensor(-2.5, dtype=torch.float64)}

    def overrides(h, t):
        return {"lr": torch.exp(h["log_lr"])}

    args = (t_loss(ridge), v_loss(ridge), opt, {"w": w0}, opt.init({"w": w0}), lam, 8)
    ref = forward_hypergradient(*args, overrides=overrides, strategy="loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the loop
        fast = forward_hypergradient(*args, overrides=overrides, strategy=strategy, chunk_size=chunk_size)
    for k in lam:
        torch.testing.assert_close(fast.hypergrad[k], ref.hypergrad[k], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fast.params["w"], ref.params["w"], rtol=0, atol=1e-15)
    assert fast.opt_state.keys() == ref.opt_state.keys() and fast.opt_state["step"] == 8
    assert fast.val_loss == pytest.approx(ref.val_loss, rel=1e-14)
    assert fast.last_train_loss == pytest.approx(ref.last_train_loss, rel=1e-14)
