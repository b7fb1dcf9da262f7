"""Single-loop stochastic bilevel optimization: SOBA and SABA (Dagréou, Ablin, Vaiter, Moreau, NeurIPS 2022, "A
framework for bilevel optimization that enables stochastic and global variance reduction algorithms").

The weights ``w``, the linear system's vector ``v`` and the hyperparameters ``λ`` move together, each step on
minibatches ``B`` (training) and ``B'`` (validation), all three directions at the same point::

    D_w = ∇_w L_T(w, λ; B)
    D_v = ∇²_ww L_T(w, λ; B) v + ∇_w L_V(w, λ; B')        v ← v − ρ_t D_v
    D_λ = ∇²_λw L_T(w, λ; B) v + ∇_λ L_V(w, λ; B')        λ ← λ − γ_t D_λ

``v`` tends to ``−H⁻¹∇_w L_V`` (the paper's sign), so at the joint fixed point ``D_λ`` is the IFT hypergradient
``∂L_V/∂λ − ∂²L_T/∂λ∂w H⁻¹ ∂L_V/∂w`` and its zero is the bilevel solution's. SABA replaces each of the five
minibatch quantities by its SAGA direction over fixed chunks of the split (:mod:`hoexp.method.minibatch`), so with
constant steps it converges to that point where SOBA stays in a noise ball.

In hoexp: ``w`` moves by ``optim/inner`` along ``D_w`` (``optim/inner=sgd`` with ``lr`` ρ is the paper's step), ``v``
by plain steps of ``method.v_lr`` (null: ``optim/inner``'s ``lr``, the paper's single ρ), and ``λ`` by ``optim/outer``
along the returned ``D_λ`` (``optim/outer=sgd`` with ``lr`` γ; benchopt's ``outer_ratio`` r is ``γ = ρ/r``). With
``decay`` a > 0 step ``k`` (counted over the run) scales ρ by ``(k+1)^−a`` (the ``lr`` passed to ``optim/inner`` and
``v``'s step) and ``D_λ`` by the same factor, so plain SGD on ``λ`` takes ``γ/(k+1)^a`` (benchopt's SOBA: a = ½;
SABA: constant). Each of the ``inner_steps`` training batches of an outer step is one joint step of ``(w, v)``;
``λ`` moves once per outer step along the mean of their ``D_λ`` (``inner_steps=1`` is the paper's algorithm).

Batches: ``batch_size`` / ``val_batch_size`` > 0 cut the batches the engine hands (the whole split with
``dataset.batch_size=0``) into fixed chunks and draw one per step (benchopt's sampler, default 64); 0 uses each
engine batch whole (SOBA on ``dataset.batch_size`` minibatches). Cost per joint step: one gradient of ``L_T`` and
its vector-Jacobian product in ``(w, λ)`` (one double-backward pass), one gradient of ``L_V``; SABA keeps one
vector of ``2P + H`` numbers per training chunk and ``P + H`` per validation chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from hoexp import tree
from hoexp.components import BuildContext, CheckContext, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt
from hoexp.method.base import gradients, scalars
from hoexp.method.compiled_derivatives import CompiledDerivatives
from hoexp.method.minibatch import TRAIN_CHUNK_SEED, VAL_CHUNK_SEED, Chunks, SagaTable, chunk, pool_size
from hoexp.optim import Optimizer
from hoexp.types import COMPILE_S, InnerState, OuterResult, OuterStep

Params = dict[str, Tensor]
LossFn = Callable[[Params, Params], Tensor]


# ------------------------------------------------------------------------------ minibatch derivatives (pure)
# torch.autograd.grad on fresh leaves rather than torch.func's grad/vjp: the same passes, bit for bit
# (tests/test_single_loop.py checks them against torch.func), without the transforms' per-call wrapping, which cost
# ~3x the passes themselves on benchopt's hyper-cleaning problem (a 784x10 linear model, minibatches of 64).


def _products(loss: LossFn, w: Params, lam: Params, v: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """``(∇_w L_T, [∇²_ww L_T v, ∇²_λw L_T v], L_T)`` as lists in the order of ``w``'s then ``λ``'s keys."""
    wl, ll = tree.detached(w, requires_grad=True), tree.detached(lam, requires_grad=True)
    with torch.enable_grad():
        value = loss(wl, ll)
        g = gradients(value, list(wl.values()), create_graph=True)
        second = gradients(g, [*wl.values(), *ll.values()], v)
    return [x.detach() for x in g], second, value.detach()


def train_products(loss: LossFn, w: Params, lam: Params, v: Params) -> tuple[Params, Params, Params, Tensor]:
    """``(∇_w L_T, ∇²_ww L_T v, ∇²_λw L_T v, L_T)`` at ``(w, λ)``: the gradient and its vector-Jacobian product in
    ``(w, λ)`` with cotangent ``v`` (one double-backward pass)."""
    g, second, value = _products(loss, w, lam, list(v.values()))
    n = len(w)
    return dict(zip(w, g)), dict(zip(w, second[:n])), dict(zip(lam, second[n:])), value


def train_flat(loss: LossFn, w: Params, lam: Params, v: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`train_products` as one flat vector ``[∇_w L_T | ∇²_ww L_T v | ∇²_λw L_T v]`` (``2P + H``) and ``L_T``."""
    g, second, value = _products(loss, w, lam, v)
    return tree.flatten([*g, *second]), value


