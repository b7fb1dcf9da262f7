"""SOBA, SABA and AmIGO (hoexp/method/single_loop.py, amigo.py) against a bilevel problem with a closed-form solution:
the fixed point of their joint iteration is the exact hypergradient, their linear-system vector the IFT solution,
λ the bilevel optimum λ*; SABA's variance reduction converges with constant steps where SOBA keeps its noise; a run
cut and resumed is bit-exact."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from hoexp import tree
from hoexp.cli import compose_spec
from hoexp.config.build import build
from hoexp.config.run import Preempted, Run
from hoexp.errors import ConfigError, HoexpError
from hoexp.method.amigo import AmIGO, cg_steps
from hoexp.method.base import outer_step
from hoexp.method.compiled_derivatives import CompiledDerivatives
from hoexp.method.minibatch import Chunks, SagaTable, chunk
from hoexp.method.single_loop import SingleLoop, train_flat, val_flat
from hoexp.optim import Optimizer
from hoexp.optim.sgd import sgd
from hoexp.types import Batch, InnerState, OuterStep
from tests.stopping import StopAt, metrics

D = torch.float64


class PriorRidge:
    """``L_T = ½ mean_B (x·w − y)² + ½c‖w − λ‖²``, ``L_V = ½ mean_B' (x·w − y)² + ½ε‖λ‖²`` (a finite sum over
    examples). ``w*(λ) = w0 + Mλ`` with ``A = XᵀX/n + cI``, ``w0 = A⁻¹Xᵀy/n``, ``M = cA⁻¹``, so ``L_V(w*(λ), λ)`` is
    quadratic in λ: ``λ* = −(MᵀQM + εI)⁻¹ Mᵀ(Q w0 − p)``, ``Q = X_vᵀX_v/m``, ``p = X_vᵀy_v/m``."""

    compile, precision, batch_dim = False, None, 0

    def __init__(self, n=40, m=30, d=5, c=1.0, eps=0.1, seed=0):
        g = torch.Generator().manual_seed(seed)
        w_true = torch.randn(d, generator=g, dtype=D)
        self.X = torch.randn(n, d, generator=g, dtype=D)
        self.y = self.X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=D)
        self.Xv = torch.randn(m, d, generator=g, dtype=D)
        self.yv = self.Xv @ w_true + 0.5 * torch.randn(m, generator=g, dtype=D)
        self.c, self.eps, self.d = c, eps, d
        self.compiled = {}
        self.family = SimpleNamespace(optimizer_overrides=lambda raw, t: {})
        self.A = self.X.T @ self.X / n + c * torch.eye(d, dtype=D)  # the Hessian ∇²_ww L_T

    def train_loss(self, params, raw, batch):
        r = batch[0] @ params["w"] - batch[1]
        return 0.5 * (r @ r) / len(r) + 0.5 * self.c * ((params["w"] - raw["lam"]) ** 2).sum()

    step_loss = train_loss

    def val_loss(self, params, raw, batch):
        r = batch[0] @ params["w"] - batch[1]
        return 0.5 * (r @ r) / len(r) + 0.5 * self.eps * (raw["lam"] ** 2).sum()

    def w_star(self, lam):
        return torch.linalg.solve(self.A, self.X.T @ self.y / len(self.y) + self.c * lam)

    def val_grad_w(self, w):
        return self.Xv.T @ (self.Xv @ w - self.yv) / len(self.yv)

    def exact_hypergradient(self, lam):
        lam = lam.detach().clone().requires_grad_(True)
        w = self.w_star(lam)
        (g,) = torch.autograd.grad(self.val_loss({"w": w}, {"lam": lam}, (self.Xv, self.yv)), lam)
        return g

    def lam_star(self):
        M = self.c * torch.linalg.inv(self.A)
        Q, p = self.Xv.T @ self.Xv / len(self.yv), self.Xv.T @ self.yv / len(self.yv)
        w0 = self.w_star(torch.zeros(self.d, dtype=D))
        return -torch.linalg.solve(M.T @ Q @ M + self.eps * torch.eye(self.d, dtype=D), M.T @ (Q @ w0 - p))


TASK = PriorRidge()
FROZEN = Optimizer("frozen", lambda p: {}, lambda p, g, s, **_: (p, s), {"lr": 0.3})  # w stays where it is


def drive(method, steps, inner_opt, outer_lr, inner_steps=1, lam0=None, w0=None):
    """``steps`` outer steps of ``method`` on the whole splits (the method cuts its own minibatches), λ moved by
    plain SGD; returns the last inner state, λ and every step's hypergradient."""
    params = {"w": torch.zeros(TASK.d, dtype=D) if w0 is None else w0}
    inner = InnerState(params, inner_opt.init(params))
    raw = {"lam": torch.zeros(TASK.d, dtype=D) if lam0 is None else lam0}
    train, val = Batch(TASK.X, TASK.y), Batch(TASK.Xv, TASK.yv)
    hypergrads = []
    for _ in range(steps):
        res = method(OuterStep(TASK, inner_opt, inner, raw, [train] * inner_steps, [train] * method.extra_batches, val))
        inner = res.inner
        raw = {"lam": raw["lam"] - outer_lr * res.hypergrad["lam"]}
        hypergrads.append(res.hypergrad["lam"])
    return inner, raw["lam"], torch.stack(hypergrads)


