"""The library API, as a user with their own model calls it."""

import re
from pathlib import Path

import pytest
import torch

import hoexp
from tests.problems import Ridge, rel_err

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs_and_is_right():
    """The library example (docs/bring-your-own.md) executes, and its answer matches the closed-form ridge answer."""
    text = (ROOT / "docs" / "bring-your-own.md").read_text()
    block = re.search(r"## Library API\n\n```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(block, "bring-your-own.md", "exec"), scope)
    hg, X, y, Xv, yv = (scope[k] for k in ("hg", "X", "y", "Xv", "yv"))
    raw = scope["hparams"]["log_decay"].clone().requires_grad_(True)
    n = len(y)
    w_star = torch.linalg.solve(X.T @ X / n + torch.diag(raw.exp()), X.T @ y / n)
    (truth,) = torch.autograd.grad(0.5 * ((Xv @ w_star - yv) ** 2).mean(), raw)
    assert hg["log_decay"].shape == (8,)
    assert rel_err(hg["log_decay"], truth) < 1e-3  # float32, LBFGS-converged inner problem


def test_user_defined_problem_with_several_hparam_tensors():
    """Two hyperparameter tensors, one per weight tensor, on a problem this test builds itself."""
    ridge = Ridge.make(d=6, seed=7)
    d1 = 3

    def train_loss(p, h):
        w = torch.cat([p["a"], p["b"]])
        return ridge.train_loss({"w": w}, {"log_decay": torch.cat([h["la"], h["lb"]])})

    def val_loss(p, h):
        return ridge.val_loss({"w": torch.cat([p["a"], p["b"]])}, h)

    w = ridge.w_star(ridge.raw)
    params = {"a": w[:d1], "b": w[d1:]}
    hparams = {"la": ridge.raw[:d1], "lb": ridge.raw[d1:]}
    truth = ridge.exact_hypergradient()
    for method, opts in [
        ("exact", {}),
        ("cg", {"iterations": 50}),
        ("fixed_point", {"iterations": 3000, "alpha": 0.5}),
        ("neumann", {"iterations": 3000, "alpha": 0.5}),
    ]:
        hg, stats = hoexp.hypergradient(train_loss, val_loss, params, hparams, method, return_stats=True, **opts)
        assert set(hg) == {"la", "lb"} and hg["la"].shape == (d1,)
        assert rel_err(torch.cat([hg["la"], hg["lb"]]), truth) < 1e-6, (method, stats)


def test_unknown_option_is_refused():
    ridge = Ridge.make()
    with pytest.raises(ValueError, match="unknown option"):
        hoexp.hypergradient(
            ridge.train_loss,
            ridge.val_loss,
            {"w": ridge.w_star(ridge.raw)},
            {"log_decay": ridge.raw},
            "neumann",
            terms=3,
        )


# ----------------------------------------------------------------------- issue 17, item 11
def test_works_inside_no_grad_like_torch_func():
    ridge = Ridge.make()
    args = (ridge.train_loss, ridge.val_loss, {"w": ridge.w_star(ridge.raw)}, {"log_decay": ridge.raw}, "cg")
    with torch.no_grad():
        hg = hoexp.hypergradient(*args, iterations=50)
    assert rel_err(hg["log_decay"], ridge.exact_hypergradient()) < 1e-8


def test_a_shape_1_hyperparameter_whose_losses_are_shape_1():
    """One global decay of shape (1,): the losses broadcast to shape (1,) (was: stack expects each tensor to
    be equal size); the answer matches the closed form."""
    ridge = Ridge.make(d=4)
    n = len(ridge.y)

    def train_loss(p, h):  # shape (1,)
        r = ridge.X @ p["w"] - ridge.y
        return 0.5 * (r @ r) / n + 0.5 * torch.exp(h["ld"]) * (p["w"] ** 2).sum()

    def val_loss(p, h):
        return ridge.val_loss(p, h).reshape(1)

    ld = torch.tensor([-1.5], dtype=torch.float64)
    w = ridge.w_star(ld.expand(4))
    raw = ld.clone().requires_grad_(True)
    (truth,) = torch.autograd.grad(ridge.val_loss({"w": ridge.w_star(raw.expand(4))}, {}), raw)
    for method, opts in [("exact", {}), ("cg", {"iterations": 50})]:
        hg = hoexp.hypergradient(train_loss, val_loss, {"w": w}, {"ld": ld}, method, **opts)
        assert hg["ld"].shape == (1,) and rel_err(hg["ld"], truth) < 1e-8, method
    with pytest.raises(ValueError, match=r"train_loss must return one number \(a 0-d tensor\), got shape \(4,\)"):
        hoexp.hypergradient(lambda p, h: p["w"] ** 2, val_loss, {"w": w}, {"ld": ld})


def test_cg_without_solution_raises_naming_the_parameter():
    """The validation loss uses a parameter (an offset b) the training loss does not: H is zero in b's
    row, H u = ∂L_V/∂w has no solution, and CG ran off (residual 5e31 after 10 iterations, inf after 50)
    without complaint."""
    ridge = Ridge.make(d=4)
    w = {"w": ridge.w_star(ridge.raw), "b": torch.tensor(0.3, dtype=torch.float64)}

    def val_loss(p, h):
        r = ridge.Xv @ p["w"] + p["b"] - ridge.yv
        return 0.5 * (r @ r) / len(ridge.yv)

    for iterations in (10, 50):
        with pytest.raises(ValueError, match=r"val_loss depends on params \['b'\] but train_loss does not") as e:
            hoexp.hypergradient(ridge.train_loss, val_loss, w, {"log_decay": ridge.raw}, "cg", iterations=iterations)
        assert "\n" not in str(e.value)
    w_only = {"w": w["w"]}  # the fix the message names: b out of params (a constant of the problem)
    hg = hoexp.hypergradient(
        ridge.train_loss,
        lambda p, h: val_loss({**p, "b": w["b"]}, h),
        w_only,
        {"log_decay": ridge.raw},
        "cg",
        iterations=50,
    )
    assert torch.isfinite(hg["log_decay"]).all()


def test_a_diverged_solve_raises():
    """A non-finite solve of a well-posed problem (step far above 2/λ_max) is an error, not an answer."""
    ridge = Ridge.make(d=4)
    with pytest.raises(ValueError, match="the 'neumann' solve diverged"):
        hoexp.hypergradient(
            ridge.train_loss,
            ridge.val_loss,
            {"w": ridge.w_star(ridge.raw)},
            {"log_decay": ridge.raw},
            "neumann",
            iterations=2000,
            alpha=50.0,
        )


def test_a_solver_object_of_your_own_plugs_in():
    """``method`` may be a solver object (``solver(op, b) -> SolveResult``): a plain Richardson iteration written
    here matches the closed-form ridge hypergradient, as the named CG does."""
    from hoexp.method.solvers import SolveResult

    ridge = Ridge.make(d=5, seed=3)
    w = {"w": ridge.w_star(ridge.raw)}

    class Richardson:
        def __call__(self, op, b, x0=None):
            x = torch.zeros_like(b)
            for _ in range(3000):
                x = x + 0.2 * (b - op.matvec(x))
            return SolveResult(x, 3000, 3000, float((op.matvec(x) - b).norm() / b.norm()))

    truth = ridge.exact_hypergradient()
    mine = hoexp.hypergradient(ridge.train_loss, ridge.val_loss, w, {"log_decay": ridge.raw}, method=Richardson())
    assert rel_err(mine["log_decay"], truth) < 1e-6
    with pytest.raises(ValueError, match="apply to a named method"):
        hoexp.hypergradient(
            ridge.train_loss, ridge.val_loss, w, {"log_decay": ridge.raw}, method=Richardson(), iterations=3
        )


def test_readme_engine_example_runs():
    """The docs' hoexp.run example (objects made in Python, no config) executes and completes."""
    text = (ROOT / "docs" / "bring-your-own.md").read_text()
    section = text[text.index("## Library API") :]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    block = next(b for b in blocks if "hoexp.run(" in b)
    scope: dict = {}
    exec(compile(block, "bring-your-own.md", "exec"), scope)
    assert scope["summary"]["status"] == "completed" and scope["summary"]["hypergradients"] == 3


# ------------------------------------------------------------------ issue 28: bad inputs, diverged solvers
def _ridge_args(ridge):
    return ridge.train_loss, ridge.val_loss, {"w": ridge.w_star(ridge.raw)}, {"log_decay": ridge.raw}


@pytest.mark.parametrize("method", ["exact", "cg", "neumann", "fixed_point", "t1t2"])
@pytest.mark.parametrize("where", ["params", "hparams"])
def test_non_finite_inputs_are_named_before_any_solve(method, where):
    """NaN weights gave "the 'cg' solve diverged (residual 0, converged) ... pass damping > 0", and method="exact" a
    PyTorch "INTERNAL ASSERT FAILED, please report a bug"; now one line naming the input that is not finite."""
    train_loss, val_loss, params, hparams = _ridge_args(Ridge.make(d=4))
    bad = {"params": params, "hparams": hparams}[where]
    key = next(iter(bad))
    bad[key] = bad[key].clone()
    bad[key][1] = float("nan")
    with pytest.raises(ValueError) as e:
        hoexp.hypergradient(train_loss, val_loss, params, hparams, method)
    msg = str(e.value)
    assert msg.startswith(f"{where}[{key!r}] has 1 of 4 entries NaN or inf") and "\n" not in msg, msg
    assert "solve diverged" not in msg and "damping" not in msg


@pytest.mark.parametrize("method", ["exact", "cg", "neumann"])
def test_a_loss_that_is_not_finite_at_finite_inputs_is_named(method):
    """Finite params and hparams, but the training data the loss closes over holds a NaN: the error says the loss
    is NaN there (not "diverged ... pass damping"; exact no longer reaches LAPACK with NaN)."""
    ridge = Ridge.make(d=4)
    args = _ridge_args(ridge)  # w* from the clean data
    ridge.X[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^train_loss\(params, hparams\) is nan at finite params and hparams"):
        hoexp.hypergradient(*args, method)


def test_exact_solver_returns_nan_instead_of_crashing_on_a_nan_hessian():
    """The dense solve with a NaN Hessian (a run whose weights went NaN between evaluations): a NaN answer, which
    the run skips as a non-finite hypergradient, instead of LAPACK's assert from the least-squares fallback."""
    from hoexp.method.solvers import Exact

    class NaNOperator:
        n, hvps = 3, 0

        def dense(self):
            return torch.full((3, 3), float("nan"), dtype=torch.float64)

    res = Exact()(NaNOperator(), torch.ones(3, dtype=torch.float64))
    assert torch.isnan(res.x).all() and res.residual != res.residual and "non-finite" in res.info


@pytest.mark.parametrize(
    "method,options,expected",
    [
        ("cg", {"iterations": 0}, "iterations must be >= 1 (an integer), got 0"),
        ("neumann", {"iterations": -1}, "iterations must be >= 0 (an integer), got -1"),
        ("neumann", {"alpha": float("nan")}, "alpha must be > 0 and finite, or 'auto', got nan"),
        ("fixed_point", {"alpha": float("inf")}, "alpha must be > 0 and finite, or 'auto', got inf"),
        ("cg", {"tol": float("nan")}, "tol must be >= 0 and finite, got nan"),
        ("exact", {"max_params": 0}, "max_params must be >= 1 (an integer), got 0"),
        ("cg", {"damping": float("nan")}, "damping must be >= 0 and finite, got nan"),
        ("cg", {"damping": float("inf")}, "damping must be >= 0 and finite, got inf"),
    ],
)
def test_named_method_options_keep_the_configs_bounds(method, options, expected):
    """The API's options refuse what the config's factories refuse (cg with 0 iterations returned u = 0: a
    hypergradient without its implicit term)."""
    with pytest.raises(ValueError) as e:
        hoexp.hypergradient(*_ridge_args(Ridge.make(d=4)), method, **options)
    assert str(e.value) == expected


def test_hoexp_build_is_the_function_whatever_was_imported():
    """The README's flow: hoexp.compose(...) imports the build module (once hoexp/build.py, whose import made
    ``hoexp.build`` the module: TypeError: 'module' object is not callable); ``hoexp.build`` stays the function."""
    import inspect

    import hoexp.config.build  # noqa: F401 -- the submodule, imported as compose and the CLI import it

    spec, _ = hoexp.compose(["model.width=4", "model.depth=1", "outer_steps=1", "inner_steps=1", "device=cpu"])
    assert inspect.isfunction(hoexp.build)
    exp = hoexp.build(spec)
    assert exp.method.name == "neumann"
    from hoexp.config.build import preflight  # the module's other names stay importable

    assert callable(preflight)


class _Runaway:
    """A user's solver that diverges: ``u = 1e7·b``, residual ~1e7·‖H‖ (issue 28's run logged 1.8e14 silently)."""

    name = "runaway"

    def __call__(self, op, b, x0=None):
        from hoexp.method.solvers import SolveResult

        x = 1e7 * b
        return SolveResult(x, 1, 1, float((op.matvec(x) - b).norm() / b.norm()))


class _Messages:
    def __init__(self):
        self.lines = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def start_outer(self, step):
        pass

    def advance_inner(self, n=1):
        pass

    def end_outer(self, step, fields):
        pass

    def message(self, text):
        self.lines.append(text)


@pytest.mark.parametrize("solver", ["runaway", "exact"])
def test_a_diverging_solver_of_your_own_is_warned_about_once(solver, tiny_experiment):
    """A solver whose residual ‖Hu − v‖/‖v‖ exceeds 1 gets one warning during the run (only the named series did);
    a converged solve none."""
    from hoexp.method.implicit import ift
    from hoexp.method.solvers import Exact

    exp = tiny_experiment("outer_steps=3", "inner_steps=5")
    exp.method = ift(_Runaway() if solver == "runaway" else Exact(), name=solver)
    messages = _Messages()
    hoexp.run(exp, progress=messages)
    warned = [m for m in messages.lines if "residual" in m]
    if solver == "runaway":
        assert len(warned) == 1 and "> 1 at outer step 1" in warned[0] and "worse than u = 0" in warned[0], warned
    else:
        assert warned == [], warned


@pytest.mark.slow  # ~20 s on a shared 2-core CPU: importing Dynamo and tracing the solve once
def test_a_second_compiled_call_on_the_same_problem_reuses_the_compiled_graph(monkeypatch):
    """``hypergradient(compile=True)`` keys its cache on what identifies the problem (the caller's two losses, the
    solver, the options): a second call adds no entry and compiles nothing (the cache was keyed on loss wrappers
    made at every call, so each call compiled anew: 8 entries after one loop, slower than eager). Dynamo traces
    for real; a counting backend stands in for Inductor (no C++ build), and every graph it is handed is counted."""
    from hoexp import api

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": counting}))
    monkeypatch.setattr(api, "_COMPILED", type(api._COMPILED)())
    ridge = Ridge.make(n=30, m=20, d=3, seed=4)
    w, lam = {"w": ridge.w_star(ridge.raw)}, {"log_decay": ridge.raw}
    tl = lambda W, H: ridge.train_loss(W, H)  # noqa: E731
    vl = lambda W, H: ridge.val_loss(W, H)  # noqa: E731
    first, stats = hoexp.hypergradient(tl, vl, w, lam, method="cg", iterations=3, return_stats=True, compile=True)
    assert graphs and "eager" not in stats.info  # compiled, and agreed with the eager path
    compiled = len(graphs)
    for _ in range(3):
        again = hoexp.hypergradient(tl, vl, w, lam, method="cg", iterations=3, compile=True)
        torch.testing.assert_close(again["log_decay"], first["log_decay"], rtol=0, atol=0)
    assert len(graphs) == compiled and len(api._COMPILED) == 1  # no recompilation, no new entry
    assert rel_err(first["log_decay"], ridge.exact_hypergradient()) < 1e-8  # CG-3 on 3 unknowns: the exact answer