def hvp(loss: LossFn, w: Params, lam: Params) -> Callable[[Params], Params]:
    """``u ↦ ∇²_ww L_T(w, λ) u`` (the gradient's graph, built once and reused for every ``u``)."""
    wl = tree.detached(w, requires_grad=True)
    with torch.enable_grad():
        g = gradients(loss(wl, lam), list(wl.values()), create_graph=True)

    def product(u: Params) -> Params:
        with torch.enable_grad():
            return dict(zip(wl, gradients(g, list(wl.values()), list(u.values()), retain_graph=True)))

    return product


def val_flat(loss: LossFn, w: Params, lam: Params) -> tuple[Tensor, Tensor]:
    """``([∇_w L_V | ∇_λ L_V], L_V)`` at ``(w, λ)``, flat (``P + H``; zeros where ``L_V`` does not read ``λ``);
    one backward pass."""
    wl, ll = tree.detached(w, requires_grad=True), tree.detached(lam, requires_grad=True)
    with torch.enable_grad():
        value = loss(wl, ll)
        return tree.flatten(gradients(value, [*wl.values(), *ll.values()])), value.detach()


def val_gradients(loss: LossFn, w: Params, lam: Params) -> tuple[Params, Params, Tensor]:
    """``(∇_w L_V, ∇_λ L_V, L_V)`` at ``(w, λ)`` (zeros where ``L_V`` does not read ``λ``); one backward pass."""
    flat, value = val_flat(loss, w, lam)
    n = tree.numel(w)
    return tree.unflatten(flat[:n], w), tree.unflatten(flat[n:], lam), value


class Sampler:
    """The minibatches of one side (training or validation): chunks of the engine's batch (``size`` > 0) or the
    engine's batch whole, each with its SAGA memory when ``reduce``."""

    def __init__(self, size: int, seed: int, reduce: bool):
        self.chunks = Chunks(size, seed) if size else None
        self.table = SagaTable() if reduce else None

    def draw(self, batch: tuple, batch_dim: int) -> tuple[tuple, int, float]:
        """``(minibatch, chunk index, ω)`` (index 0 and ω = 1 for a batch used whole)."""
        if self.chunks is None:
            return batch, 0, 1.0
        j, start, stop, weight = self.chunks.draw(pool_size(batch, batch_dim))
        return chunk(batch, start, stop, batch_dim), j, weight

    def reduce(self, j: int, weight: float, vector: Tensor) -> Tensor:
        """The SAGA direction of the flat ``vector`` of chunk ``j`` with a table; ``vector`` itself without."""
        return vector if self.table is None else self.table.direction(j, weight, vector)

    def state_dict(self) -> dict[str, Any]:
        return {
            "chunks": None if self.chunks is None else self.chunks.state_dict(),
            "table": None if self.table is None else self.table.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], memory: bool) -> None:
        if self.chunks is not None and state.get("chunks") is not None:
            self.chunks.load_state_dict(state["chunks"])
        if self.table is not None:
            self.table.load_state_dict((state.get("table") or {}) if memory else {})


