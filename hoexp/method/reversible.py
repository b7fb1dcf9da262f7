"""Reversible learning (Maclaurin, Duvenaud & Adams 2015): exact hypergradients through T steps of
SGD with momentum without storing the trajectory.

Inner dynamics (Maclaurin's parameterization), for ``t = 0 … T−1`` with ``g_t = ∇_w L_T(w_t, λ, t)``::

    v_{t+1} = γ_t v_t − (1 − γ_t) g_t          w_{t+1} = w_t + α_t v_{t+1}

The forward pass keeps ``w`` and ``v`` as fixed-point integers (int64, value = int · 2^-R), so the
position update ``w ± round(α_t v)`` is exactly invertible. The only lossy operation is ``v ← γ v``;
with ``γ = N/D`` (``D = 2^k``, ``N = round(γ D)``) it is made invertible by Maclaurin's trick::

    forward  v ← γ v :  B ← B·D + (v mod D);  v ← (v div D)·N;  v ← v + (B mod N);  B ← B div N
    reverse  v ← v / γ:  B ← B·N + (v mod N);  v ← (v div N)·D;  v ← v + (B mod D);  B ← B div D

where ``B`` is one arbitrary-precision natural number per weight (the information buffer). Each
multiplication grows ``B`` by a factor ``D/N``: ``log2(1/γ)`` bits per weight per step. Precisely,
from ``B' + 1 ≤ (D/N)(B + 1) + 1`` and ``B_0 = 0``,

    bit_length(B_i) ≤ Σ_t log2(D/N_t) + log2(1/(1 − γ_max)) + 1,

so the per-weight constant over ``T·log2(1/γ)`` is ``log2(1/(1−γ)) + 1`` bits (4.32 at γ = 0.9).
The price of this order (push, then pop) is that the low ``log2 N`` bits of ``v`` are replaced by
buffer digits: ``|γ·v − v_new| < N ≤ 2^k`` units, i.e. ``< 2^(k−R)`` in value per multiplication.
(Multiplying first and dithering with a popped digit would err by < 1 unit but costs ``k`` more
bits per weight, since pops from the initially empty buffer return no information.)

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
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from hoexp import tree
from hoexp.components import CheckContext, Range
from hoexp.errors import ConfigError
from hoexp.method.base import scalars
from hoexp.optim import Optimizer
from hoexp.task.base import Task
from hoexp.types import InnerState, OuterResult, OuterStep

TrainLossFn = Callable[[dict[str, Tensor], dict[str, Tensor], int], Tensor]
ValLossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]

_LIMIT = 2**62  # every fixed-point integer stays below this (int64 headroom for one addition)


class InfoBuffer:
    """One arbitrary-precision natural number per weight, used as a mixed-radix stack of digits.

    ``push(d, base)``: ``B ← B·base + d`` (``0 ≤ d < base``); ``pop(base)``: ``d = B mod base``,
    ``B ← B div base``. A pop after the matching push returns the digit and restores ``B``; popping
    a base-N digit after pushing a base-D one stores ``log2(D/N)`` net bits. Python ints in a numpy
    object array: each operation is O(P) big-integer operations on the host.
    """

    def __init__(self, n: int):
        self._b = np.zeros(n, dtype=object)  # Python int 0s

    def push(self, digits: Tensor, base: int | Tensor) -> None:
        self._b = self._b * _objects(base) + digits.detach().cpu().numpy().astype(object)

    def pop(self, base: int | Tensor, device: torch.device | str = "cpu") -> Tensor:
        base = _objects(base)
        digits = self._b % base
        self._b = self._b // base
        return torch.from_numpy(digits.astype(np.int64)).to(device)

    def bit_lengths(self) -> list[int]:
        """Each weight's number's bit length."""
        return [int(x).bit_length() for x in self._b]

    def bits_used(self) -> int:
        """Total size: the sum of the numbers' bit lengths."""
        return sum(self.bit_lengths())


