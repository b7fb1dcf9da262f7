"""IFT hypergradients against exact answers: closed-form ridge and a dense Hessian solve."""

import math

import pytest
import torch

from hoexp.api import hypergradient, make_solver
from hoexp.method.solvers import ConjugateGradient, Exact, FixedPoint, Neumann, power_iteration
from tests.problems import Ridge, cosine, rel_err


class MatrixOp:
    def __init__(self, A):
        self.A, self.n = A, A.shape[0]

    def matvec(self, v):
        return self.A @ v

    def dense(self):
        return self.A


def spd(n=12, cond=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return Q @ torch.diag(eig) @ Q.T, eig


def test_solvers_on_explicit_spd_matrix():
    A, eig = spd()
    b = torch.randn(A.shape[0], dtype=torch.float64)
    x_true = torch.linalg.solve(A, b)
    op = MatrixOp(A)
    assert rel_err(Exact()(op, b).x, x_true) < 1e-12
    cg = ConjugateGradient(iterations=100, tol=1e-13)(op, b)
    assert rel_err(cg.x, x_true) < 1e-10 and cg.info == "converged" and cg.residual < 1e-12
    alpha = 1.0 / float(eig.max())
    errs = [rel_err(Neumann(iterations=k, alpha=alpha)(op, b).x, x_true) for k in (0, 10, 100, 1000)]
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-6
    # Fixed-point iteration from zero produces the Neumann iterates.
    for k in (0, 3, 17):
        fp, nm = FixedPoint(iterations=k, alpha=alpha)(op, b), Neumann(iterations=k, alpha=alpha)(op, b)
        assert rel_err(fp.x, nm.x) < 1e-12
        assert fp.residual == pytest.approx(nm.residual, rel=1e-8)
    # The reported residual is the true ‖Ax − b‖/‖b‖.
    nm = Neumann(iterations=7, alpha=alpha)(op, b)
    assert nm.residual == pytest.approx(rel_err(A @ nm.x, b), rel=1e-10)


def test_cg_stops_on_negative_curvature():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    res = ConjugateGradient(iterations=10)(MatrixOp(A), torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert res.info == "non-positive curvature"


def test_neumann_diverges_above_two_over_lambda_max():
    A, eig = spd(cond=10.0)
    b = torch.ones(A.shape[0], dtype=torch.float64)
    res = Neumann(iterations=50, alpha=2.5 / float(eig.max()))(MatrixOp(A), b)
    assert res.residual > 1e3


def test_power_iteration_estimates_lambda_max():
    A, eig = spd(cond=30.0)
    lam = power_iteration(lambda v: A @ v, A.shape[0], 200, like=A)
    assert lam == pytest.approx(float(eig.max()), rel=1e-3)


@pytest.fixture(scope="module")
def ridge():
    return Ridge.make()


def test_exact_and_cg_match_closed_form_ridge(ridge):
    truth = ridge.exact_hypergradient()
    w = {"w": ridge.w_star(ridge.raw)}
    lam = {"log_decay": ridge.raw}
    for method, opts in [("exact", {}), ("cg", {"iterations": 100, "tol": 1e-14})]:
        hg, stats = hypergradient(ridge.train_loss, ridge.val_loss, w, lam, method, return_stats=True, **opts)
        assert set(hg) == {"log_decay"} and hg["log_decay"].shape == ridge.raw.shape
        assert rel_err(hg["log_decay"], truth) <= 1e-8, method
        assert stats.inner_grad_norm < 1e-10  # w* is stationary
    # Inputs are left untouched (no graph, no requires_grad).
    assert not w["w"].requires_grad and not lam["log_decay"].requires_grad


def test_neumann_error_falls_with_terms_on_ridge(ridge):
    truth = ridge.exact_hypergradient()
    w = {"w": ridge.w_star(ridge.raw)}
    lam = {"log_decay": ridge.raw}
    alpha = 1.0 / float(torch.linalg.eigvalsh(ridge.hessian()).max())
    errs = []
    for k in (0, 5, 25, 100, 400):
        hg = hypergradient(ridge.train_loss, ridge.val_loss, w, lam, "neumann", iterations=k, alpha=alpha)
        errs.append(rel_err(hg["log_decay"], truth))
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-4, errs


def test_direct_term_is_included():
    """An hparam that enters L_V directly: dL_V/dλ = ∂L_V/∂λ + (implicit part)."""
    ridge = Ridge.make(d=4, seed=3)
    w = {"w": ridge.w_star(ridge.raw)}
    raw_scale = torch.tensor(0.3, dtype=torch.float64)

    def val_loss(p, h):
        return ridge.val_loss(p, h) * torch.exp(h["scale"])

    def exact(raw, s):
        return val_loss({"w": ridge.w_star(raw)}, {"log_decay": raw, "scale": s})

    raw = ridge.raw.clone().requires_grad_(True)
    s = raw_scale.clone().requires_grad_(True)
    g_raw, g_s = torch.autograd.grad(exact(raw, s), (raw, s))
    hg = hypergradient(ridge.train_loss, val_loss, w, {"log_decay": ridge.raw, "scale": raw_scale}, "exact")
    assert rel_err(hg["log_decay"], g_raw) < 1e-8
    assert float(hg["scale"]) == pytest.approx(float(g_s), rel=1e-10)


def _tiny_mlp_problem():
    """A 3→6→2 tanh MLP with per-weight decays, trained to stationarity in float64."""
    g = torch.Generator().manual_seed(1)
    X, Xv = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(30, 3, generator=g, dtype=torch.float64)
    teacher = torch.randn(3, 2, generator=g, dtype=torch.float64)
    y, yv = (X @ teacher).argmax(1), (Xv @ teacher).argmax(1)
    params = {
        "w1": 0.5 * torch.randn(3, 6, generator=g, dtype=torch.float64),
        "w2": 0.5 * torch.randn(6, 2, generator=g, dtype=torch.float64),
    }
    hparams = {k: torch.full_like(v, math.log(1e-2)) for k, v in params.items()}

    def forward(p, x):
        return torch.tanh(x @ p["w1"]) @ p["w2"]

    def train_loss(p, h):
        ce = torch.nn.functional.cross_entropy(forward(p, X), y)
        return ce + 0.5 * sum((torch.exp(h[k]) * p[k] ** 2).sum() for k in p)

    def val_loss(p, h):
        return torch.nn.functional.cross_entropy(forward(p, Xv), yv)

    w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.LBFGS(
        list(w.values()),
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = train_loss(w, hparams)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return train_loss, val_loss, {k: v.detach() for k, v in w.items()}, hparams


def test_cg_and_neumann_match_dense_solve_on_tiny_mlp():
    train_loss, val_loss, w, lam = _tiny_mlp_problem()
    exact, stats = hypergradient(train_loss, val_loss, w, lam, "exact", return_stats=True)
    assert stats.inner_grad_norm < 1e-6
    assert stats.residual < 1e-10
    ref = torch.cat([v.reshape(-1) for v in exact.values()])
    assert float(ref.norm()) > 0

    # The dense solve itself is right: compare with torch.func.hessian of the flat loss.
    from hoexp import tree

    flat = tree.flatten(w.values())

    def flat_train(v):
        return train_loss(tree.unflatten(v, w), lam)

    H = torch.func.hessian(flat_train)(flat)
    assert torch.linalg.eigvalsh(H).min() > 0  # a strict local minimum: the IFT applies
    cg = hypergradient(train_loss, val_loss, w, lam, "cg", iterations=200, tol=1e-12)
    cg_flat = torch.cat([v.reshape(-1) for v in cg.values()])
    assert cosine(cg_flat, ref) >= 0.999 and rel_err(cg_flat, ref) < 1e-6
    alpha = 1.0 / float(torch.linalg.eigvalsh(H).max())
    cos_by_terms = []
    for k in (1, 10, 100, 2000):
        nm = hypergradient(train_loss, val_loss, w, lam, "neumann", iterations=k, alpha=alpha)
        cos_by_terms.append(cosine(torch.cat([v.reshape(-1) for v in nm.values()]), ref))
    assert cos_by_terms[-1] >= 0.999, cos_by_terms
    assert cos_by_terms[0] < cos_by_terms[-1]


def test_make_solver_validates_options():
    with pytest.raises(ValueError, match="unknown method 'lbfgs'"):
        make_solver("lbfgs")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        make_solver("neumann", alpha=0.0)
    with pytest.raises(ValueError, match="iterations must be >= 1"):  # CG with no iteration returns u = 0
        make_solver("cg", iterations=-1)
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        make_solver("neumann", iterations=-1)
    with pytest.raises(ValueError, match="unknown option"):
        make_solver("exact", alpha=1.0)


def test_exact_refuses_large_models():
    A, _ = spd(n=12)
    with pytest.raises(ValueError, match="max_params"):
        Exact(max_params=10)(MatrixOp(A), torch.ones(12, dtype=torch.float64))


def test_t1t2_is_the_one_step_formula_on_ridge(ridge):
    """T1-T2 (Luketina et al.): dL_V/dλ ≈ −(∂²L_T/∂λ∂w)·α·∂L_V/∂w; on ridge ∂²L_T/∂λ_i∂w_j = δ_ij e^{λ_i} w_i."""
    w = ridge.w_star(ridge.raw)
    alpha = 0.3
    v = ridge.Xv.T @ (ridge.Xv @ w - ridge.yv) / len(ridge.yv)  # ∂L_V/∂w
    expected = -torch.exp(ridge.raw) * w * alpha * v
    hg = hypergradient(ridge.train_loss, ridge.val_loss, {"w": w}, {"log_decay": ridge.raw}, "t1t2", alpha=alpha)
    assert rel_err(hg["log_decay"], expected) < 1e-12
    # ... and it is biased: far from the IFT answer on this problem.
    assert rel_err(hg["log_decay"], ridge.exact_hypergradient()) > 0.1


def test_the_ift_modules_import_each_other_without_a_cycle():
    """``ift`` (the hypergradient, eager and compiled) builds on ``functional`` (pure products), never the reverse,
    counting imports inside functions too (``ift`` ↔ ``functional`` was a cycle)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "hoexp"
    names = ("ift", "implicit", "functional", "products", "solvers")
    mods = {f"hoexp.method.{m}": root / "method" / f"{m}.py" for m in names}
    mods |= {"hoexp.method.curvature": root / "method" / "curvature.py", "hoexp.api": root / "api.py"}
    edges = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        edges[name] = found & set(mods) - {name}
    assert "hoexp.method.functional" in edges["hoexp.method.ift"]  # the rule sees the edges it checks

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in edges[a])

    assert not [m for m in mods if reaches(m, m)], edges
