"""AmIGO (Arbel & Mairal, ICLR 2022, "Amortized implicit differentiation for stochastic bilevel optimization"):
every outer step trains ``w`` warm-started, then improves the linear system's solution ``u ≈ H⁻¹∇_w L_V`` warm-started
from the previous outer step's, both on minibatches, and moves ``λ`` along::

    w ← inner_steps steps of optim/inner on training minibatches (from the current w)
    a_w, a_λ = ∇_w L_V, ∇_λ L_V on a validation minibatch B'
    gd:  v_steps times, each on a fresh training minibatch B_k:   u ← u − η (∇²_ww L_T(B_k) u − a_w)
    cg:  v_steps conjugate-gradient iterations on ∇²_ww L_T(B) u = a_w, one minibatch B, started at u
    D_λ = a_λ − ∇²_λw L_T(B'') u on a fresh training minibatch B''

The warm start amortizes the solve: its iterations add up over outer steps while ``w`` and ``λ`` move slowly, and
the fixed point is the IFT hypergradient's. ``λ`` moves by ``optim/outer`` along ``D_λ``; ``η`` is ``method.v_lr``
(null: ``optim/inner``'s ``lr``; benchopt's AmIGO uses one step size for both). benchopt's defaults: 10 inner steps
(hoexp's ``inner_steps``), 10 steps on ``u`` (``v_steps``), minibatches of 64. Batches as
:mod:`hoexp.method.single_loop`: ``batch_size`` > 0 cuts the engine's batches (the whole split with
``dataset.batch_size=0``) into fixed chunks drawn without replacement; 0 takes the engine's batches whole, the
``v_steps`` (gd; cg: one) system batches and the mixed term's batch then drawn after the inner steps'
(``extra_batches``). Cost per outer step: the inner steps, one validation gradient, ``v_steps`` Hessian-vector
products (and one linearization per minibatch), one double-backward pass for the mixed term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from hoexp import tree
from hoexp.components import BuildContext, CheckContext, NonNegInt, PositiveFloat, PositiveInt
from hoexp.method.base import inner_scalars, train_inner
from hoexp.method.minibatch import TRAIN_CHUNK_SEED, VAL_CHUNK_SEED
from hoexp.method.single_loop import Sampler, hvp, needs_lr, step_lr, train_products, val_gradients
from hoexp.types import OuterResult, OuterStep

SOLVERS = ("gd", "cg")


def cg_steps(matvec: Callable[[Tensor], Tensor], b: Tensor, x: Tensor, iterations: int) -> Tensor:
    """``iterations`` conjugate-gradient steps on ``A x = b`` from ``x`` (flat vectors). It stops moving (no host
    sync) at the first direction without positive curvature or once the residual is zero. Cost: one product each."""
    r = b - matvec(x)
    p, rs = r, r @ r
    stopped = rs <= 0
    for _ in range(iterations):
        ap = matvec(p)
        pap = p @ ap
        stopped = stopped | (pap <= 0)
        alpha = torch.where(stopped, torch.zeros_like(rs), rs / torch.where(stopped, torch.ones_like(pap), pap))
        x, r = x + alpha * p, r - alpha * ap
        rs_new = r @ r
        stopped = stopped | (rs_new <= 0)
        p = r + torch.where(stopped, torch.zeros_like(rs), rs_new / torch.where(rs > 0, rs, torch.ones_like(rs))) * p
        rs = rs_new
    return x


@dataclass
class AmIGO:
    """``method=amigo`` (module doc): ``solver`` gd | cg, ``v_steps``, minibatch sizes, ``v_lr`` (gd), ``seed`` of the
    chunk samplers (the run's). Carries ``u`` and the samplers (:class:`~hoexp.method.base.CarriesState`)."""

    solver: str = "gd"
    v_steps: int = 10
    batch_size: int = 64
    val_batch_size: int = 64
    v_lr: float | None = None
    seed: int = 0
    name: str = "amigo"
    u: Tensor | None = field(default=None, repr=False)  # flat: u → H⁻¹∇_w L_V
    train_side: Sampler = field(init=False, repr=False)
    val_side: Sampler = field(init=False, repr=False)

    needs_stationary_point: ClassVar[bool] = True  # implicit differentiation: not lr / momentum
    needs_pathwise_hp: ClassVar[bool] = True  # the mixed term differentiates ∇_w L_T in λ
    differentiates_steps: ClassVar[bool] = False  # plain inner steps: compile=true and mixed precision apply
    refuses_data_parallel: ClassVar[str] = "takes its minibatch derivatives with torch.func on one process's batches"

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown AmIGO solver '{self.solver}'; valid: {', '.join(SOLVERS)}")
        self.train_side = Sampler(self.batch_size, self.seed + TRAIN_CHUNK_SEED, False)
        self.val_side = Sampler(self.val_batch_size, self.seed + VAL_CHUNK_SEED, False)

    @property
    def extra_batches(self) -> int:
        """Engine batches after the inner steps': the system's and the mixed term's (none when it cuts its own)."""
        if self.batch_size:
            return 0
        return (self.v_steps if self.solver == "gd" else 1) + 1

    def check(self, ctx: CheckContext) -> None:
        if self.solver == "gd":
            needs_lr(ctx.inner_opt, self.v_lr, 0.0)

    # CarriesState: ``{}`` (reset_inner) drops u, which belongs to the old weights; the samplers go on.
    def state_dict(self) -> dict[str, Any]:
        return {"u": self.u, "train": self.train_side.state_dict(), "val": self.val_side.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.u = state.get("u")
        self.train_side.load_state_dict(state.get("train", {}), memory=False)
        self.val_side.load_state_dict(state.get("val", {}), memory=False)

    def _batches(self, st: OuterStep) -> tuple[list[tuple], list[tuple]]:
        """The inner steps' minibatches and the system's plus the mixed term's."""
        if not self.batch_size:
            return list(st.train), list(st.extra)
        pool, dim = st.train[0], st.task.batch_dim  # the whole split, inner_steps times
        train = [self.train_side.draw(b, dim)[0] for b in st.train]
        extra = [self.train_side.draw(pool, dim)[0] for _ in range((self.v_steps if self.solver == "gd" else 1) + 1)]
        return train, extra

    def __call__(self, st: OuterStep) -> OuterResult:
        task = st.task
        train, extra = self._batches(st)
        inner, loss, gnorm = train_inner(task, st.inner_opt, st.inner, st.raw, train, None, st.on_step, st.step)
        w, raw = tree.detached(inner.params), tree.detached(st.raw)
        vbatch = self.val_side.draw(st.val, task.batch_dim)[0]
        aw, alam, lv = val_gradients(lambda w_, lam: task.val_loss(w_, lam, vbatch), w, raw)
        b = tree.flatten(aw.values())
        u = self.u if self.u is not None and self.u.shape == b.shape else torch.zeros_like(b)

        def product(batch: tuple) -> Callable[[Tensor], Tensor]:
            hv = hvp(lambda w_, lam: task.train_loss(w_, lam, batch), w, raw)
            return lambda x: tree.flatten(hv(tree.unflatten(x, w)).values()).detach()

        if self.solver == "gd":
            eta = step_lr(st.inner_opt, self.v_lr)[1]
            for batch in extra[:-1]:
                u = u - eta * (product(batch)(u) - b)
        else:
            u = cg_steps(product(extra[0]), b, u, self.v_steps)
        self.u = u.detach()
        last = extra[-1]
        _, hu, cu, _ = train_products(lambda w_, lam: task.train_loss(w_, lam, last), w, raw, tree.unflatten(self.u, w))
        hypergrad = {k: (alam[k] - cu[k]).detach() for k in alam}
        residual = torch.linalg.vector_norm(tree.flatten(hu.values()) - b) / torch.linalg.vector_norm(b).clamp_min(
            torch.finfo(b.dtype).tiny
        )
        res_, lv_, hnorm, unorm = torch.stack(
            [residual, lv.detach(), tree.norm(hypergrad), torch.linalg.vector_norm(self.u)]
        ).tolist()
        return OuterResult(
            hypergrad,
            inner,
            {
                **inner_scalars(loss, gnorm),
                "hypergrad/norm": hnorm,
                "solver/residual": res_,  # ‖H u − ∇_w L_V‖/‖∇_w L_V‖ on the mixed term's fresh minibatch
                "solver/iterations": float(self.v_steps),
                "solver/v_norm": unorm,
                "solver/val_loss": lv_,
            },
        )


def amigo(
    ctx: BuildContext,
    *,
    solver: Literal["gd", "cg"] = "gd",
    v_steps: PositiveInt = 10,
    batch_size: NonNegInt = 64,
    val_batch_size: NonNegInt = 64,
    v_lr: PositiveFloat | None = None,
    name: str = "amigo",
) -> AmIGO:
    """``method=amigo``: AmIGO-GD or AmIGO-CG (module doc); ``v_lr`` null takes optim/inner's lr (gd)."""
    return AmIGO(solver, v_steps, batch_size, val_batch_size, v_lr, seed=ctx.seed, name=name)