def step_lr(inner_opt: Optimizer, v_lr: float | None) -> tuple[float | None, float]:
    """``(ρ of optim/inner or None, v's step)``; v's step defaults to ρ."""
    rho = inner_opt.defaults.get("lr")
    step = v_lr if v_lr is not None else rho
    if step is None:
        raise ValueError(f"optim/inner={inner_opt.name} has no configured lr: set method.v_lr")
    return (None if rho is None else float(rho)), float(step)


def needs_lr(inner_opt: Optimizer, v_lr: float | None, decay: float) -> None:
    """Refuse an inner optimizer without ``lr`` where v's step or the decayed ρ needs it."""
    if "lr" not in inner_opt.defaults and (v_lr is None or decay > 0):
        raise ValueError(
            f"optim/inner={inner_opt.name} has no configured lr, which "
            + ("method.decay scales" if v_lr is not None else "v's step defaults to")
            + ": set method.v_lr"
            + (" and method.decay=0" if decay > 0 else "")
        )


# ---------------------------------------------------------------------------------------------- the method
@dataclass
class SingleLoop:
    """``method=soba`` / ``method=saba`` (module doc): ``variance_reduction`` (SABA), minibatch sizes, ``v_lr``,
    step ``decay``, and ``seed`` of the chunk samplers (the run's). Carries ``v``, the step count, the samplers and
    SABA's memory (:class:`~hoexp.method.base.CarriesState`)."""

    variance_reduction: bool = False
    batch_size: int = 64
    val_batch_size: int = 64
    v_lr: float | None = None
    decay: float = 0.5
    seed: int = 0
    name: str = "soba"
    compile: bool = False  # the minibatch derivatives through torch.compile (hoexp.method.compiled_derivatives)
    compile_backend: Any = field(default="inductor", repr=False)  # torch.compile's backend (tests: a counter)
    v: Tensor | None = field(default=None, repr=False)  # flat, the paper's sign: v → −H⁻¹∇_w L_V
    steps: int = field(default=0, repr=False)  # joint steps taken (the decay's k)
    train_side: Sampler = field(init=False, repr=False)
    val_side: Sampler = field(init=False, repr=False)
    _compiled: dict[int, CompiledDerivatives] = field(default_factory=dict, repr=False, compare=False)
    _compile_s: float = field(default=0.0, repr=False)  # this outer step's warm-up seconds (compile=true)

    extra_batches: ClassVar[int] = 0
    needs_stationary_point: ClassVar[bool] = True  # implicit differentiation at the joint fixed point: not lr/momentum
    needs_pathwise_hp: ClassVar[bool] = True  # differentiates ∇_w L_T in λ
    # its own passes: not run.compile's plain steps (method.compile), no autocast
    differentiates_steps: ClassVar[bool] = True
    refuses_data_parallel: ClassVar[str] = "takes its minibatch derivatives with torch.func on one process's batches"

    def __post_init__(self) -> None:
        if self.variance_reduction and not (self.batch_size and self.val_batch_size):
            raise ValueError(
                "SABA's memory is over fixed chunks of the split: set method.batch_size and method.val_batch_size "
                "> 0 (and dataset.batch_size=0)"
            )
        self.train_side = Sampler(self.batch_size, self.seed + TRAIN_CHUNK_SEED, self.variance_reduction)
        self.val_side = Sampler(self.val_batch_size, self.seed + VAL_CHUNK_SEED, self.variance_reduction)

    def check(self, ctx: CheckContext) -> None:
        needs_lr(ctx.inner_opt, self.v_lr, self.decay)

    # CarriesState: ``{}`` (reset_inner) drops v and SABA's memory, which belong to the old weights; the samplers
    # and the step count go on.
    def state_dict(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "steps": self.steps,
            "train": self.train_side.state_dict(),
            "val": self.val_side.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.v = state.get("v")
        self.steps = int(state.get("steps", self.steps))
        self.train_side.load_state_dict(state.get("train", {}), memory=bool(state))
        self.val_side.load_state_dict(state.get("val", {}), memory=bool(state))

    def joint_step(
        self, st: OuterStep, t: int, inner: InnerState, v: Tensor, raw: Params, rates: tuple[float | None, float],
        last: bool,
    ) -> tuple[InnerState, Tensor, Tensor, tuple[Tensor, ...] | None]:  # fmt: skip
        """One step of ``(w, v)`` on training batch ``t`` and a validation minibatch (``v`` and ``D_λ`` flat); returns
        the new inner state and ``v``, this step's ``D_λ`` (scaled by the decay) and, for the outer step's ``last``
        joint step (what is logged), ``(L_T, ‖D_w‖, L_V, residual)`` as 0-d tensors."""
        task, n = st.task, v.numel()
        batch, j, wj = self.train_side.draw(st.train[t], task.batch_dim)
        vbatch, jv, wjv = self.val_side.draw(st.val, task.batch_dim)
        params = tree.detached(inner.params)
        vs = list(tree.unflatten(v, params).values())
        train, lt, val, lv = self.derivatives(task, params, raw, vs, batch, vbatch)
        if last:  # logged: the minibatch residual ‖Hv + ∇_w L_V‖/‖∇_w L_V‖ before variance reduction
            aw = val[:n]
            tiny = torch.finfo(lt.dtype).tiny
            residual = torch.linalg.vector_norm(train[n : 2 * n] + aw) / torch.linalg.vector_norm(aw).clamp_min(tiny)
        train, val = self.train_side.reduce(j, wj, train), self.val_side.reduce(jv, wjv, val)
        g, hv, cv, aw, alam = train[:n], train[n : 2 * n], train[2 * n :], val[:n], val[n:]
        scale = (self.steps + 1) ** -self.decay if self.decay else 1.0
        rho, v_step = rates
        overrides = task.family.optimizer_overrides(raw, t)
        if self.decay and rho is not None:
            overrides = {**overrides, "lr": rho * scale}
        with torch.no_grad():
            grads = tree.unflatten(g, params)
            new_params, opt_state = st.inner_opt.update(inner.params, grads, inner.opt_state, **overrides)
            v = v - (v_step * scale) * (hv + aw)
            d_lam = scale * (cv + alam) if scale != 1.0 else cv + alam
        self.steps += 1
        stats = (lt, torch.linalg.vector_norm(g), lv, residual) if last else None
        return InnerState(new_params, opt_state, inner.step + 1), v, d_lam, stats

    def derivatives(
        self, task: Any, params: Params, raw: Params, vs: list[Tensor], batch: tuple, vbatch: tuple
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``([g | Hv | ∂²_λw v], L_T, [∇_w L_V | ∇_λ L_V], L_V)`` on the two minibatches: eager autograd, or with
        ``compile`` one compiled graph per task (its warm-up seconds added to ``_compile_s``)."""
        if not self.compile:
            train, lt = train_flat(lambda w, lam: task.train_loss(w, lam, batch), params, raw, vs)
            val, lv = val_flat(lambda w, lam: task.val_loss(w, lam, vbatch), params, raw)
            return train, lt, val, lv
        fn = self._compiled.get(id(task))
        if fn is None:
            fn = CompiledDerivatives(task.train_loss, task.val_loss, task.batch_dim, self.compile_backend)
            self._compiled[id(task)] = fn
        (train, lt, val, lv), warm_up = fn(params, raw, vs, batch, vbatch)
        self._compile_s += warm_up
        return train, lt, val, lv

    def __call__(self, st: OuterStep) -> OuterResult:
        self._compile_s = 0.0
        params, raw = st.inner.params, tree.detached(st.raw)
        n = tree.numel(params)
        v = (
            self.v
            if self.v is not None and self.v.numel() == n
            else tree.flatten(map(torch.zeros_like, params.values()))
        )
        rates = step_lr(st.inner_opt, self.v_lr)
        inner, total, last, steps = st.inner, None, None, len(st.train)
        for t in range(steps):
            inner, v, d_lam, stats = self.joint_step(st, t, inner, v, raw, rates, last=t == steps - 1)
            total = d_lam if total is None else total + d_lam
            last = stats if stats is not None else last
            if st.on_step is not None:
                st.on_step()
        if total is None or last is None:
            return OuterResult(None, inner, {})
        mean = total / steps
        hypergrad, self.v = tree.unflatten(mean, raw), v
        lt, gnorm, lv, residual = last
        values = torch.stack([lt, gnorm, lv, residual, torch.linalg.vector_norm(mean), torch.linalg.vector_norm(v)])
        lt_, gnorm_, lv_, res_, hnorm, vnorm = values.tolist()  # one host sync
        return OuterResult(
            hypergrad,
            inner,
            scalars(
                **{
                    "inner/loss": lt_,
                    "inner/grad_norm": gnorm_,
                    "hypergrad/norm": hnorm,
                    "solver/residual": res_,
                    "solver/v_norm": vnorm,
                    "solver/val_loss": lv_,
                    "solver/step_scale": (self.steps) ** -self.decay if self.decay else 1.0,
                    COMPILE_S: self._compile_s or None,  # the engine keeps it out of time/outer_step_s
                }
            ),
        )


def soba(
    ctx: BuildContext,
    *,
    batch_size: NonNegInt = 64,
    val_batch_size: NonNegInt = 64,
    v_lr: PositiveFloat | None = None,
    decay: NonNegFloat = 0.5,
    compile: bool = False,
    name: str = "soba",
) -> SingleLoop:
    """``method=soba``: SOBA (module doc); ``batch_size`` / ``val_batch_size`` 0 use the engine's batches whole,
    ``v_lr`` null takes optim/inner's lr, ``decay`` the exponent of the steps' ``(k+1)^−decay``, ``compile`` the
    minibatch derivatives through ``torch.compile`` (:mod:`hoexp.method.compiled_derivatives`)."""
    return SingleLoop(False, batch_size, val_batch_size, v_lr, decay, seed=ctx.seed, name=name, compile=compile)


def saba(
    ctx: BuildContext,
    *,
    batch_size: PositiveInt = 64,
    val_batch_size: PositiveInt = 64,
    v_lr: PositiveFloat | None = None,
    decay: NonNegFloat = 0.0,
    compile: bool = False,
    name: str = "saba",
) -> SingleLoop:
    """``method=saba``: SOBA with SAGA variance reduction over fixed chunks of the training and validation splits
    (needs ``dataset.batch_size=0``: the method draws the chunks); constant steps by default, as benchopt's."""
    given = [k for k in ("batch_size", "val_batch_size") if getattr(ctx.data, k, 0)]
    if given:
        raise ValueError(
            f"SABA's memory is over fixed chunks of the whole split, and dataset.{given[0]} hands it other "
            f"minibatches every step: set dataset.{given[0]}=0 (method.{given[0]} sets SABA's minibatch)"
        )
    return SingleLoop(True, batch_size, val_batch_size, v_lr, decay, seed=ctx.seed, name=name, compile=compile)