def err(a, b):
    return float(torch.linalg.vector_norm(a - b))


# ------------------------------------------------------------------------------------------ fixed points
def test_soba_fixed_point_is_the_exact_hypergradient_and_the_bilevel_solution():
    lam0 = torch.linspace(-1, 1, TASK.d, dtype=D)
    # λ held (outer lr 0): (w, v) settle at w*(λ0) and −H⁻¹∇_w L_V, and D_λ is the exact hypergradient at λ0
    inner, _, hg = drive(SingleLoop(False, 0, 0, decay=0.0), 100, sgd(0.5), 0.0, lam0=lam0)
    exact = TASK.exact_hypergradient(lam0)
    assert err(inner.params["w"], TASK.w_star(lam0)) < 1e-10
    assert err(hg[-1], exact) < 1e-10 * float(exact.norm()) and float(exact.norm()) > 0.1
    # λ moving: the joint iteration converges to λ* (closed form), w to w*(λ*)
    method = SingleLoop(False, 0, 0, decay=0.0)
    inner, lam, _ = drive(method, 200, sgd(0.5), 0.5)
    star = TASK.lam_star()
    assert err(lam, star) < 1e-9 * float(star.norm())
    assert err(inner.params["w"], TASK.w_star(star)) < 1e-9
    v_ift = -torch.linalg.solve(TASK.A, TASK.val_grad_w(TASK.w_star(star)))
    assert err(method.v, v_ift) < 1e-9


def test_soba_steps_are_the_papers_update_with_decaying_steps():
    """Whole batches, 5 outer steps of 2 joint steps, decay ½: the iterates are those of the closed-form recursion
    (ridge: ∇_w L_T = Aw − b − cλ, Hv = Av, ∂²L_T/∂λ∂w v = −cv, ∇_w L_V = Qw − p, ∇_λ L_V = ελ) with steps
    ρ/√(k+1) on w and v, and λ moved by γ times the mean of the two scaled directions."""
    rho, gamma, n, m = 0.3, 0.4, len(TASK.y), len(TASK.yv)
    b, Q, p = TASK.X.T @ TASK.y / n, TASK.Xv.T @ TASK.Xv / m, TASK.Xv.T @ TASK.yv / m
    w, v, lam = (torch.zeros(TASK.d, dtype=D) for _ in range(3))
    k = 0
    for _ in range(5):
        total = torch.zeros(TASK.d, dtype=D)
        for _ in range(2):
            s = (k + 1) ** -0.5
            g, dv, dlam = TASK.A @ w - b - TASK.c * lam, TASK.A @ v + Q @ w - p, -TASK.c * v + TASK.eps * lam
            w, v, total, k = w - rho * s * g, v - rho * s * dv, total + s * dlam, k + 1
        lam = lam - gamma * total / 2
    method = SingleLoop(False, 0, 0, decay=0.5)
    inner, got, _ = drive(method, 5, sgd(rho), gamma, inner_steps=2)
    assert err(got, lam) < 1e-13 and err(inner.params["w"], w) < 1e-13 and err(method.v, v) < 1e-13
    assert method.steps == 10


@pytest.mark.parametrize("variance_reduction", [False, True], ids=["soba_full_batch", "saba_minibatches"])
def test_v_converges_to_the_ift_solution_at_fixed_weights(variance_reduction):
    """w held at a point that is not the optimum, λ held: v → −H⁻¹∇_w L_V(w) over the whole splits (SABA from
    chunks of 20 and 15 examples: its memory makes the directions exact once every chunk has been seen)."""
    w = torch.linspace(1, -1, TASK.d, dtype=D)
    sizes = (20, 15) if variance_reduction else (0, 0)
    method = SingleLoop(variance_reduction, *sizes, v_lr=0.3, decay=0.0)
    drive(method, 200, FROZEN, 0.0, w0=w)
    target = -torch.linalg.solve(TASK.A, TASK.val_grad_w(w))
    assert err(method.v, target) < 1e-9 * float(target.norm())


