"""Long-horizon IFT: warm starts, Gauss-Newton curvature, damping and alpha=auto, against exact answers
(closed-form ridge, dense Jacobians and Hessians, eigendecompositions), in float64."""

import io
import itertools
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from hoexp import tree
from hoexp.cli import compose_spec
from hoexp.config.run import Preempted, Run
from hoexp.errors import ConfigError
from hoexp.hp.composite import Composite
from hoexp.hp.dropout import Dropout
from hoexp.hp.weight_decay import WeightDecay
from hoexp.method.base import InnerState, outer_step
from hoexp.method.curvature import GaussNewton, GaussNewtonOperator, Hessian, HessianOperator, SplitLoss
from hoexp.method.ift import ift_hypergradient
from hoexp.method.implicit import ImplicitMethod
from hoexp.method.solvers import AutoStep, ConjugateGradient, Damped, Exact, FixedPoint, Neumann
from hoexp.model.lstm import LSTMLanguageModel
from hoexp.model.mlp import MLP
from hoexp.optim import build_optimizer
from hoexp.task import Classification, LanguageModel
from hoexp.task.streams import WithNoise
from tests.problems import Ridge, rel_err
from tests.stopping import StopAt as _StopAt
from tests.stopping import metrics as _metrics

D = torch.float64


# ------------------------------------------------------------------------------------------ helpers
def noisy_problem(model, x, y, seed=0, decay=1e-2):
    """``model`` with per-weight decay and per-unit dropout; one training batch with its dropout noise."""
    model = model.to(D)
    family = Composite((WeightDecay("per_weight", decay, ("*",)), Dropout(model.unit_shapes(), init_value=0.2)))
    problem = LanguageModel(model, family) if isinstance(model, LSTMLanguageModel) else Classification(model, family)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    batch = next(WithNoise(iter([(x, y)]), problem.noise, torch.Generator().manual_seed(seed)))
    return problem, params, family.init(params), batch


