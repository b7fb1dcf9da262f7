"""The method × family matrix: every cell gives a hypergradient that agrees with a reference, or a clean refusal.

References: path methods (unrolled, truncated with k = T, forward, reversible) against central finite
differences of L_V(w_T(λ)) along a random direction, with the same batches and dropout noise;
IFT methods at a converged inner optimum against finite differences of L_V(w*(λ)) (exact), or against
the exact dense solve (CG, Neumann, fixed point), or the one-step formula (T1-T2).
"""

import itertools

import pytest
import torch

from hoexp.cli import compose_spec
from hoexp.config.build import build, build_method
from hoexp.engine import start
from hoexp.errors import ConfigError
from hoexp.method.base import InnerState, outer_step, train_inner
from hoexp.task.streams import FullBatch

FAMILIES = {
    "wd_global": ["hp=weight_decay", "hp.weight_decay.granularity=global", "hp.weight_decay.init=0.05"],
    "wd_per_layer": ["hp=weight_decay", "hp.weight_decay.granularity=per_layer", "hp.weight_decay.init=0.05"],
    "wd_per_weight": ["hp=weight_decay", "hp.weight_decay.init=0.05"],
    "wd_layer_and_weight": [
        "hp=weight_decay",
        "hp.weight_decay.init=0.05",
        "hp.weight_decay.granularity=layer_and_weight",
        "hp.weight_decay.offset_scale=0.5",
    ],
    "dropout_per_layer": [
        "hp=[weight_decay,dropout]",
        "hp.weight_decay.granularity=global",
        "hp.weight_decay.init=0.05",
        "hp.dropout.granularity=per_layer",
    ],
    "dropout_per_unit": [
        "hp=[weight_decay,dropout]",
        "hp.weight_decay.granularity=global",
        "hp.weight_decay.init=0.05",
        "hp.dropout.init=0.1",
    ],
    "dropout_gaussian_layer_and_unit": [
        "hp=[weight_decay,dropout]",
        "hp.weight_decay.granularity=global",
        "hp.weight_decay.init=0.05",
        "hp.dropout.init=0.1",
        "hp.dropout.relaxation=gaussian",
        "hp.dropout.granularity=layer_and_unit",
        "hp.dropout.offset_scale=0.5",
    ],
    "dropout_gaussian_global": [
        "hp=[weight_decay,dropout]",
        "hp.weight_decay.granularity=global",
        "hp.weight_decay.init=0.05",
        "hp.dropout.init=0.1",
        "hp.dropout.relaxation=gaussian",
        "hp.dropout.granularity=global",
    ],
    "dropout_bernoulli_per_layer": [  # standard dropout: hard masks, no pathwise derivative
        "hp=[weight_decay,dropout]",
        "hp.weight_decay.granularity=global",
        "hp.weight_decay.init=0.05",
        "hp.dropout.granularity=per_layer",
        "hp.dropout.relaxation=bernoulli",
    ],
    "lr_global": ["hp=lr"],
    "lr_per_layer": ["hp=lr", "hp.lr.granularity=per_layer"],
    "lr_per_step": ["hp=lr", "hp.lr.granularity=per_step"],
    "momentum": ["hp=momentum"],
}
METHODS = {
    "none": ["method=none"],
    "exact": ["method=exact"],
    "cg": ["method=cg", "method.iterations=200", "method.tol=1e-13"],
    "neumann": ["method=neumann", "method.terms=3000", "method.alpha=0.3"],
    "fixed_point": ["method=fixed_point", "method.iterations=3000", "method.alpha=0.3"],
    "t1t2": ["method=t1t2", "method.alpha=0.3"],
    "fd": ["method=fd", "method.alpha=0.3", "method.eps=1e-5"],  # the T1-T2 answer, mixed term by differences
    "unrolled": ["method=unrolled"],
    "truncated": ["method=truncated", "method.k=6"],  # k = T: the full derivative
    "forward": ["method=forward"],
    "reversible": ["method=reversible"],
    "hd": ["method=hd"],
    "stn": ["method=stn"],
}
BASE = [
    "model.width=5",
    "model.depth=1",
    "model.activation=tanh",
    "model.bias=false",
    "dtype=float64",
    "progress=false",
    "inner_steps=6",
    "optim/inner=momentum",
    "optim.inner.lr=0.2",
    "optim.inner.momentum=0.5",
]
IFT = {"exact", "cg", "neumann", "fixed_point", "t1t2", "fd"}  # fd: first-order, at the inner optimum too
PATH_ONLY = {"lr_global", "lr_per_layer", "lr_per_step", "momentum"}