def _objects(base: int | Tensor) -> Any:
    """A base for :class:`InfoBuffer`: an int, or one per weight as Python ints (an object array)."""
    return base.detach().cpu().numpy().astype(object) if isinstance(base, Tensor) else base


def _check(x: Tensor, what: str, radix_bits: int) -> Tensor:
    if x.numel() and int(x.abs().max()) >= _LIMIT:
        raise OverflowError(
            f"reversible learning: {what} left the fixed-point range |x| < 2^{62 - radix_bits}; "
            f"lower radix_bits (now {radix_bits}) or the learning rate"
        )
    return x


def to_fixed(x: Tensor, radix_bits: int) -> Tensor:
    """``round(x · 2^R)`` as int64 (exact for float64 ``x`` whose last mantissa bit is ≥ 2^-R)."""
    scaled = torch.round(x.detach().to(torch.float64) * 2.0**radix_bits)
    if scaled.numel() and not bool(torch.isfinite(scaled).all()):
        raise OverflowError("reversible learning: non-finite value (the inner loop diverged)")
    _check(scaled, "a value", radix_bits)
    return scaled.to(torch.int64)


def from_fixed(x: Tensor, radix_bits: int) -> Tensor:
    """The float64 view ``x · 2^-R`` (exact while ``|x| < 2^53``)."""
    return x.to(torch.float64) * 2.0**-radix_bits


def rational_momentum(gamma: float, momentum_bits: int = 16) -> tuple[int, int]:
    """``γ ≈ N/D`` with ``D = 2^k``, ``N = round(γ D)``; requires ``0 < N ≤ D`` (γ = 0 is irreversible)."""
    d = 2**momentum_bits
    n = round(float(gamma) * d)
    if not 0 < n <= d:
        raise ValueError(
            f"reversible learning needs momentum in (0, 1] (γ = 0 forgets v and cannot be reversed); got {gamma}"
        )
    return n, d


def rational_momenta(gamma: Tensor, momentum_bits: int = 16) -> tuple[Tensor, int]:
    """:func:`rational_momentum` of each entry: ``(N as int64, D)``."""
    d = 2**momentum_bits
    n = torch.round(gamma.detach().to(torch.float64) * d).to(torch.int64)
    if n.numel() and not bool(((n > 0) & (n <= d)).all()):
        raise ValueError(
            "reversible learning needs momentum in (0, 1] (γ = 0 forgets v and cannot be reversed); "
            f"got values in [{float(gamma.min())}, {float(gamma.max())}]"
        )
    return n, d


def _mul_gamma(v: Tensor, n: int | Tensor, d: int, k: int, buf: InfoBuffer) -> Tensor:
    """``v ← (N/D)·v`` exactly invertibly; ``D = 2^k``."""
    buf.push(v & (d - 1), d)  # v mod D (non-negative for two's complement)
    q = v >> k  # floor(v / D)
    return q * n + buf.pop(n, v.device)


def _div_gamma(v: Tensor, n: int | Tensor, d: int, radix_bits: int, buf: InfoBuffer) -> Tensor:
    """The exact inverse of :func:`_mul_gamma`."""
    buf.push(torch.remainder(v, n), n)
    q = torch.div(v, n, rounding_mode="floor")
    _check(q.to(torch.float64) * d, "the velocity (reverse division by γ)", radix_bits)
    return q * d + buf.pop(d, v.device)


def _fingerprint(x: Tensor) -> tuple[int, int]:
    """Two overflow-free sums of an int64 tensor; any change in one element changes one of them."""
    return int((x & 0xFFFFFFFF).sum()), int((x >> 32).sum())


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