def test_soba_on_an_iris_mlp_converges_to_the_dense_ift_hypergradient():
    """The run's own task (Iris, a 4→5→3 tanh MLP in float64, per-weight decay at 1): weights and λ held, SOBA's
    direction converges to ∂L_V/∂λ − (∂²L_T/∂λ∂w) H⁻¹ ∂L_V/∂w with H and the mixed term formed densely."""
    from hoexp.engine.state import start

    args = ["model.width=5", "model.depth=1", "model.activation=tanh", "model.bias=false", "dtype=float64"]
    exp = build(compose_spec([*args, "method=soba", "method.batch_size=0", "hp.weight_decay.init=1.0"])[0])
    st = start(exp)
    train, val, task = next(st.train), next(st.val), exp.task
    params, raw = st.inner.params, st.raw
    method, inner = SingleLoop(False, 0, 0, v_lr=0.8, decay=0.0), InnerState(params, {})
    for _ in range(120):  # v contracts by 1 − 0.8·λ_min(H) ≈ 0.77 per step
        hg = method(OuterStep(task, FROZEN, inner, raw, [train], [], val)).hypergrad
    w_flat, r_flat = tree.flatten(params.values()).detach(), tree.flatten(raw.values()).detach()

    def lt(wf, rf):
        return task.train_loss(tree.unflatten(wf, params), tree.unflatten(rf, raw), train)

    H = torch.autograd.functional.hessian(lambda wf: lt(wf, r_flat), w_flat)
    mixed = torch.autograd.functional.jacobian(
        lambda rf: torch.autograd.grad(lt(w_flat.requires_grad_(), rf), w_flat, create_graph=True)[0], r_flat
    )  # ∂(∇_w L_T)/∂λ: [P, H]
    gw = torch.autograd.grad(task.val_loss(tree.unflatten(w_flat.requires_grad_(), params), raw, val), w_flat)[0]
    exact = -mixed.T @ torch.linalg.solve(H, gw)  # L_V reads no λ
    assert 0.2 < torch.linalg.eigvalsh(H).min() and torch.linalg.eigvalsh(H).max() < 2  # 0.29 and 1.82
    got = tree.flatten(hg.values())
    assert err(got, exact) < 1e-9 * float(exact.norm()) and float(exact.norm()) > 1e-3


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.width=5", "model.depth=1", "model.activation=tanh", "dtype=float64"],  # per-weight decay
        ["model.width=5", "model.depth=1", "model.activation=tanh", "hp=example_weights", "hp.example_weights.l2=0.4"],
    ],
    ids=["iris_mlp_weight_decay_f64", "iris_mlp_example_weights_f32"],
)
def test_derivatives_are_torch_funcs_bit_for_bit(overrides):
    """The minibatch derivatives (plain autograd on fresh leaves, for speed) are torch.func's definitions, exactly:
    ``vjp`` of ``grad_and_value`` for ``(∇_w L_T, ∇²_ww L_T v, ∇²_λw L_T v)``, ``grad_and_value`` in both arguments
    for the validation gradients, the gradient's pullback for the Hessian-vector product."""
    from torch.func import grad, grad_and_value, vjp

    from hoexp.engine.state import start
    from hoexp.method.single_loop import hvp, train_flat, train_products, val_flat, val_gradients

    exp = build(compose_spec([*overrides, "method=soba", "method.batch_size=0"])[0])
    st = start(exp)
    train, val, task = next(st.train), next(st.val), exp.task
    w, raw = tree.detached(st.inner.params), tree.detached(st.raw)
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in w.items()}
    raw = {k: r + 0.1 * torch.randn(r.shape, generator=gen, dtype=r.dtype) for k, r in raw.items()}  # not uniform

    def lt(w_, lam):
        return task.train_loss(w_, lam, train)

    def lv(w_, lam):
        return task.val_loss(w_, lam, val)

    g0, pullback, l0 = vjp(lambda w_, lam_: grad_and_value(lambda p: lt(p, lam_))(w_), w, raw, has_aux=True)
    hv0, cv0 = pullback(v)
    (aw0, alam0), lv0 = grad_and_value(lv, argnums=(0, 1))(w, raw)
    hu0 = vjp(lambda w_: grad(lambda p: lt(p, raw))(w_), w)[1](v)[0]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in b) and list(a) == list(b)

    g, hv, cv, value = train_products(lt, w, raw, v)
    assert same(g, g0) and same(hv, hv0) and same(cv, cv0) and torch.equal(value, l0)
    flat, value = train_flat(lt, w, raw, list(v.values()))
    assert torch.equal(flat, tree.flatten([*g0.values(), *hv0.values(), *cv0.values()])) and torch.equal(value, l0)
    aw, alam, value = val_gradients(lv, w, raw)
    assert same(aw, aw0) and same(alam, alam0) and torch.equal(value, lv0)
    assert torch.equal(val_flat(lv, w, raw)[0], tree.flatten([*aw0.values(), *alam0.values()]))
    assert same(hvp(lt, w, raw)(v), hu0)
    assert float(tree.norm(cv0)) > 0 and float(tree.norm(hv0)) > 0  # the mixed term is there to compare


