"""Reversible learning: exact reversal, buffer size, and hypergradients against independent references
(float64 unrolled autograd, central finite differences, the closed-form ridge IFT answer)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hoexp.hp.weight_decay import WeightDecay
from hoexp.method.base import InnerState, outer_step
from hoexp.method.fixed_point import InfoBuffer, from_fixed, rational_momentum
from hoexp.method.reversible import ReversibleMethod, reversible_hypergradient
from hoexp.model.mlp import MLP
from hoexp.task import Classification
from tests.problems import Ridge, rel_err

SHAPES = {"w1": (8, 4), "b1": (8,), "w2": (3, 8), "b2": (3,)}  # P = 67


def mlp_problem(seed=0, batches=3):
    """A tanh MLP on random 3-class data; per-layer log weight decays; minibatch ``t % batches`` at step t.

    Initial weights are multiples of 2^-30, so the fixed-point conversion (radix 2^-50) is exact and
    the recovered weights can be compared bit for bit with the input itself.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batches, 16, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (batches, 16), generator=g)
    Xv = torch.randn(24, 4, generator=g, dtype=torch.float64)
    yv = torch.randint(0, 3, (24,), generator=g)
    p0 = {
        k: torch.round(0.5 * torch.randn(*s, generator=g, dtype=torch.float64) * 2**30) / 2**30
        for k, s in SHAPES.items()
    }
    raw = {
        "w1": torch.tensor(math.log(3e-2), dtype=torch.float64),
        "w2": torch.tensor(math.log(1e-2), dtype=torch.float64),
    }

    def logits(p, x):
        return torch.tanh(x.to(p["w1"].dtype) @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    def train_loss(p, r, t):
        i = t % batches
        pen = 0.5 * sum(torch.exp(r[k]) * (p[k] ** 2).sum() for k in r)
        return F.cross_entropy(logits(p, X[i]), y[i]) + pen

    def val_loss(p, r):
        return F.cross_entropy(logits(p, Xv), yv)

    return train_loss, val_loss, p0, raw


def unrolled(train_loss, val_loss, p0, raw, lrs, momenta, steps):
    """Reference: plain float64 autograd through the T steps, storing the whole graph."""
    raw = {k: v.detach().clone().requires_grad_(True) for k, v in raw.items()}
    lrs = lrs.detach().clone().to(torch.float64).requires_grad_(True)
    gam = momenta.detach().clone().to(torch.float64).requires_grad_(True)
    w0 = {k: v.detach().clone().requires_grad_(True) for k, v in p0.items()}
    w, v = dict(w0), {k: torch.zeros_like(x) for k, x in w0.items()}
    for t in range(steps):
        g = dict(zip(w, torch.autograd.grad(train_loss(w, raw, t), list(w.values()), create_graph=True)))
        v = {k: gam[t] * v[k] - (1 - gam[t]) * g[k] for k in w}
        w = {k: w[k] + lrs[t] * v[k] for k in w}
    loss = val_loss(w, raw)
    grads = torch.autograd.grad(loss, [*raw.values(), lrs, gam, *w0.values()])
    n = len(raw)
    return (
        float(loss.detach()),
        dict(zip(raw, grads[:n])),
        grads[n],
        grads[n + 1],
        dict(zip(w0, grads[n + 2 :])),
        {k: x.detach() for k, x in w.items()},
    )


def naive_float_reversal_drift(train_loss, p0, raw, lr, gamma, steps, dtype):
    """Max |w_0 − reversed w_0| when the same steps are run forward and backward in plain floats."""

    def grad(w, t):
        w = {k: x.detach().requires_grad_(True) for k, x in w.items()}
        return dict(zip(w, torch.autograd.grad(train_loss(w, raw, t), list(w.values()))))

    w = {k: x.to(dtype) for k, x in p0.items()}
    v = {k: torch.zeros_like(x) for k, x in w.items()}
    for t in range(steps):
        g = grad(w, t)
        v = {k: gamma * v[k] - (1 - gamma) * g[k] for k in w}
        w = {k: w[k] + lr * v[k] for k in w}
    for t in reversed(range(steps)):
        w = {k: w[k] - lr * v[k] for k in w}
        g = grad(w, t)
        v = {k: (v[k] + (1 - gamma) * g[k]) / gamma for k in w}
    return max(float((w[k].double() - p0[k]).abs().max()) for k in w)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("gamma", [0.9, 0.5])
def test_reversal_is_bit_exact_where_float_reversal_drifts(gamma):
    train_loss, val_loss, p0, raw = mlp_problem()
    T, lr = 100, 0.3
    res = reversible_hypergradient(train_loss, val_loss, p0, raw, lr, gamma, T, return_trajectory_check=True)
    # Bit for bit: the fixed-point integers, the float view (= the input itself), the whole trajectory.
    assert torch.equal(res.params0_fixed_recovered, res.params0_fixed)
    assert torch.equal(res.velocity0_fixed_recovered, torch.zeros_like(res.params0_fixed))
    assert all(torch.equal(res.params0_recovered[k], p0[k]) for k in p0)
    assert res.trajectory_exact == [True] * T
    assert res.buffer_bits_after_reverse == 0 < res.bits_used  # every stored bit was used up again
    assert max(float((res.params[k] - p0[k]).abs().max()) for k in p0) > 0.05  # training did move w

    eps, amp = 2.0**-53, (1 / gamma) ** T
    drift64 = naive_float_reversal_drift(train_loss, p0, raw, lr, gamma, T, torch.float64)
    if gamma == 0.9:
        # (1/γ)^T·eps ≈ 4e-12: float64 drifts by about that much (measured 1.1e-12), float32 by 2e-4.
        assert 1e-2 * amp * eps < drift64 < 1e2 * amp * eps, drift64
        drift32 = naive_float_reversal_drift(train_loss, p0, raw, lr, gamma, T, torch.float32)
        assert drift32 > 1e-5, drift32
    else:
        # (1/2)^-100·eps ≈ 1e14: the naive reversal is garbage (measured 1.5e12), the exact one is not.
        assert drift64 > 1.0, drift64


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_buffer_size_within_bound(gamma):
    train_loss, val_loss, p0, raw = mlp_problem()
    T = 100
    res = reversible_hypergradient(train_loss, val_loss, p0, raw, 0.3, gamma, T)
    P = res.num_params
    assert res.bits_bound == pytest.approx(T * P * math.log2(1 / float(res.momenta_used[0])), rel=1e-12)
    assert res.bits_bound == pytest.approx(T * P * math.log2(1 / gamma), rel=1e-3)
    # bit_length(B_i) ≤ T·log2(1/γ) + log2(1/(1−γ)) + 1 per weight (proof in the module docstring).
    const = math.log2(1 / (1 - gamma)) + 1
    assert res.bits_max_per_weight <= T * math.log2(1 / gamma) + const
    assert res.bits_used <= res.bits_bound + P * const
    # ... and it really stores that information (it cannot be much smaller).
    assert res.bits_used >= res.bits_bound - P * (const + 2)


def test_info_buffer_push_pop_inverse():
    buf = InfoBuffer(5)
    digits = [(torch.tensor([0, 1, 2, 6, 3]), 7), (torch.tensor([2**31, 5, 0, 1, 2**32 - 1]), 2**32)]
    for d, base in digits:
        buf.push(d, base)
    assert buf.bits_used() > 5 * 32
    for d, base in reversed(digits):
        assert torch.equal(buf.pop(base), d)
    assert buf.bits_used() == 0


def test_hypergradients_match_unrolled_float64_autograd():
    train_loss, _, p0, raw = mlp_problem()

    def val_loss(p, r):  # with a direct λ term, so ∂L_V/∂λ is checked too
        return mlp_problem()[1](p, r) + 0.1 * torch.exp(r["w2"])

    T = 40
    g = torch.Generator().manual_seed(1)
    lrs = 0.2 + 0.2 * torch.rand(T, generator=g, dtype=torch.float64)
    momenta = 0.7 + 0.25 * torch.rand(T, generator=g, dtype=torch.float64)
    res = reversible_hypergradient(train_loss, val_loss, p0, raw, lrs, momenta, T)
    assert (res.momenta_used - momenta).abs().max() <= 2.0**-17
    loss, d_raw, d_lrs, d_gam, d_w0, wT = unrolled(train_loss, val_loss, p0, raw, lrs, res.momenta_used, T)
    assert res.val_loss == pytest.approx(loss, rel=1e-10)
    # The fixed-point dynamics stay within rounding of float64 (< 2^-34 per γ-multiplication; measured 4e-10).
    assert max(float((res.params[k] - wT[k]).abs().max()) for k in wT) < 1e-8
    assert rel_err(torch.stack([res.hyper_raw[k] for k in raw]), torch.stack([d_raw[k] for k in raw])) < 1e-6
    for k in raw:
        assert float(res.hyper_raw[k]) == pytest.approx(float(d_raw[k]), rel=1e-5)
    assert rel_err(res.hyper_lrs, d_lrs) < 1e-6
    assert rel_err(res.hyper_momenta, d_gam) < 1e-6
    assert (
        rel_err(torch.cat([res.hyper_params0[k].reshape(-1) for k in p0]), torch.cat([d_w0[k].reshape(-1) for k in p0]))
        < 1e-6
    )
    assert float(d_lrs.abs().min()) > 0 and float(res.hyper_momenta.abs().max()) > 1e-3  # non-trivial


def test_hypergradients_match_central_finite_differences():
    train_loss, val_loss, p0, _ = mlp_problem()

    def train_global(p, r, t):  # one global log decay, a scalar hyperparameter
        return train_loss(p, {"w1": r["wd"], "w2": r["wd"]}, t)

    T, h = 30, 1e-4
    raw = {"wd": torch.tensor(math.log(2e-2), dtype=torch.float64)}
    base_lr = torch.linspace(0.4, 0.2, T, dtype=torch.float64)
    gam = torch.full((T,), 0.875, dtype=torch.float64)  # exactly representable: N/D with D = 2^16

    def f(r=0.0, s=1.0, dg=0.0):  # L_V after T plain float64 steps (smooth, unlike the fixed-point forward)
        return unrolled(train_global, val_loss, p0, {"wd": raw["wd"] + r}, s * base_lr, gam + dg, T)[0]

    res = reversible_hypergradient(train_global, val_loss, p0, raw, base_lr, gam, T)
    fd_wd = (f(r=h) - f(r=-h)) / (2 * h)
    assert float(res.hyper_raw["wd"]) == pytest.approx(fd_wd, rel=1e-6)
    fd_lr = (f(s=1 + h) - f(s=1 - h)) / (2 * h)  # d/ds L_V(s·α) = Σ_t α_t ∂L_V/∂α_t
    assert float(res.hyper_lrs @ base_lr) == pytest.approx(fd_lr, rel=1e-6)
    hg = 2.0**-14  # on the 2^-16 grid, so the rational γ moves by exactly ±hg
    fd_gam = (f(dg=hg) - f(dg=-hg)) / (2 * hg)
    assert float(res.hyper_momenta.sum()) == pytest.approx(fd_gam, rel=1e-6)


def test_ridge_from_w_star_approaches_ift_hypergradient():
    rp = Ridge.make()
    raw = {"log_decay": rp.raw}
    w_star = {"w": rp.w_star(rp.raw)}
    exact = rp.exact_hypergradient()
    errs = []
    for T in (20, 200):
        res = reversible_hypergradient(lambda p, r, t: rp.train_loss(p, r), rp.val_loss, w_star, raw, 0.5, 0.9, T)
        errs.append(rel_err(res.hyper_raw["log_decay"], exact))
    assert errs[1] < 1e-4 and errs[1] < 0.01 * errs[0], errs  # converges to the IFT answer as T grows


def test_reversible_method_outer_step_matches_unrolled_problem():
    torch.manual_seed(0)
    model = MLP(4, 3, width=6, depth=1, activation="tanh").double()
    family = WeightDecay(granularity="per_layer", init_value=1e-2)
    problem = Classification(model, family)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    raw = family.init(params)
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
        for _ in range(3)
    ]
    val_batch = (torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
    T, calls = 12, []
    method = ReversibleMethod(lr=0.3, momentum=0.9)
    n, d = rational_momentum(0.9, method.momentum_bits)
    state = InnerState(params, {"sentinel": 1}, step=5)
    hg, new_state, stats = outer_step(
        method, problem, None, state, raw, itertools.cycle(batches), val_batch, T, lambda: calls.append(1)
    )
    _, d_raw, _, _, _, wT = unrolled(
        lambda p, r, t: problem.train_loss(p, r, batches[t % 3]),
        lambda p, r: problem.val_loss(p, r, val_batch),
        params,
        raw,
        torch.full((T,), 0.3, dtype=torch.float64),
        torch.full((T,), n / d, dtype=torch.float64),
        T,
    )
    for k in raw:
        assert float(hg[k]) == pytest.approx(float(d_raw[k]), rel=1e-6)
    assert max(float((new_state.params[k] - wT[k]).abs().max()) for k in wT) < 1e-8
    assert new_state.step == 5 + T and new_state.opt_state == {"sentinel": 1} and len(calls) == T
    P = sum(p.numel() for p in params.values())
    bpws = stats["reversible/bits_per_weight_step"]
    assert 0 < bpws <= math.log2(1 / 0.9) + (math.log2(10) + 1) / T
    assert stats["reversible/memory_ratio_vs_float32_trajectory"] == pytest.approx(32 / bpws)
    assert stats["hypergrad/norm"] == pytest.approx(float(torch.stack(list(d_raw.values())).norm()), rel=1e-6)
    assert stats["solver/hvps"] == T and P == 51


def test_overflow_and_invalid_momentum_are_refused():
    train_loss, val_loss, p0, raw = mlp_problem()
    with pytest.raises(OverflowError):
        reversible_hypergradient(train_loss, val_loss, {k: v * 1e6 for k, v in p0.items()}, raw, 0.1, 0.9, 2)
    with pytest.raises(ValueError, match="momentum"):
        reversible_hypergradient(train_loss, val_loss, p0, raw, 0.1, 0.0, 2)
    assert float(from_fixed(torch.tensor([2**44]), 44)) == 1.0


# ------------------------------------------------------- learning rates and momentum (issue 17, item 12)
LR_BASE = [
    "model.width=5",
    "model.depth=1",
    "model.activation=tanh",
    "model.bias=false",
    "dtype=float64",
    "progress=false",
    "inner_steps=8",
    "optim/inner=momentum",
    "optim.inner.lr=0.2",
    "optim.inner.momentum=0.75",
]


@pytest.mark.parametrize(
    "family",
    [
        ["hp=lr", "hp.lr.granularity=per_step"],
        ["hp=lr", "hp.lr.granularity=per_layer"],
        ["hp=momentum"],
        ["hp=[lr,momentum]", "hp.lr.granularity=per_step"],
    ],
    ids=["lr_per_step", "lr_per_layer", "momentum", "lr_per_step+momentum"],
)
def test_reversible_learns_lr_schedules_and_momentum_like_unrolled_reverse_mode(family):
    """Maclaurin et al.'s use: per-layer, per-step learning rates and momentum. The reversible
    hypergradient equals unrolled reverse mode through torch-style momentum SGD (the runner's
    optim/inner=momentum) and central finite differences of the same 8 steps."""
    from hoexp.cli import compose_spec
    from hoexp.config.build import build, build_method
    from hoexp.method.base import train_inner
    from hoexp.task.streams import FullBatch

    spec = compose_spec([*LR_BASE, *family, "method=reversible"])[0]
    exp = build(spec)
    params = {k: v.detach().clone() for k, v in exp.model.named_parameters()}
    raw = exp.problem.family.init(params)
    g = torch.Generator().manual_seed(5)  # a non-constant schedule, so every step's rate matters
    raw = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in raw.items()}
    # Momenta on the 2^-16 grid reversible learning uses (else its γ differs from μ by up to 2^-17).
    mus = iter([0.875, 0.625])
    raw = {
        k: torch.logit(torch.tensor(next(mus), dtype=v.dtype)) if k.startswith("momentum:") else v
        for k, v in raw.items()
    }
    stream = exp.problem.with_noise(FullBatch(exp.data.train), 0)
    batches = [next(stream) for _ in range(8)]
    val = (exp.data.val.x, exp.data.val.y)
    problem, opt = exp.problem, exp.inner_opt
    out = {}
    for name in ("reversible", "unrolled"):
        m = build_method(compose_spec([*LR_BASE, *family, f"method={name}"])[0])
        out[name] = outer_step(m, problem, opt, InnerState(params, opt.init(params)), raw, iter(batches), val, 8)[0]
    rev, unr = (torch.cat([out[n][k].reshape(-1) for k in raw]) for n in ("reversible", "unrolled"))
    assert rev.numel() == sum(v.numel() for v in raw.values()) and float(rev.abs().min()) > 0
    assert rel_err(rev, unr) < 1e-6, (rev, unr)

    def objective(r):
        st, _, _ = train_inner(problem, opt, InnerState(params, opt.init(params)), r, iter(batches), 8)
        return float(problem.val_loss(st.params, r, val))

    d = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in raw.items()}
    eps = 1e-5
    fd = (objective({k: raw[k] + eps * d[k] for k in raw}) - objective({k: raw[k] - eps * d[k] for k in raw})) / (
        2 * eps
    )
    assert sum(float((out["reversible"][k] * d[k]).sum()) for k in raw) == pytest.approx(fd, rel=2e-5)


def test_reversible_with_a_learning_rate_is_no_longer_refused(tmp_path):
    import io

    from rich.console import Console

    from hoexp.cli import compose_spec
    from hoexp.config.run import run_experiment

    spec, _ = compose_spec([*LR_BASE, "hp=lr", "hp.lr.granularity=per_step", "method=reversible", "outer_steps=2"])
    summary = run_experiment(spec, tmp_path, console=Console(file=io.StringIO()))
    assert summary["status"] == "completed" and summary["hypergradients"] == 2 and summary["num_hparams"] == 16
    assert summary["hp_final"]["moved_fraction"] > 0