Schedule = Callable[[dict[str, Tensor], int], tuple[Tensor, Tensor]]


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
    R, k = radix_bits, momentum_bits
    like = {name: p.detach() for name, p in params0.items()}
    device = next(iter(like.values())).device if like else torch.device("cpu")
    P = tree.numel(like)
    raw_leaves = tree.detached(raw, requires_grad=True)
    raw_list = list(raw_leaves.values())
    if schedule is None:
        alphas = _per_step(lrs, steps, "lrs")
        rationals = [rational_momentum(float(g), k) for g in _per_step(momenta, steps, "momenta")]

    def at(t: int, graph: bool = False) -> tuple[Any, Any, Any, Any, tuple[Tensor, Tensor] | None]:
        """Step ``t``'s ``(α, N, γ = N/D, 1 − γ, (α, γ) with their graph to raw or None)``: floats and
        ints, or per-weight tensors under a schedule (computed the same way forward and in reverse)."""
        if schedule is None:
            n, d = rationals[t]
            return float(alphas[t]), n, n / d, (d - n) / d, None
        with torch.set_grad_enabled(graph):
            a, g = (torch.as_tensor(x, dtype=torch.float64, device=device).expand(P) for x in schedule(raw_leaves, t))
        nt, dt = rational_momenta(g, k)
        gamma = nt.to(torch.float64) / dt  # exact: N < 2^31, D a power of two
        return a.detach(), nt, gamma, 1.0 - gamma, ((a, g) if graph else None)

    def view(w_int: Tensor) -> dict[str, Tensor]:
        return {name: p.detach().to(like[name].dtype) for name, p in tree.unflatten(from_fixed(w_int, R), like).items()}

    def grad_at(w_int: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """(w leaf, L_T, ∇_w L_T with graph) at the float view of ``w_int``; the same code both ways."""
        w_leaf = from_fixed(w_int, R).requires_grad_(True)
        params = {name: p.to(like[name].dtype) for name, p in tree.unflatten(w_leaf, like).items()}
        loss = train_loss(params, raw_leaves, t)
        (g,) = torch.autograd.grad(loss, w_leaf, create_graph=True, allow_unused=True)
        return w_leaf, loss, (torch.zeros_like(w_leaf) if g is None else g)

    w = to_fixed(tree.flatten(list(like.values())), R) if P else torch.zeros(0, dtype=torch.int64, device=device)
    v = (
        to_fixed(velocity0, R).reshape(-1)
        if velocity0 is not None
        else torch.zeros(P, dtype=torch.int64, device=device)
    )
    if v.numel() != P:
        raise ValueError(f"velocity0 has {v.numel()} entries, params0 has {P}")
    w0_fixed = w.clone()
    buf = InfoBuffer(P)
    fingerprints: list[tuple[int, int]] = []
    trajectory: list[tuple[Tensor, Tensor]] = []
    train_last = gnorm_last = None
    gammas_used = torch.zeros(steps, dtype=torch.float64)
    bits_bound = 0.0
    d = 2**k

    # ---- forward: T exact steps, storing only the lost bits
    with torch.enable_grad():
        for t in range(steps):
            if return_trajectory_check:
                trajectory.append((w.clone(), v.clone()))
            alpha, n, gamma, one_minus, _ = at(t)
            gammas_used[t] = float(gamma.mean()) if isinstance(gamma, Tensor) else gamma
            bits_bound += float(torch.log2(d / n.double()).sum()) if isinstance(n, Tensor) else P * math.log2(d / n)
            _, loss, g = grad_at(w, t)
            G = to_fixed(one_minus * g.detach(), R)
            fingerprints.append(_fingerprint(G))
            v = _check(_mul_gamma(v, n, d, k, buf) - G, "the velocity", R)
            w = _check(w + _check(to_fixed(alpha * from_fixed(v, R), R), "α·v", R), "the weights", R)
            if t == steps - 1:
                train_last, gnorm_last = float(loss.detach()), float(torch.linalg.vector_norm(g.detach()))
            del loss, g
            if on_step is not None:
                on_step()
    bit_lengths = buf.bit_lengths()
    bits_used, bits_max = sum(bit_lengths), max(bit_lengths, default=0)
    wT, vT = w.clone(), v.clone()

    # ---- outer objective at w_T
    with torch.enable_grad():
        w_leaf = from_fixed(w, R).requires_grad_(True)
        params = {name: p.to(like[name].dtype) for name, p in tree.unflatten(w_leaf, like).items()}
        lv = val_loss(params, raw_leaves)
        grads = torch.autograd.grad(lv, [w_leaf, *raw_list], allow_unused=True)
    dw = tree.fill_none(grads[:1], [w_leaf])[0].detach().to(torch.float64)
    d_raw = [x.detach().to(torch.float64) for x in tree.fill_none(grads[1:], raw_list)]
    dv = torch.zeros(P, dtype=torch.float64, device=device)
    d_alpha = torch.zeros(steps, dtype=torch.float64)
    d_gamma = torch.zeros(steps, dtype=torch.float64)
    exact: list[bool] = [False] * steps if return_trajectory_check else []

    # ---- reverse: undo each step exactly, accumulating adjoints (Maclaurin Algorithm 2)
    for t in reversed(range(steps)):
        alpha, n, gamma, one_minus, graph = at(t, graph=schedule is not None)
        v_next = from_fixed(v, R)
        da = dw * v_next  # dL_V/dα_t, per weight
        d_alpha[t] = da.sum().cpu()
        dv = dv + alpha * dw
        w = w - to_fixed(alpha * v_next, R)
        with torch.enable_grad():
            w_leaf, _, g = grad_at(w, t)
            G = to_fixed(one_minus * g.detach(), R)
            if _fingerprint(G) != fingerprints[t]:
                raise RuntimeError(
                    f"reversible learning: the training gradient at step {t} differs between the forward and "
                    "reverse pass (non-deterministic train_loss or kernels); exact reversal is impossible"
                )
            v = _div_gamma(v + G, n, d, R, buf)
            dg = dv * (from_fixed(v, R) + g.detach())  # dL_V/dγ_t, per weight
            d_gamma[t] = dg.sum().cpu()
            if g.requires_grad:
                vjp = tree.fill_none(
                    torch.autograd.grad(
                        g, [w_leaf, *raw_list], grad_outputs=(one_minus * dv).to(g.dtype), allow_unused=True
                    ),
                    [w_leaf, *raw_list],
                )
                dw = dw - vjp[0].detach().to(torch.float64)
                d_raw = [a - b.detach().to(torch.float64) for a, b in zip(d_raw, vjp[1:])]
            outs = [(x, dx) for x, dx in zip(graph or (), (da, dg)) if x.requires_grad]
            if outs and raw_list:  # α_t and γ_t are functions of λ
                through = tree.fill_none(
                    torch.autograd.grad([x for x, _ in outs], raw_list, [dx for _, dx in outs], allow_unused=True),
                    raw_list,
                )
                d_raw = [a + b.detach().to(torch.float64) for a, b in zip(d_raw, through)]
            del g, w_leaf, graph
        dv = gamma * dv
        if return_trajectory_check:
            exact[t] = bool(torch.equal(w, trajectory[t][0]) and torch.equal(v, trajectory[t][1]))

    hyper_raw = {name: x.to(r.dtype) for (name, r), x in zip(raw.items(), d_raw)}
    return ReversibleResult(
        params=view(wT),
        velocity=from_fixed(vT, R),
        val_loss=float(lv.detach()),
        hyper_raw=hyper_raw,
        hyper_lrs=d_alpha,
        hyper_momenta=d_gamma,
        hyper_params0=tree.unflatten(dw, like),
        params0_recovered=view(w),
        params0_fixed=w0_fixed,
        params0_fixed_recovered=w,
        velocity0_fixed_recovered=v,
        momenta_used=gammas_used,
        bits_used=bits_used,
        bits_max_per_weight=bits_max,
        bits_bound=bits_bound,
        buffer_bits_after_reverse=buf.bits_used(),
        train_loss_last=train_last,
        grad_norm_last=gnorm_last,
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
