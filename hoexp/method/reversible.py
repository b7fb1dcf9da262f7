"""Reversible learning (Maclaurin, Duvenaud & Adams 2015): exact hypergradients through T steps of
SGD with momentum without storing the trajectory.

Inner dynamics (Maclaurin's parameterization), for ``t = 0 … T−1`` with ``g_t = ∇_w L_T(w_t, λ, t)``::

    v_{t+1} = γ_t v_t − (1 − γ_t) g_t          w_{t+1} = w_t + α_t v_{t+1}

The forward pass keeps ``w`` and ``v`` as fixed-point integers (int64, value = int · 2^-R), so the
position update ``w ± round(α_t v)`` is exactly invertible. The only lossy operation is ``v ← γ v``;
with ``γ = N/D`` (``D = 2^k``, ``N = round(γ D)``) Maclaurin's trick makes it invertible, at
``log2(1/γ)`` bits per weight per step (:mod:`hoexp.method.fixed_point` has the arithmetic and its bounds).

The reverse pass (Maclaurin's Algorithm 2) undoes the steps exactly, recomputing ``g_t`` at the
bit-identical ``w_t`` (so the rounded integer ``(1−γ_t) g_t`` is the same one the forward pass
subtracted; a fingerprint per step verifies it) and accumulates the adjoints::

    dα_t = dw·v_{t+1};   dv += α_t dw;   (recover w_t, g_t, v_t);   dγ_t = dv·(v_t + g_t)
    dw −= (1−γ_t) ∇²_w L_T dv;   dλ −= (1−γ_t) ∂²L_T/∂λ∂w dv;   dv ← γ_t dv

starting from ``dw = ∂L_V/∂w (w_T)``, ``dv = 0``, ``dλ = ∂L_V/∂λ``.

Defaults: radix ``R = 50`` bits and ``D = 2^16`` (Maclaurin's code used 2^52 and 2^16). Then the
multiplication error is ``< 2^-34 ≈ 5.8e-11`` per step, the α·v and ``(1−γ)g`` roundings
``2^-51``, ``|γ − N/D| ≤ 2^-17`` (hypergradients are those of the rational ``γ_t`` actually used,
``ReversibleResult.momenta_used``), values ``|x| < 2^(53−R) = 8`` have an exact float64 view, and
every integer is checked to stay below ``2^62``, i.e. values ``|x| < 2^(62−R) = 4096``
(``OverflowError`` otherwise; the margin leaves one addition of headroom in int64). Measured on a
small MLP over 40 steps, hypergradients agree with float64 autograd to ~1e-9 relative (R = 48:
~1e-8, R = 44: ~1e-6). A smaller ``R`` buys range at the cost of precision.

Cost: forward T gradients (built with ``create_graph`` so the reverse pass recomputes them through
the same kernels), reverse T gradients plus T vector-Jacobian products (one HVP and the mixed term
together): about 3T gradient costs; buffer arithmetic O(P·T) big-integer operations. Memory: O(P)
tensors plus the buffer, ``≈ P·T·log2(1/γ)`` bits, against ``32·P·T`` bits for a float32
trajectory (measured at γ = 0.9, T = 100: 0.144 bits per weight per step, 222x less; the buffer
starts below its bound because pops from a nearly empty buffer return few bits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from hoexp import tree
from hoexp.components import CheckContext, Range
from hoexp.errors import ConfigError
from hoexp.method.base import gradients, scalars
from hoexp.method.fixed_point import (
    FixedPointSteps,
    InfoBuffer,
    Schedule,
    TrainLossFn,
    check_range,
    div_gamma,
    fingerprint,
    from_fixed,
    mul_gamma,
    rational_momentum,
    to_fixed,
)
from hoexp.optim import Optimizer
from hoexp.task.base import Task
from hoexp.types import InnerState, OuterResult, OuterStep

ValLossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]


def _per_step(x: Tensor | float, steps: int, what: str) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if x.dim() == 0:
        x = x.expand(steps)
    if x.shape != (steps,):
        raise ValueError(f"{what} must be a scalar or a 1-D tensor of length steps={steps}, got shape {tuple(x.shape)}")
    return x.clone()


@dataclass
class ReversibleResult:
    """Output of :func:`reversible_hypergradient` (floats are host floats; hypergradients float64
    for ``lrs``/``momenta``, the dtype of ``raw`` for ``hyper_raw``)."""

    params: dict[str, Tensor]  # w_T (float view, the dtypes of params0)
    velocity: Tensor  # v_T, flat float64
    val_loss: float
    hyper_raw: dict[str, Tensor]  # dL_V/dλ (direct term included)
    hyper_lrs: Tensor  # dL_V/dα_t, [T]
    hyper_momenta: Tensor  # dL_V/dγ_t at the rational γ_t, [T]
    hyper_params0: dict[str, Tensor]  # dL_V/dw_0 (float64)
    params0_recovered: dict[str, Tensor]  # w_0 from the reverse pass (float view, dtypes of params0)
    params0_fixed: Tensor  # the fixed-point w_0 the forward pass started from (flat int64)
    params0_fixed_recovered: Tensor  # the fixed-point w_0 the reverse pass ended at
    velocity0_fixed_recovered: Tensor
    momenta_used: Tensor  # the rational γ_t = N_t/D actually applied, [T]
    bits_used: int  # the buffer's size after the forward pass
    bits_max_per_weight: int  # the largest single weight's share of it
    bits_bound: float  # P · Σ_t log2(D/N_t)  (= T·P·log2(1/γ) for constant γ)
    buffer_bits_after_reverse: int  # 0 when every stored bit was consumed again
    train_loss_last: float | None = None
    grad_norm_last: float | None = None
    trajectory_exact: list[bool] | None = None  # per step: reverse (w_t, v_t) == forward (w_t, v_t)
    num_params: int = 0


@dataclass
class _Forward:
    """What the forward pass leaves for the reverse pass and the result."""

    fingerprints: list[tuple[int, int]] = field(default_factory=list)  # of each step's (1 − γ_t) g_t
    trajectory: list[tuple[Tensor, Tensor]] | None = None  # each step's fixed-point (w_t, v_t), for tests
    gammas_used: Tensor = field(default_factory=lambda: torch.zeros(0))  # the rational γ_t applied
    bits_bound: float = 0.0
    train_last: float | None = None
    grad_norm_last: float | None = None


@dataclass
class _Adjoints:
    """The reverse pass's accumulators: ``dL_V/d`` of ``w``, ``v``, ``λ`` (flat float64 each) and of the
    per-step ``α_t``, ``γ_t``."""

    dw: Tensor
    dv: Tensor
    d_raw: list[Tensor]
    d_alpha: Tensor
    d_gamma: Tensor


def _forward(
    s: FixedPointSteps,
    w: Tensor,
    v: Tensor,
    steps: int,
    buf: InfoBuffer,
    on_step: Callable[[], None] | None,
    keep: bool,
) -> tuple[Tensor, Tensor, _Forward]:
    """``steps`` exact SGD-momentum steps from fixed-point ``(w, v)``, storing only the lost bits in ``buf``."""
    R, k, d, P = s.radix_bits, s.momentum_bits, 2**s.momentum_bits, s.num_params
    rec = _Forward(trajectory=[] if keep else None, gammas_used=torch.zeros(steps, dtype=torch.float64))
    with torch.enable_grad():
        for t in range(steps):
            if rec.trajectory is not None:
                rec.trajectory.append((w.clone(), v.clone()))
            alpha, n, gamma, one_minus, _ = s.at(t)
            rec.gammas_used[t] = float(gamma.mean()) if isinstance(gamma, Tensor) else gamma
            rec.bits_bound += float(torch.log2(d / n.double()).sum()) if isinstance(n, Tensor) else P * math.log2(d / n)
            _, loss, g = s.grad_at(w, t)
            G = to_fixed(one_minus * g.detach(), R)
            rec.fingerprints.append(fingerprint(G))
            v = check_range(mul_gamma(v, n, d, k, buf) - G, "the velocity", R)
            w = check_range(w + check_range(to_fixed(alpha * from_fixed(v, R), R), "α·v", R), "the weights", R)
            if t == steps - 1:
                rec.train_last, rec.grad_norm_last = float(loss.detach()), float(torch.linalg.vector_norm(g.detach()))
            del loss, g
            if on_step is not None:
                on_step()
    return w, v, rec


def _outer_gradient(s: FixedPointSteps, val_loss: ValLossFn, w: Tensor, steps: int) -> tuple[Tensor, _Adjoints]:
    """``L_V(w_T)`` and the adjoints the reverse pass starts from: ``dw = ∂L_V/∂w``, ``dv = 0``, ``dλ = ∂L_V/∂λ``."""
    raw_list = list(s.raw_leaves.values())
    with torch.enable_grad():
        w_leaf = from_fixed(w, s.radix_bits).requires_grad_(True)
        lv = val_loss(s.params(w_leaf), s.raw_leaves)
        grads = torch.autograd.grad(lv, [w_leaf, *raw_list], allow_unused=True)
    return lv, _Adjoints(
        dw=tree.fill_none(grads[:1], [w_leaf])[0].detach().to(torch.float64),
        dv=torch.zeros(s.num_params, dtype=torch.float64, device=s.device),
        d_raw=[x.detach().to(torch.float64) for x in tree.fill_none(grads[1:], raw_list)],
        d_alpha=torch.zeros(steps, dtype=torch.float64),
        d_gamma=torch.zeros(steps, dtype=torch.float64),
    )


def _pull_back(
    s: FixedPointSteps, adj: _Adjoints, g: Tensor, w_leaf: Tensor, one_minus: Any, graph: Any, da: Tensor, dg: Tensor
) -> None:
    """``dw −= (1−γ_t) ∇²_w L_T dv``, ``dλ −= (1−γ_t) ∂²L_T/∂λ∂w dv`` (one VJP), and under a schedule
    ``dλ += (∂α_t/∂λ)ᵀ da + (∂γ_t/∂λ)ᵀ dg``."""
    raw_list = list(s.raw_leaves.values())
    if g.requires_grad:
        vjp = gradients(g, [w_leaf, *raw_list], [(one_minus * adj.dv).to(g.dtype)])
        adj.dw = adj.dw - vjp[0].detach().to(torch.float64)
        adj.d_raw = [a - b.detach().to(torch.float64) for a, b in zip(adj.d_raw, vjp[1:])]
    outs = [(x, dx) for x, dx in zip(graph or (), (da, dg)) if x.requires_grad]
    if outs and raw_list:  # α_t and γ_t are functions of λ
        through = gradients([x for x, _ in outs], raw_list, [dx for _, dx in outs])
        adj.d_raw = [a + b.detach().to(torch.float64) for a, b in zip(adj.d_raw, through)]


def _reverse(
    s: FixedPointSteps, w: Tensor, v: Tensor, steps: int, buf: InfoBuffer, rec: _Forward, adj: _Adjoints
) -> tuple[Tensor, Tensor, list[bool]]:
    """Undo each step exactly, accumulating the adjoints in ``adj`` (Maclaurin's Algorithm 2); returns the
    recovered fixed-point ``(w_0, v_0)`` and, with a stored trajectory, per step whether it was reproduced."""
    R, d = s.radix_bits, 2**s.momentum_bits
    exact: list[bool] = [False] * steps if rec.trajectory is not None else []
    for t in reversed(range(steps)):
        alpha, n, gamma, one_minus, graph = s.at(t, graph=s.schedule is not None)
        v_next = from_fixed(v, R)
        da = adj.dw * v_next  # dL_V/dα_t, per weight
        adj.d_alpha[t] = da.sum().cpu()
        adj.dv = adj.dv + alpha * adj.dw
        w = w - to_fixed(alpha * v_next, R)
        with torch.enable_grad():
            w_leaf, _, g = s.grad_at(w, t)
            G = to_fixed(one_minus * g.detach(), R)
            if fingerprint(G) != rec.fingerprints[t]:
                raise RuntimeError(
                    f"reversible learning: the training gradient at step {t} differs between the forward and "
                    "reverse pass (non-deterministic train_loss or kernels); exact reversal is impossible"
                )
            v = div_gamma(v + G, n, d, R, buf)
            dg = adj.dv * (from_fixed(v, R) + g.detach())  # dL_V/dγ_t, per weight
            adj.d_gamma[t] = dg.sum().cpu()
            _pull_back(s, adj, g, w_leaf, one_minus, graph, da, dg)
            del g, w_leaf, graph
        adj.dv = gamma * adj.dv
        if rec.trajectory is not None:
            exact[t] = bool(torch.equal(w, rec.trajectory[t][0]) and torch.equal(v, rec.trajectory[t][1]))
    return w, v, exact


def reversible_hypergradient(
    train_loss: TrainLossFn,
    val_loss: ValLossFn,
    params0: Mapping[str, Tensor],
    raw: Mapping[str, Tensor],
    lrs: Tensor | float,
    momenta: Tensor | float,
    steps: int,
    *,
    radix_bits: int = 50,
    momentum_bits: int = 16,
    velocity0: Tensor | None = None,
    return_trajectory_check: bool = False,
    on_step: Callable[[], None] | None = None,
    schedule: Schedule | None = None,
) -> ReversibleResult:
    """Exact ``dL_V(w_T)/d(λ, α, γ, w_0)`` through ``steps`` SGD-momentum steps, by exact reversal.

    ``train_loss(params, raw, t)`` is the step-``t`` training loss (minibatch ``t``; it must be a
    deterministic function of its inputs), ``val_loss(params, raw)`` the outer objective. ``lrs``
    and ``momenta`` are per-step ``α_t`` / ``γ_t`` (a scalar is repeated). ``velocity0`` (flat) is
    ``v_0`` (default 0). ``return_trajectory_check`` also stores the fixed-point forward trajectory
    (O(T·P) memory, for tests) and reports per step whether the reverse pass reproduced it.

    ``schedule(raw, t) → (α_t, γ_t)`` replaces ``lrs`` and ``momenta`` when the step sizes and momenta
    are themselves hyperparameters (Maclaurin et al.'s learned schedules): flat per-weight tensors (or
    0-d), differentiable functions of ``raw``. It is called once per step forward and once in reverse
    (with its graph), so nothing ``P × T`` is stored; ``dL_V/dα_t`` and ``dL_V/dγ_t`` flow through it
    into ``hyper_raw``, and ``hyper_lrs`` / ``hyper_momenta`` / ``momenta_used`` report per-step sums /
    means over the weights. See the module docstring for the math and cost.
    """
    if steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    if not 8 <= radix_bits <= 56:
        raise ValueError(f"radix_bits must be in [8, 56], got {radix_bits}")
    if not 1 <= momentum_bits <= min(radix_bits, 31):
        raise ValueError(f"momentum_bits must be in [1, min(radix_bits, 31)], got {momentum_bits}")
    R, like = radix_bits, tree.detached(params0)
    device = next(iter(like.values())).device if like else torch.device("cpu")
    alphas, rationals = None, None
    if schedule is None:
        alphas = _per_step(lrs, steps, "lrs")
        rationals = [rational_momentum(float(g), momentum_bits) for g in _per_step(momenta, steps, "momenta")]
    raw_leaves = tree.detached(raw, requires_grad=True)
    s = FixedPointSteps(train_loss, like, raw_leaves, R, momentum_bits, device, schedule, alphas, rationals)
    P = s.num_params
    w = to_fixed(tree.flatten(list(like.values())), R) if P else torch.zeros(0, dtype=torch.int64, device=device)
    v = torch.zeros(P, dtype=torch.int64, device=device) if velocity0 is None else to_fixed(velocity0, R).reshape(-1)
    if v.numel() != P:
        raise ValueError(f"velocity0 has {v.numel()} entries, params0 has {P}")
    w0_fixed = w.clone()
    buf = InfoBuffer(P)
    w, v, rec = _forward(s, w, v, steps, buf, on_step, return_trajectory_check)
    bit_lengths = buf.bit_lengths()
    wT, vT = w.clone(), v.clone()
    lv, adj = _outer_gradient(s, val_loss, w, steps)
    w, v, exact = _reverse(s, w, v, steps, buf, rec, adj)
    return ReversibleResult(
        params=s.view(wT),
        velocity=from_fixed(vT, R),
        val_loss=float(lv.detach()),
        hyper_raw={name: x.to(r.dtype) for (name, r), x in zip(raw.items(), adj.d_raw)},
        hyper_lrs=adj.d_alpha,
        hyper_momenta=adj.d_gamma,
        hyper_params0=tree.unflatten(adj.dw, s.like),
        params0_recovered=s.view(w),
        params0_fixed=w0_fixed,
        params0_fixed_recovered=w,
        velocity0_fixed_recovered=v,
        momenta_used=rec.gammas_used,
        bits_used=sum(bit_lengths),
        bits_max_per_weight=max(bit_lengths, default=0),
        bits_bound=rec.bits_bound,
        buffer_bits_after_reverse=buf.bits_used(),
        train_loss_last=rec.train_last,
        grad_norm_last=rec.grad_norm_last,
        trajectory_exact=exact if return_trajectory_check else None,
        num_params=P,
    )


@dataclass
class ReversibleMethod:
    """``method=reversible``: ``inner_steps`` SGD-momentum steps (from ``v = 0`` each outer step) and the
    exact hypergradient w.r.t. ``raw`` by exact reversal.

    The method owns its inner optimizer (Maclaurin's ``v ← γv − (1−γ)g``, ``w ← w + αv``, which is
    torch's ``buf ← μ·buf + g``, ``w ← w − η·buf`` with ``γ = μ``, ``α = η/(1−μ)``): the runner's
    ``inner_opt`` is not used and ``opt_state`` is passed through unchanged. ``lr`` is ``α`` and
    ``momentum`` ``γ`` while no family tunes them; a family that tunes the learning rate or the momentum
    (``hp=lr``, any granularity, ``hp=momentum``) sets ``η_t`` and ``μ`` per weight through its optimizer
    overrides, and their hypergradients come from the same reverse pass (``dα_t``, ``dγ_t``). The batches
    are drawn once into a list so the reverse pass sees the same ones. Cost: ~3 gradient costs per inner
    step, memory O(P) plus ``≈ inner_steps·P·log2(1/γ)`` bits.
    """

    lr: float | None = None  # Maclaurin's α; None: optim/inner's lr / (1 − momentum)
    momentum: float | None = None  # γ; None: optim/inner's momentum
    radix_bits: int = 50
    momentum_bits: int = 16
    name: str = "reversible"

    extra_batches: ClassVar[int] = 0
    needs_stationary_point: ClassVar[bool] = False
    differentiates_steps: ClassVar[bool] = True
    needs_pathwise_hp: ClassVar[bool] = True  # the reverse pass differentiates every step's ∇_w L_T in λ
    refuses_data_parallel: ClassVar[str] = "reverses the optimizer in fixed-point arithmetic on one process's gradients"

    def rates(self, inner_opt: Optimizer) -> tuple[float, float]:
        """``(α, γ)``: the configured ones, else from the inner heavy-ball optimizer (``α = η/(1 − μ)``, ``γ = μ``)."""
        mu = float(inner_opt.defaults["momentum"]) if self.momentum is None else self.momentum
        lr = float(inner_opt.defaults["lr"]) / (1 - mu) if self.lr is None else self.lr
        return lr, mu

    def check(self, ctx: CheckContext) -> None:
        """It reverses SGD with heavy-ball momentum exactly: refuse any other inner optimizer."""
        if self.lr is not None and self.momentum is not None:
            return
        opt = ctx.inner_opt.defaults
        sgd = set(opt) == {"lr", "momentum", "dampening", "weight_decay", "nesterov"}  # what hoexp.optim.sgd sets
        if not sgd or opt["nesterov"] or opt["dampening"] or opt["weight_decay"] or not 0 < opt["momentum"] < 1:
            raise ConfigError(
                f"method=reversible reverses SGD with heavy-ball momentum exactly; optim/inner={ctx.inner_opt.name} "
                "(with these options) is not reversible: use optim/inner=momentum (0 < momentum < 1, no dampening or "
                "weight_decay), or method=unrolled / truncated for other optimizers"
            )

    def __call__(self, st: OuterStep) -> OuterResult:
        problem, state, raw, batches, val_batch = st.task, st.inner, st.raw, st.train, st.val
        inner_steps = len(batches)
        lr, mu = self.rates(st.inner_opt)
        res = reversible_hypergradient(
            lambda w, lam, t: problem.train_loss(w, lam, batches[t]),
            lambda w, lam: problem.val_loss(w, lam, val_batch),
            state.params,
            raw,
            lr,
            mu,
            inner_steps,
            radix_bits=self.radix_bits,
            momentum_bits=self.momentum_bits,
            on_step=st.on_step,
            schedule=self.schedule(problem, state.params, raw, lr, mu),
        )
        params = {k: res.params[k].to(device=p.device) for k, p in state.params.items()}
        new_state = InnerState(params, state.opt_state, state.step + inner_steps)
        cells = max(res.num_params * inner_steps, 1)
        return OuterResult(
            res.hyper_raw,
            new_state,
            scalars(
                **{
                    "inner/grad_norm": res.grad_norm_last,
                    "inner/loss": res.train_loss_last,
                    "hypergrad/norm": tree.norm(res.hyper_raw),
                    "solver/hvps": inner_steps,
                    "reversible/bits_per_weight_step": res.bits_used / cells,
                    "reversible/memory_ratio_vs_float32_trajectory": 32.0 * cells / max(res.bits_used, 1),
                }
            ),
        )

    def schedule(
        self, problem: Task, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], lr: float, momentum: float
    ) -> Schedule | None:
        """``(α_t, γ_t)`` per weight from the family's optimizer overrides (``lr``: torch's ``η``,
        ``momentum``: ``μ``; others: ``α = lr``, ``γ = momentum``), or ``None`` when the family tunes neither."""
        family = problem.family
        tuned = set(family.optimizer_overrides(dict(raw), 0))
        if not tuned:
            return None
        if tuned - {"lr", "momentum"}:
            raise ValueError(f"method=reversible cannot tune the optimizer's {', '.join(sorted(tuned))}")
        eta0 = lr * (1 - momentum)  # torch's lr

        def schedule(lam: dict[str, Tensor], t: int) -> tuple[Tensor, Tensor]:
            o = family.optimizer_overrides(lam, t)
            gamma = _per_weight(o.get("momentum", momentum), params)
            return _per_weight(o.get("lr", eta0), params) / (1 - gamma), gamma

        return schedule


def _per_weight(value: Any, params: Mapping[str, Tensor]) -> Tensor:
    """An optimizer override (a number, a 0-d tensor, or one of these per parameter name) as one flat
    float64 value per weight, differentiable in the tensors it came from."""
    per_name = value if isinstance(value, Mapping) else dict.fromkeys(params, value)
    return torch.cat(
        [
            torch.as_tensor(per_name[n], dtype=torch.float64, device=p.device).expand(p.shape).reshape(-1)
            for n, p in params.items()
        ]
    )


def reversible(
    *,
    radix_bits: Annotated[int, Range(ge=20, le=56)] = 50,
    momentum_bits: Annotated[int, Range(ge=4, le=30)] = 16,
    name: str = "reversible",
) -> ReversibleMethod:
    """``method=reversible``: reverses ``optim/inner``'s heavy-ball SGD exactly, with that optimizer's ``lr`` ``η``
    and momentum ``μ`` (Maclaurin's ``α = η/(1 − μ)``, ``γ = μ``)."""
    return ReversibleMethod(radix_bits=radix_bits, momentum_bits=momentum_bits, name=name)