def relu_mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 4, generator=g, dtype=D), torch.randint(0, 3, (12,), generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MLP(4, 3, width=5, depth=2, activation="relu", bias=True)
    return noisy_problem(model, x, y, seed)


def tiny_lstm(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (5, 2), generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LSTMLanguageModel(7, 3, 3, layers=2, tie_weights=True)
    return noisy_problem(model, tokens[:-1], tokens[1:], seed)


def dense_parts(split, w, lam):
    """``(J, H_ℓ, ∇²r, H)`` formed explicitly: ``jacrev`` of the outputs, ``hessian`` of the rest."""
    w0 = tree.flatten(w.values())
    f = lambda x: split.outputs(tree.unflatten(x, w), lam)  # noqa: E731
    z = f(w0)
    J = torch.func.jacrev(f)(w0).reshape(z.numel(), -1)
    H_l = torch.func.hessian(lambda zz: split.output_loss(zz.reshape(z.shape)))(z.reshape(-1))
    H_r = torch.func.hessian(lambda x: split.penalty(tree.unflatten(x, w), lam))(w0)
    H = torch.func.hessian(lambda x: split(tree.unflatten(x, w), lam))(w0)
    return J, H_l, H_r, H


def grad_operator(curvature, split, w, lam):
    """The operator ``ift_hypergradient`` builds, outside it."""
    wl = tree.detached(w, requires_grad=True)
    g = torch.autograd.grad(split(wl, lam), list(wl.values()), create_graph=True)
    return curvature.operator(split, wl, lam, tree.flatten(g), None)


# ------------------------------------------------------------------------------------------ warm start
@pytest.fixture(scope="module")
def ridge():
    return Ridge.make(d=20, seed=2)


def _ridge_ift(ridge, solver, x0=None):
    return ift_hypergradient(
        ridge.train_loss, ridge.val_loss, {"w": ridge.w_star(ridge.raw)}, {"log_decay": ridge.raw}, solver, x0=x0
    )


@pytest.mark.parametrize("solver", [FixedPoint, Neumann])
def test_warm_fixed_point_over_calls_equals_one_long_solve(ridge, solver):
    """K iterations carried over J outer calls = K·J iterations of one solve (fixed inner state)."""
    alpha = 1.0 / float(torch.linalg.eigvalsh(ridge.hessian()).max())
    K, J = 3, 7
    u = None
    for _ in range(J):
        hg, stats = _ridge_ift(ridge, solver(K, alpha), u)
        u = stats.solution
    once, once_stats = _ridge_ift(ridge, FixedPoint(K * J, alpha))
    assert rel_err(u, once_stats.solution) < 1e-12
    assert rel_err(hg["log_decay"], once["log_decay"]) < 1e-12
    assert stats.residual == pytest.approx(once_stats.residual, rel=1e-9)
    assert stats.extra["solver/warm_norm"] > 0 and stats.hvps == K + 1  # K steps + the residual's HVP


def test_warm_cg_converges_to_the_exact_answer_over_calls(ridge):
    truth = ridge.exact_hypergradient()
    H = ridge.hessian()
    w = ridge.w_star(ridge.raw)
    u_star = torch.linalg.solve(H, ridge.Xv.T @ (ridge.Xv @ w - ridge.yv) / len(ridge.yv))
    errs, h_errs, u = [], [], None
    for _ in range(40):
        hg, stats = _ridge_ift(ridge, ConjugateGradient(iterations=2, tol=0.0), u)
        u = stats.solution
        errs.append(rel_err(hg["log_decay"], truth))
        h_errs.append(float((u - u_star) @ H @ (u - u_star)))
    assert errs[0] > 1e-2  # two CG iterations alone are far off
    assert errs[-1] < 1e-10, errs
    assert all(b < a for a, b in zip(h_errs[:25], h_errs[1:25])), h_errs  # restarted CG: H-norm error falls
    # A start whose shape does not match (e.g. another model) is dropped: a cold solve.
    hg, stats = _ridge_ift(ridge, ConjugateGradient(iterations=2, tol=0.0), torch.zeros(3, dtype=D))
    assert "solver/warm_norm" not in stats.extra and rel_err(hg["log_decay"], truth) == pytest.approx(errs[0])


def test_warm_cg_tracks_the_mixed_term_from_its_start(ridge):
    """With a mixed-tracking operator CG's answer includes ``M x0``: merged equals separate."""
    u = _ridge_ift(ridge, ConjugateGradient(2, tol=0.0))[1].solution
    w, lam = {"w": ridge.w_star(ridge.raw)}, {"log_decay": ridge.raw}
    sep = ift_hypergradient(ridge.train_loss, ridge.val_loss, w, lam, ConjugateGradient(2, tol=0.0), x0=u)[0]
    for every in (1, 4):
        merged = ift_hypergradient(
            ridge.train_loss,
            ridge.val_loss,
            w,
            lam,
            ConjugateGradient(2, tol=0.0, check_every=every),
            x0=u,
            mixed="merged",
        )[0]
        assert rel_err(merged["log_decay"], sep["log_decay"]) < 1e-12


def test_warm_start_vector_survives_checkpoint_and_resume(tmp_path):
    args = [
        "model.width=8",
        "dtype=float64",
        "progress=false",
        "outer_steps=5",
        "inner_steps=5",
        "checkpoint_every=1",
        "method=cg",
        "method.iterations=2",
        "method.warm_start=true",
        "method.curvature=gauss_newton",
        "method.damping=1e-3",
        "optim.outer.lr=0.1",
    ]
    quiet = dict(console=Console(file=io.StringIO()))
    ref = Run(compose_spec(args)[0], tmp_path / "ref", **quiet)
    ref.execute()
    assert isinstance(ref.exp.method.state_dict()["u"], torch.Tensor)
    assert all("solver/warm_norm" in m for m in _metrics(tmp_path / "ref")[2:])  # carried at every step
    with pytest.raises(Preempted):
        Run(compose_spec(args)[0], tmp_path / "cut", loggers=[_StopAt(3)], **quiet).execute()
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["method_state"]["u"].shape == (tree.numel(ckpt["params"]),)
    Run(compose_spec([*args, "resume=true"])[0], tmp_path / "cut", **quiet).execute()
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "ref")  # bit for bit
    # ... and the carried vector is what makes it so: resuming without it diverges from the reference.
    with pytest.raises(Preempted):
        Run(compose_spec(args)[0], tmp_path / "cold", loggers=[_StopAt(3)], **quiet).execute()
    ckpt = torch.load(tmp_path / "cold" / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "method_state": {}}, tmp_path / "cold" / "checkpoint.pt")
    Run(compose_spec([*args, "resume=true"])[0], tmp_path / "cold", **quiet).execute()
    assert _metrics(tmp_path / "cold")[:3] == _metrics(tmp_path / "ref")[:3]
    assert _metrics(tmp_path / "cold")[3] != _metrics(tmp_path / "ref")[3]