EXPECTED_REFUSALS = {
    **{(m, f): "cannot tune hp=" for m in IFT for f in PATH_ONLY},
    **{("hd", f): "method=hd adapts one global learning rate" for f in FAMILIES if f != "lr_global"},
    **{
        (m, "dropout_bernoulli_per_layer"): "relaxation=bernoulli has no pathwise derivative"
        for m in METHODS
        if m not in ("none", "hd", "stn")
    },
    **{("stn", f): "method=stn fits the best response" for f in PATH_ONLY},
}


def _dir(raw, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in raw.items()}


def _dot(a, b):
    return sum(float((a[k] * b[k]).sum()) for k in a)


def _shift(raw, d, eps):
    return {k: raw[k] + eps * d[k] for k in raw}


def _setup(overrides):
    spec = compose_spec([*BASE, *overrides])[0]
    exp = build(spec)
    st = start(exp)
    return spec, exp, st.inner.params, st.raw, exp.problem.with_noise(FullBatch(exp.data.train), 0)


# The hierarchical and global granularities change only how a family maps raw values to decays and rates, not
# what a method differentiates: one IFT, one path and one one-step method check them (and `none` runs them).
HIERARCHICAL = {"wd_layer_and_weight", "dropout_gaussian_layer_and_unit", "dropout_gaussian_global"}
CELLS = [
    (m, f)
    for m, f in itertools.product(METHODS, FAMILIES)
    if f not in HIERARCHICAL or m in ("none", "exact", "unrolled", "t1t2", "fd")
]


@pytest.mark.slow
@pytest.mark.parametrize("method,family", CELLS)
def test_matrix_cell(method, family):
    overrides = [*FAMILIES[family], *METHODS[method]]
    if (method, family) in EXPECTED_REFUSALS:
        with pytest.raises(ConfigError, match=EXPECTED_REFUSALS[(method, family)]):
            build(compose_spec([*BASE, *overrides])[0])  # refused before any training (IFT × lr: when composed)
        return
    spec, exp, params, raw, stream = _setup(overrides)
    problem, opt = exp.problem, exp.inner_opt
    val = (exp.data.val.x, exp.data.val.y)
    m = build_method(spec)
    if method in ("none", "hd"):
        hg, state, stats = outer_step(m, problem, opt, InnerState(params, opt.init(params)), raw, stream, val, 6)
        assert hg is None and all(torch.isfinite(v).all() for v in state.params.values())
        if method == "hd":
            assert stats["hd/lr"] != 0.2
        return
    if method in IFT:
        _check_ift(method, spec, exp, params, raw, stream, val)
        return
    if method == "stn":
        _check_stn(m, problem, opt, params, raw, stream, val)
        return
    # Path methods: the same 6 batches (and dropout noise) for the method and the reference.
    batches = [next(stream) for _ in range(6)]
    hg, _, _ = outer_step(m, problem, opt, InnerState(params, opt.init(params)), raw, iter(batches), val, 6)
    assert all(torch.isfinite(v).all() for v in hg.values())

    def objective(r):
        st, _, _ = train_inner(problem, opt, InnerState(params, opt.init(params)), r, iter(batches), 6)
        return float(problem.val_loss(st.params, r, val))

    d = _dir(raw)
    eps = 1e-5
    fd = (objective(_shift(raw, d, eps)) - objective(_shift(raw, d, -eps))) / (2 * eps)
    assert abs(fd) > 1e-9
    assert _dot(hg, d) == pytest.approx(fd, rel=2e-5 if method == "reversible" else 1e-6, abs=1e-10)