@pytest.mark.parametrize("solver", ["gd", "cg"])
def test_amigo_solves_the_linear_system_and_converges_to_the_bilevel_solution(solver):
    w = torch.linspace(1, -1, TASK.d, dtype=D)
    method = AmIGO(solver, 10 if solver == "gd" else 2, 0, 0, v_lr=0.3)
    drive(method, 12 if solver == "gd" else 6, FROZEN, 0.0, w0=w)  # warm-started: the iterations add up
    target = torch.linalg.solve(TASK.A, TASK.val_grad_w(w))  # AmIGO's sign: u → H⁻¹∇_w L_V
    assert err(method.u, target) < 1e-9 * float(target.norm())
    method = AmIGO(solver, 10 if solver == "gd" else 3, 0, 0)
    inner, lam, _ = drive(method, 40, sgd(0.5), 2.0, inner_steps=5)
    star = TASK.lam_star()
    assert err(lam, star) < 1e-8 * float(star.norm())


def test_cg_steps_solve_a_spd_system_and_stop_on_negative_curvature():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(6, 6, generator=g, dtype=D)
    A, b = B @ B.T + 0.1 * torch.eye(6, dtype=D), torch.randn(6, generator=g, dtype=D)
    x = cg_steps(lambda z: A @ z, b, torch.zeros(6, dtype=D), 6)
    assert err(A @ x, b) < 1e-8
    neg = -torch.eye(6, dtype=D)
    assert torch.equal(cg_steps(lambda z: neg @ z, b, torch.ones(6, dtype=D), 3), torch.ones(6, dtype=D))


# -------------------------------------------------------------------------------------- variance reduction
def test_saba_converges_with_constant_steps_where_soba_stalls():
    """Chunks of 20 of the 40 training and 15 of the 30 validation examples, the same constant steps: SABA's
    λ reaches λ* to 1e-9, SOBA's wanders at ~1e-2 with a hypergradient variance orders of magnitude larger."""
    star = TASK.lam_star()
    out = {}
    for vr in (False, True):
        _, lam, hg = drive(SingleLoop(vr, 20, 15, decay=0.0), 300, sgd(0.3), 0.3)
        out[vr] = (err(lam, star), float(hg[-100:].var(0).sum()))
    (soba_err, soba_var), (saba_err, saba_var) = out[False], out[True]
    assert saba_err < 1e-8 * float(star.norm()) and soba_err > 1e-3
    assert saba_var < 1e-6 * soba_var


def test_saga_table_returns_the_full_sum_once_every_chunk_is_current():
    table, g = SagaTable(), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([0.5, 0.5])]
    w = [0.4, 0.4, 0.2]
    full = sum(wi * gi for wi, gi in zip(w, g))
    for j in (0, 1, 2):
        table.direction(j, w[j], g[j])
    for j in (2, 0, 1):  # memory current: the direction is the weighted sum, whatever chunk is drawn
        assert torch.allclose(table.direction(j, w[j], g[j]), full)


def test_reset_drops_v_and_the_memory_but_not_the_samplers():
    """``load_state_dict({})`` (reset_inner: new weights) forgets what belongs to the old weights only."""
    method = SingleLoop(True, 20, 15, decay=0.5)
    drive(method, 3, sgd(0.3), 0.3)
    pos = method.train_side.chunks.pos
    assert method.v is not None and method.train_side.table.mean is not None
    method.load_state_dict({})
    assert method.v is None and method.train_side.table.mean is None and method.val_side.table.memory == {}
    assert method.train_side.chunks.pos == pos and method.steps == 3