# ------------------------------------------------------------------------------------------ Gauss-Newton
@pytest.mark.parametrize("make", [relu_mlp, tiny_lstm], ids=["mlp", "lstm"])
def test_gauss_newton_products_match_the_explicit_matrix(make):
    problem, w, raw, batch = make()
    split = SplitLoss(*problem.train_parts(batch))
    assert split(w, raw) == problem.train_loss(w, raw, batch)  # the split is the training loss
    assert problem.masks(raw, batch)  # dropout masks are in the outputs
    J, H_l, H_r, H = dense_parts(split, w, raw)
    assert float(H_r.abs().sum()) > 0  # the weight-decay penalty is in
    G = J.T @ H_l @ J + H_r
    op = GaussNewtonOperator(split, w, raw)
    v = torch.randn(op.n, dtype=D, generator=torch.Generator().manual_seed(1))
    assert rel_err(op.matvec(v), G @ v) < 1e-12
    assert rel_err(op.dense(), G) < 1e-12 and op.hvps == 1 + op.n
    # The operator ift_hypergradient builds is the same, and Hessian's is the full Hessian.
    assert rel_err(grad_operator(GaussNewton(), split, w, raw).matvec(v), G @ v) < 1e-12
    assert rel_err(grad_operator(Hessian(), split, w, raw).matvec(v), H @ v) < 1e-12


def test_gauss_newton_is_psd_where_the_hessian_is_not_and_damping_shifts_it():
    problem, w, raw, batch = relu_mlp()
    split = SplitLoss(*problem.train_parts(batch))
    G = GaussNewtonOperator(split, w, raw).dense()
    H = grad_operator(Hessian(), split, w, raw).dense()
    eig_G, eig_H = torch.linalg.eigvalsh(0.5 * (G + G.T)), torch.linalg.eigvalsh(0.5 * (H + H.T))
    assert float(eig_H.min()) < -1e-4  # an indefinite Hessian
    assert float(eig_G.min()) >= -1e-10
    J, H_l, _, _ = dense_parts(split, w, raw)
    assert float(torch.linalg.eigvalsh(J.T @ H_l @ J).min()) >= -1e-10  # PSD without the penalty too
    mu = 0.37
    for op, eig in ((GaussNewtonOperator(split, w, raw), eig_G), (grad_operator(Hessian(), split, w, raw), eig_H)):
        damped = Damped(op, mu)
        Dm = damped.dense()
        assert torch.allclose(torch.linalg.eigvalsh(0.5 * (Dm + Dm.T)), eig + mu, atol=1e-12)
        v = torch.randn(op.n, dtype=D)
        assert torch.allclose(damped.matvec(v), Dm @ v, atol=1e-12)


def test_cg_with_gauss_newton_converges_where_hessian_cg_stops():
    problem, w, raw, batch = relu_mlp()
    split = SplitLoss(*problem.train_parts(batch))
    xv, yv = torch.randn(9, 4, dtype=D, generator=torch.Generator().manual_seed(5)), torch.arange(9) % 3

    def val(p, h):
        return problem.val_loss(p, h, (xv, yv))

    cg = ConjugateGradient(iterations=500, tol=1e-12)
    _, hess = ift_hypergradient(split, val, w, raw, cg)
    assert hess.info == "non-positive curvature" and hess.iterations < 20
    mu = 1e-4
    hg, ggn = ift_hypergradient(split, val, w, raw, cg, curvature=GaussNewton(), damping=mu)
    assert ggn.info == "converged" and ggn.residual < 1e-11
    exact, ex = ift_hypergradient(split, val, w, raw, Exact(), curvature=GaussNewton(), damping=mu)
    assert ex.residual < 1e-10
    a, b = tree.flatten(hg.values()), tree.flatten(exact.values())
    assert float(b.norm()) > 0 and rel_err(a, b) < 1e-7
    # The mixed term stays exact: the answer is ∂L_V/∂λ − (∂²L_T/∂λ∂w) u with (G + μI) u = ∂L_V/∂w.
    J, H_l, H_r, _ = dense_parts(split, w, raw)
    wl = tree.detached(w, requires_grad=True)
    v = tree.flatten(torch.autograd.grad(val(wl, raw), list(wl.values())))
    u = torch.linalg.solve(J.T @ H_l @ J + H_r + mu * torch.eye(len(v), dtype=D), v)
    lam = tree.detached(raw, requires_grad=True)
    g = tree.flatten(torch.autograd.grad(split(wl, lam), list(wl.values()), create_graph=True))
    mixed = torch.autograd.grad(g @ u, list(lam.values()), allow_unused=True)
    ref = tree.flatten([-m if m is not None else torch.zeros_like(x) for m, x in zip(mixed, lam.values())])
    assert rel_err(a, ref) < 1e-7