def _check_ift(method, spec, exp, params, raw, stream, val):
    """At a converged inner optimum of one (noisy) training batch."""
    problem = exp.problem
    batch = next(stream)

    def solve_inner(r):
        w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        lbfgs = torch.optim.LBFGS(
            list(w.values()),
            max_iter=400,
            tolerance_grad=1e-13,
            tolerance_change=1e-15,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure():
            lbfgs.zero_grad()
            loss = problem.train_loss(w, r, batch)
            loss.backward()
            return loss

        for _ in range(3):
            lbfgs.step(closure)
        # Newton steps with the dense Hessian polish w* to machine precision (finite differences need it).
        from hoexp import tree

        flat = tree.flatten(v.detach() for v in w.values())

        def f(x):
            return problem.train_loss(tree.unflatten(x, params), r, batch)

        for _ in range(3):
            g = torch.func.grad(f)(flat)
            flat = flat - torch.linalg.solve(torch.func.hessian(f)(flat), g)
        return tree.unflatten(flat, params)

    w_star = solve_inner(raw)

    class Once:  # the method draws its Hessian batch from the stream: give it the same batch
        def __next__(self):
            return batch

    state = InnerState(w_star, exp.inner_opt.init(w_star))
    if method in ("neumann", "fixed_point"):  # a step that makes the series converge: α = 1/λ_max(H)
        from hoexp import tree
        from hoexp.method.solvers import power_iteration

        flat = tree.flatten(w_star.values())
        H = torch.func.hessian(lambda x: problem.train_loss(tree.unflatten(x, params), raw, batch))(flat)
        lam = power_iteration(lambda v: H @ v, H.shape[0], 300, like=flat)
        assert torch.linalg.eigvalsh(H).min() > 0
        key = "terms" if method == "neumann" else "iterations"
        spec = compose_spec(
            [*BASE, *spec_overrides(spec), f"method={method}", f"method.{key}=2000", f"method.alpha={1.0 / lam}"]
        )[0]
    hg, _, stats = outer_step(build_method(spec), problem, exp.inner_opt, state, raw, Once(), val, 0)
    assert all(torch.isfinite(v).all() for v in hg.values())
    assert method == "fd" or stats["inner/grad_norm"] < 1e-6  # (fd takes no step here: it logs the steps' norm)
    exact_spec = compose_spec([*BASE, *[o for o in spec_overrides(spec)], "method=exact"])[0]
    exact, _, _ = outer_step(build_method(exact_spec), problem, exp.inner_opt, state, raw, Once(), val, 0)
    d = _dir(raw)
    if method == "exact":
        eps = 1e-5
        fd = (
            float(problem.val_loss(solve_inner(_shift(raw, d, eps)), raw, val))
            - float(problem.val_loss(solve_inner(_shift(raw, d, -eps)), raw, val))
        ) / (2 * eps)
        assert _dot(hg, d) == pytest.approx(fd, rel=1e-4, abs=1e-9)
    elif method in ("t1t2", "fd"):
        # −(∂²L_T/∂λ∂w)·α·∂L_V/∂w, computed as the λ-gradient of the scalar ∇_w L_T · (α v).
        w = {k: v.clone().requires_grad_(True) for k, v in w_star.items()}
        r = {k: v.clone().requires_grad_(True) for k, v in raw.items()}
        v = torch.autograd.grad(problem.val_loss(w, r, val), list(w.values()))
        g = torch.autograd.grad(problem.train_loss(w, r, batch), list(w.values()), create_graph=True)
        s = sum((gi * 0.3 * vi).sum() for gi, vi in zip(g, v))
        ref = torch.autograd.grad(s, list(r.values()))
        for (k, h), x in zip(hg.items(), ref):  # fd: O(ε²) truncation (dropout), O(δ/ε) rounding
            assert torch.allclose(
                h, -x, rtol=1e-9 if method == "t1t2" else 1e-6, atol=1e-14 if method == "t1t2" else 1e-11
            ), k
    else:
        a = torch.cat([hg[k].flatten() for k in hg])
        b = torch.cat([exact[k].flatten() for k in hg])
        assert float((a - b).norm() / b.norm()) < (5e-3 if method in ("neumann", "fixed_point") else 1e-6), method


def _check_stn(m, problem, opt, params, raw, stream, val):
    """STN approximates the best response (its answer is checked on ridge in tests/test_stn.py); here: it trains
    with every family, and its hypergradient is ``d L_V(ŵ(λ))/dλ`` through the fitted response, the
    Jacobian of ``ŵ`` formed by ``jacrev``."""
    from hoexp import tree
    from hoexp.method.stn import offset, respond

    hg, state, _ = outer_step(m, problem, opt, InnerState(params, opt.init(params)), raw, stream, val, 6)
    assert all(torch.isfinite(v).all() for v in hg.values()) and float(tree.norm(hg)) > 0
    response, centre = m.state_dict()["response"], m.state_dict()["centre"]
    flat = tree.flatten(centre.values())

    def w_hat(x):
        return tree.flatten(respond(state.params, response, offset(tree.unflatten(x, centre), centre)).values())

    J = torch.func.jacrev(w_hat)(flat)
    w = tree.flatten(state.params.values()).requires_grad_(True)
    (gw,) = torch.autograd.grad(problem.val_loss(tree.unflatten(w, state.params), raw, val), w)
    assert torch.allclose(tree.flatten(hg.values()), gw @ J, rtol=1e-10, atol=1e-14)


def spec_overrides(spec):
    """The family overrides of a spec (method-independent), to build the matching exact reference."""
    out = ["hp=[" + ",".join(h.name for h in spec.hp) + "]"]
    for h in spec.hp:
        for key in ("granularity", "init"):
            if hasattr(h, key) and getattr(h, key) is not None:
                out.append(f"hp.{h.name}.{key}={getattr(h, key)}")
    return out