def test_chunks_visit_every_chunk_once_per_epoch_and_refuse_a_changing_pool():
    chunks = Chunks(16, seed=0)
    seen = [chunks.draw(40)[:3] for _ in range(6)]
    assert sorted(seen[:3]) == sorted(seen[3:]) == [(0, 0, 16), (1, 16, 32), (2, 32, 40)]
    assert chunks.draw(40)[3] in (16 / 40, 8 / 40)
    with pytest.raises(HoexpError, match="dataset.batch_size=0"):
        chunks.draw(32)


# ---------------------------------------------------------------------------------------- method.compile=true
def test_compiled_derivatives_are_the_eager_ones_and_one_graph_serves_every_chunk_size():
    """The derivatives through dynamo (``torch.func`` traced; the eager backend, so no C++ compiler here) against
    ``train_flat`` / ``val_flat`` on chunks of 7 of the 40 training and 30 validation examples (tails of 5 and 2):
    equal to float64 rounding, one compiled frame for every size pair, each pair's first call reported as
    warm-up."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    fn = CompiledDerivatives(TASK.train_loss, TASK.val_loss, backend=counter)
    gen = torch.Generator().manual_seed(1)
    w, lam = {"w": torch.randn(TASK.d, generator=gen, dtype=D)}, {"lam": torch.randn(TASK.d, generator=gen, dtype=D)}
    v = [torch.randn(TASK.d, generator=gen, dtype=D)]
    train, val = Batch(TASK.X, TASK.y), Batch(TASK.Xv, TASK.yv)
    warm_ups = []
    for (a, b), (c, e) in [((0, 7), (7, 14)), ((35, 40), (7, 14)), ((7, 14), (28, 30)), ((35, 40), (28, 30)),
                           ((14, 21), (0, 7))]:  # fmt: skip
        batch, vbatch = chunk(train, a, b), chunk(val, c, e)
        (flat_t, lt, flat_v, lv), warm_up = fn(w, lam, v, batch, vbatch)
        ref_t, ref_lt = train_flat(lambda p, q: TASK.train_loss(p, q, batch), w, lam, v)
        ref_v, ref_lv = val_flat(lambda p, q: TASK.val_loss(p, q, vbatch), w, lam)
        for got, ref in ((flat_t, ref_t), (lt, ref_lt), (flat_v, ref_v), (lv, ref_lv)):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
        warm_ups.append(warm_up)
    assert counter.frame_count == 1  # no recompile for the tails (the example axis is dynamic)
    assert fn.warm == {(7, 7), (5, 7), (7, 2), (5, 2)}
    assert all(t > 0 for t in warm_ups[:4]) and warm_ups[4] == 0.0


def test_compiled_saba_takes_the_eager_steps_and_reports_its_warm_up():
    """SABA with ``compile=True`` (dynamo, eager backend) over 40 joint steps on chunks of 7 (tails included):
    every hypergradient and the final weights equal the eager run's to float64 rounding; the warm-up seconds are
    reported as ``time/compile_s`` by the first step (SOBA on chunks that divide both splits: one pair of sizes)
    and not after, and nothing recompiles."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = SingleLoop(True, 7, 7, decay=0.0, compile=True, compile_backend=counter)
    eager = SingleLoop(True, 7, 7, decay=0.0)
    inner_c, lam_c, hg_c = drive(compiled, 40, sgd(0.3), 0.3)
    inner_e, lam_e, hg_e = drive(eager, 40, sgd(0.3), 0.3)
    torch.testing.assert_close(hg_c, hg_e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inner_c.params["w"], inner_e.params["w"], rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1 and float(hg_c.abs().max()) > 0
    params = {"w": torch.zeros(TASK.d, dtype=D)}
    inner = InnerState(params, sgd(0.3).init(params))
    fresh = SingleLoop(False, 8, 10, decay=0.5, compile=True, compile_backend=CompileCounter())  # one size pair
    step = OuterStep(TASK, sgd(0.3), inner, {"lam": torch.zeros(TASK.d, dtype=D)}, [Batch(TASK.X, TASK.y)], [],
                     Batch(TASK.Xv, TASK.yv))  # fmt: skip
    first, second = fresh(step), fresh(step._replace(inner=fresh(step).inner))
    assert first.scalars["time/compile_s"] > 0 and "time/compile_s" not in second.scalars


def test_amigo_takes_its_inner_steps_with_the_runs_plain_step():
    """AmIGO's inner steps are plain ones (``differentiates_steps`` false: compile=true and mixed precision apply),
    so they go through the run's step (``OuterStep.step``), not always the eager one."""
    from hoexp.method.base import eager_step

    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        return eager_step(*args, **kwargs)

    params = {"w": torch.zeros(TASK.d, dtype=D)}
    inner = InnerState(params, sgd(0.3).init(params))
    train, val = Batch(TASK.X, TASK.y), Batch(TASK.Xv, TASK.yv)
    st = OuterStep(TASK, sgd(0.3), inner, {"lam": torch.zeros(TASK.d, dtype=D)}, [train] * 3, [], val, step=step)
    AmIGO("gd", 2, 8, 10)(st)
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------ the runner
QUIET = dict(console=Console(file=io.StringIO()))
SMALL = ["model.width=8", "progress=false", "outer_steps=4", "inner_steps=2", "checkpoint_every=1"]


@pytest.mark.parametrize(
    "method",
    [
        ["method=soba", "method.batch_size=16", "method.val_batch_size=16"],
        ["method=saba", "method.batch_size=16", "method.val_batch_size=16", "optim/inner=sgd", "optim.inner.lr=0.05"],
        pytest.param(["method=amigo", "method.batch_size=16", "method.v_steps=3"], marks=pytest.mark.slow),
    ],
    ids=["soba", "saba", "amigo"],
)
def test_checkpoint_and_resume_mid_run_is_bit_exact(tmp_path, method):
    args = [*SMALL, *method]
    Run(compose_spec(args)[0], tmp_path / "ref", **QUIET).execute()
    with pytest.raises(Preempted):
        Run(compose_spec(args)[0], tmp_path / "cut", loggers=[StopAt(3)], **QUIET).execute()
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["method_state"]["train"]["chunks"]["n"] == 60  # Iris: 60 training examples
    Run(compose_spec([*args, "resume=true"])[0], tmp_path / "cut", **QUIET).execute()
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "ref")  # bit for bit
    ref, cut = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ref", "cut"))
    assert cut["final"] == ref["final"] and cut["hp_final"] == ref["hp_final"]
    # ... and the carried state is what makes it so: resuming without it departs from the reference
    with pytest.raises(Preempted):
        Run(compose_spec(args)[0], tmp_path / "cold", loggers=[StopAt(3)], **QUIET).execute()
    torch.save({**ckpt, "method_state": {}}, tmp_path / "cold" / "checkpoint.pt")
    Run(compose_spec([*args, "resume=true"])[0], tmp_path / "cold", **QUIET).execute()
    assert metrics(tmp_path / "cold")[:3] == metrics(tmp_path / "ref")[:3]
    assert metrics(tmp_path / "cold")[3] != metrics(tmp_path / "ref")[3]