# ------------------------------------------------------------------------------------------ alpha=auto
@pytest.mark.parametrize("curvature", [Hessian(), GaussNewton()], ids=["hessian", "gauss_newton"])
def test_auto_alpha_is_one_over_lambda_max(curvature):
    problem, w, raw, batch = relu_mlp(seed=3)
    split = SplitLoss(*problem.train_parts(batch))
    op = grad_operator(curvature, split, w, raw)
    M = op.dense()
    lam_max = float(torch.linalg.eigvalsh(0.5 * (M + M.T)).abs().max())
    b = torch.randn(op.n, dtype=D)
    for mu in (0.0, 0.5):
        res = AutoStep(FixedPoint(3, alpha=123.0))(Damped(op, mu) if mu else op, b)
        if mu:
            lam_max = float(torch.linalg.eigvalsh(0.5 * (M + M.T) + mu * torch.eye(op.n, dtype=D)).abs().max())
        assert res.extra["solver/alpha"] == pytest.approx(1 / lam_max, rel=0.1)
        assert res.extra["solver/lambda_max"] == pytest.approx(lam_max, rel=0.1)
    # A given estimate is reused (no power iteration); its step is the wrapped solver's input.
    res = AutoStep(FixedPoint(3, alpha=123.0), lambda_max=4.0)(op, b)
    assert res.extra["solver/alpha"] == 0.25 and rel_err(res.x, FixedPoint(3, 0.25)(op, b).x) < 1e-15


def test_auto_alpha_is_re_estimated_every_alpha_every_steps_and_reset():
    problem, w, raw, batch = relu_mlp()
    val = (torch.randn(6, 4, dtype=D), torch.arange(6) % 3)
    opt = build_optimizer("sgd", lr=0.1)
    method = ImplicitMethod(FixedPoint(3, 0.01), "fixed_point", curvature=GaussNewton(), alpha_every=3, warm_start=True)
    state = InnerState(w, opt.init(w))
    hvps, alphas = [], []
    for _ in range(5):
        _, state, stats = outer_step(method, problem, opt, state, raw, itertools.repeat(batch), val, 0)
        hvps.append(stats["solver/hvps"])
        alphas.append(stats["solver/alpha"])
    assert hvps == [24, 4, 4, 24, 4]  # 20 power iterations on steps 1 and 4; 3 steps + the residual
    assert alphas[0] == alphas[1] == alphas[2] and alphas[3] == alphas[4]
    assert set(method.state_dict()) == {"u", "step", "lambda_max"} and method.state_dict()["step"] == 5
    method.load_state_dict({})  # reset_inner / a fresh run: estimate again, start from zero
    _, _, stats = outer_step(method, problem, opt, state, raw, itertools.repeat(batch), val, 0)
    assert stats["solver/hvps"] == 24 and "solver/warm_norm" not in stats
    # A stale estimate (α far above 2/λ_max) diverges: the next step estimates again, off the cadence, and
    # starts from zero (the diverged u is not carried).
    method.load_state_dict({"step": 1, "lambda_max": 1e-3})
    _, _, stats = outer_step(method, problem, opt, state, raw, itertools.repeat(batch), val, 0)
    assert (
        stats["solver/hvps"] == 4
        and stats["solver/residual"] > 1
        and method.state_dict() == {"step": 2, "lambda_max": None}
    )
    _, _, stats = outer_step(method, problem, opt, state, raw, itertools.repeat(batch), val, 0)
    assert stats["solver/hvps"] == 24 and stats["solver/residual"] < 1 and "solver/warm_norm" not in stats
    assert stats["solver/alpha"] == pytest.approx(alphas[0], rel=0.1)


def test_build_wires_the_options():
    from hoexp.config.build import build_method

    m = build_method(
        compose_spec(
            [
                "method=neumann",
                "method.alpha=auto",
                "method.alpha_every=4",
                "method.curvature=gauss_newton",
                "method.damping=0.01",
                "method.warm_start=true",
            ]
        )[0]
    )
    assert (m.alpha_every, m.curvature, m.damping, m.warm_start) == (4, GaussNewton(), 0.01, True)
    m = build_method(compose_spec(["method=cg"])[0])  # the defaults: the plain Hessian method
    assert (m.alpha_every, m.curvature, m.damping, m.warm_start) == (0, Hessian(), 0.0, False)
    assert isinstance(
        grad_operator(m.curvature, SplitLoss(*relu_mlp()[0].train_parts(relu_mlp()[3])), relu_mlp()[1], relu_mlp()[2]),
        HessianOperator,
    )


