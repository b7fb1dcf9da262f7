"""The library API, as a user with their own model calls it."""

import re
from pathlib import Path

import pytest
import torch

import hoexp
from tests.problems import Ridge, rel_err

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs_and_is_right():
    """The README's library example executes, and its answer matches the closed-form ridge answer."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Library API\n\n```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
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
    for method, opts in [("exact", {}), ("cg", {"iterations": 50}), ("fixed_point", {"iterations": 3000, "alpha": 0.5}),
                         ("neumann", {"iterations": 3000, "alpha": 0.5})]:
        hg, stats = hoexp.hypergradient(train_loss, val_loss, params, hparams, method, return_stats=True, **opts)
        assert set(hg) == {"la", "lb"} and hg["la"].shape == (d1,)
        assert rel_err(torch.cat([hg["la"], hg["lb"]]), truth) < 1e-6, (method, stats)


def test_unknown_option_is_refused():
    ridge = Ridge.make()
    with pytest.raises(ValueError, match="unknown option"):
        hoexp.hypergradient(ridge.train_loss, ridge.val_loss, {"w": ridge.w_star(ridge.raw)},
                            {"log_decay": ridge.raw}, "neumann", terms=3)