def test_refusals_are_one_line():
    with pytest.raises(ConfigError, match="set dataset.batch_size=0") as e:
        build(compose_spec(["model.width=8", "method=saba", "dataset.batch_size=16"])[0])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="batch_size must be > 0"):
        build(compose_spec(["model.width=8", "method=saba", "method.batch_size=0"])[0])
    with pytest.raises(ConfigError, match="cannot tune hp=lr"):
        build(compose_spec(["model.width=8", "method=soba", "hp=lr"])[0])
    spec = compose_spec(["model.width=8", "method=soba", "hp=dropout", "method.batch_size=16"])[0]
    exp = build(spec)
    from hoexp.engine.state import start

    st = start(exp)
    with pytest.raises(HoexpError, match="cannot cut its dropout noise"):
        outer_step(exp.method, exp.task, exp.inner_opt, st.inner, st.raw, st.train, next(st.val), 1)


def test_cli_runs_soba_on_the_default_problem(tmp_path):
    """`hoexp run method=soba` on the default Iris problem (few inner steps to keep it short)."""
    spec = compose_spec(["method=soba", "outer_steps=3", "inner_steps=5", "progress=false"])[0]
    summary = Run(spec, tmp_path, **QUIET).execute()
    assert summary["status"] == "completed" and summary["hypergradients"] == 3
    last = metrics(tmp_path)[-1]
    assert all(k in last for k in ("hypergrad/norm", "solver/residual", "solver/v_norm", "inner/loss"))