def test_the_ift_parts_compose_as_nested_nodes_and_shipped_methods_are_ift_with_a_solver(tmp_path):
    """docs/methods.md's YAML (``ift`` with a nested solver and curvature node) builds the same method as
    ``method=cg_gn`` with those options, and each shipped IFT method is ``ift`` with its solver's options beside
    the IFT's (each default written once: the solver factory's or ``ift``'s); labels are the YAML file's name."""
    import re

    from hoexp.config.build import build_method
    from hoexp.method import implicit, solvers

    block = re.search(r"```yaml\n(# method/cg_ggn_mine.yaml\n.*?)```", Path("docs/methods.md").read_text(), re.S)
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "cg_ggn_mine.yaml").write_text(block.group(1))
    mine = build_method(compose_spec(["method=cg_ggn_mine"], config_dir=tmp_path)[0])
    shipped = build_method(compose_spec(["method=cg_gn", "method.iterations=10", "method.name=cg_ggn_mine"])[0])
    assert mine == shipped and mine.solver == ConjugateGradient(10, 1e-10) and mine.curvature == GaussNewton()
    spec = compose_spec(["method=cg_gn"])[0]
    assert spec.method.name == build_method(spec).name == "cg_gn"  # was labelled cg
    for name, solve in [("neumann", solvers.neumann), ("cg", solvers.cg), ("exact", solvers.exact)]:
        assert build_method(compose_spec([f"method={name}"])[0]) == implicit.ift(solve(), name=name)
    auto = build_method(compose_spec(["method=fixed_point", "method.alpha=auto", "method.iterations=3"])[0])
    assert auto == implicit.ift(solvers.fixed_point(iterations=3, alpha="auto"), name="fixed_point")
    assert (auto.solver, auto.alpha_every) == (FixedPoint(3, 0.01), 10)
    with pytest.raises(ValueError, match="compile=true takes curvature=hessian or gauss_newton"):

        class Diagonal(Hessian):  # a curvature of one's own: eager only
            name = "diagonal"

        implicit.ift(solvers.cg(), curvature=Diagonal(), compile=True)
    with pytest.raises(ConfigError, match="unknown key 'method.terms' for method=cg_ggn_mine; valid keys: solver, "):
        compose_spec(["method=cg_ggn_mine", "+method.terms=3"], config_dir=tmp_path)


def test_library_api_accepts_damping_and_auto_alpha(ridge):
    from hoexp.api import hypergradient

    w, lam = {"w": ridge.w_star(ridge.raw)}, {"log_decay": ridge.raw}
    mu = 0.3
    hg = hypergradient(ridge.train_loss, ridge.val_loss, w, lam, "exact", damping=mu)
    v = ridge.Xv.T @ (ridge.Xv @ w["w"] - ridge.yv) / len(ridge.yv)
    u = torch.linalg.solve(ridge.hessian() + mu * torch.eye(len(v), dtype=D), v)
    assert rel_err(hg["log_decay"], -torch.exp(ridge.raw) * w["w"] * u) < 1e-12  # ∂²L_T/∂λ_i∂w_j = δ_ij e^λ_i w_i
    hg, stats = hypergradient(
        ridge.train_loss, ridge.val_loss, w, lam, "neumann", alpha="auto", iterations=2000, return_stats=True
    )
    assert rel_err(hg["log_decay"], ridge.exact_hypergradient()) < 1e-8
    assert stats.extra["solver/alpha"] == pytest.approx(
        1 / float(torch.linalg.eigvalsh(ridge.hessian()).max()), rel=0.1
    )
    with pytest.raises(ValueError, match="damping must be >= 0"):
        hypergradient(ridge.train_loss, ridge.val_loss, w, lam, "cg", damping=-1.0)
    with pytest.raises(ValueError, match="unknown curvature"):
        hypergradient(ridge.train_loss, ridge.val_loss, w, lam, "cg", curvature="fisher")
    with pytest.raises(TypeError, match="SplitLoss"):
        hypergradient(ridge.train_loss, ridge.val_loss, w, lam, "cg", curvature="gauss_newton")
    assert math.isfinite(float(hg["log_decay"].sum()))
