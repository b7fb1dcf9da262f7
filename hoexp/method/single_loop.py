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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from hoexp import tree
from hoexp.components import BuildContext, CheckContext, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt
from hoexp.method.base import scalars
from hoexp.method.minibatch import TRAIN_CHUNK_SEED, VAL_CHUNK_SEED, Chunks, SagaTable, chunk, pool_size
from hoexp.optim import Optimizer
from hoexp.types import InnerState, OuterResult, OuterStep

Params = dict[str, Tensor]
LossFn = Callable[[Params, Params], Tensor]


# ------------------------------------------------------------------------------ minibatch derivatives (pure)
def train_products(loss: LossFn, w: Params, lam: Params, v: Params) -> tuple[Params, Params, Params, Tensor]:
    """``(∇_w L_T, ∇²_ww L_T v, ∇²_λw L_T v, L_T)`` at ``(w, λ)``: the gradient and its vector-Jacobian product in
    ``(w, λ)`` with cotangent ``v`` (``torch.func.vjp`` of ``torch.func.grad``; one double-backward pass)."""
    out: Any = vjp(lambda w_, lam_: grad_and_value(lambda p: loss(p, lam_))(w_), w, lam, has_aux=True)
    g, pullback, value = out
    hv, cv = pullback(v)
    return g, hv, cv, value


def hvp(loss: LossFn, w: Params, lam: Params) -> Callable[[Params], Params]:
    """``u ↦ ∇²_ww L_T(w, λ) u`` (the gradient's pullback, linearized once and reused for every ``u``)."""
    out: Any = vjp(lambda w_: grad(lambda p: loss(p, lam))(w_), w)
    pullback = out[1]
    return lambda u: pullback(u)[0]


def val_gradients(loss: LossFn, w: Params, lam: Params) -> tuple[Params, Params, Tensor]:
    """``(∇_w L_V, ∇_λ L_V, L_V)`` at ``(w, λ)`` (zeros where ``L_V`` does not read ``λ``); one backward pass."""
    (gw, glam), value = grad_and_value(loss, argnums=(0, 1))(w, lam)
    return gw, glam, value


def flat(*trees: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([tree.flatten(t.values()) for t in trees])


def split(vector: Tensor, *like: Mapping[str, Tensor]) -> list[Params]:
    """The inverse of :func:`flat`: ``vector`` cut into trees shaped like ``like``."""
    out, i = [], 0
    for t in like:
        n = tree.numel(t)
        out.append(tree.unflatten(vector[i : i + n], t))
        i += n
    return out


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

    def reduce(self, j: int, weight: float, *parts: Params) -> list[Params]:
        """``parts`` (SAGA directions of them with a table; as given without)."""
        if self.table is None:
            return list(parts)
        return split(self.table.direction(j, weight, flat(*parts)), *parts)

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
    v: Tensor | None = field(default=None, repr=False)  # flat, the paper's sign: v → −H⁻¹∇_w L_V
    steps: int = field(default=0, repr=False)  # joint steps taken (the decay's k)
    train_side: Sampler = field(init=False, repr=False)
    val_side: Sampler = field(init=False, repr=False)

    extra_batches: ClassVar[int] = 0
    needs_stationary_point: ClassVar[bool] = True  # implicit differentiation at the joint fixed point: not lr/momentum
    needs_pathwise_hp: ClassVar[bool] = True  # differentiates ∇_w L_T in λ
    differentiates_steps: ClassVar[bool] = True  # its steps are its own torch.func passes (no compile, no autocast)
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

    def joint_step(self, st: OuterStep, t: int, inner: InnerState, v: Params, rates: tuple[float | None, float]) -> Any:
        """One step of ``(w, v)`` on training batch ``t`` and a validation minibatch; returns the new inner state
        and ``v``, this step's ``D_λ`` (scaled by the decay) and ``(L_T, ‖D_w‖, L_V, residual)`` as 0-d tensors."""
        task, raw = st.task, tree.detached(st.raw)
        batch, j, wj = self.train_side.draw(st.train[t], task.batch_dim)
        vbatch, jv, wjv = self.val_side.draw(st.val, task.batch_dim)
        params = tree.detached(inner.params)
        g, hv, cv, lt = train_products(lambda w, lam: task.train_loss(w, lam, batch), params, raw, v)
        aw, alam, lv = val_gradients(lambda w, lam: task.val_loss(w, lam, vbatch), params, raw)
        # the minibatch residual ‖Hv + ∇_w L_V‖/‖∇_w L_V‖ before variance reduction: how far v is from its target
        residual = tree.norm({k: hv[k] + aw[k] for k in hv}) / tree.norm(aw).clamp_min(torch.finfo(lt.dtype).tiny)
        g, hv, cv = self.train_side.reduce(j, wj, g, hv, cv)
        aw, alam = self.val_side.reduce(jv, wjv, aw, alam)
        scale = (self.steps + 1) ** -self.decay if self.decay else 1.0
        rho, v_step = rates
        overrides = task.family.optimizer_overrides(raw, t)
        if self.decay and rho is not None:
            overrides = {**overrides, "lr": rho * scale}
        with torch.no_grad():
            new_params, opt_state = st.inner_opt.update(inner.params, g, inner.opt_state, **overrides)
            v = {k: v[k] - (v_step * scale) * (hv[k] + aw[k]) for k in v}
            d_lam = {k: scale * (cv[k] + alam[k]) for k in cv}
        self.steps += 1
        return InnerState(new_params, opt_state, inner.step + 1), v, d_lam, (lt, tree.norm(g), lv, residual)

    def __call__(self, st: OuterStep) -> OuterResult:
        params = st.inner.params
        flat_v = self.v if self.v is not None and self.v.numel() == tree.numel(params) else None
        v = (
            tree.unflatten(flat_v, params)
            if flat_v is not None
            else {k: torch.zeros_like(p) for k, p in params.items()}
        )
        rates = step_lr(st.inner_opt, self.v_lr)
        inner, total, last = st.inner, None, None
        for t in range(len(st.train)):
            inner, v, d_lam, last = self.joint_step(st, t, inner, v, rates)
            total = d_lam if total is None else {k: total[k] + d_lam[k] for k in total}
            if st.on_step is not None:
                st.on_step()
        if total is None or last is None:
            return OuterResult(None, inner, {})
        hypergrad = {k: x / len(st.train) for k, x in total.items()}
        self.v = tree.flatten(v.values())
        lt, gnorm, lv, residual = last
        values = torch.stack([lt, gnorm, lv, residual, tree.norm(hypergrad), torch.linalg.vector_norm(self.v)])
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
    name: str = "soba",
) -> SingleLoop:
    """``method=soba``: SOBA (module doc); ``batch_size`` / ``val_batch_size`` 0 use the engine's batches whole,
    ``v_lr`` null takes optim/inner's lr, ``decay`` the exponent of the steps' ``(k+1)^−decay``."""
    return SingleLoop(False, batch_size, val_batch_size, v_lr, decay, seed=ctx.seed, name=name)


def saba(
    ctx: BuildContext,
    *,
    batch_size: PositiveInt = 64,
    val_batch_size: PositiveInt = 64,
    v_lr: PositiveFloat | None = None,
    decay: NonNegFloat = 0.0,
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
    return SingleLoop(True, batch_size, val_batch_size, v_lr, decay, seed=ctx.seed, name=name)
