"""A first-order hypergradient (``method=fd``): finite differences of gradients instead of second derivatives.

The IFT hypergradient with ``H⁻¹ ≈ αI`` (T1-T2; DARTS's one-step approximation, Liu et al. 2019) is

    dL_V/dλ ≈ ∂L_V/∂λ − (∂²L_T/∂λ∂w) u,    u = α ∂L_V/∂w,

and its mixed term is a directional derivative of ``∇_λ L_T`` along ``u``, taken here by central
differences (DARTS; SAMA, Choe et al. 2023, uses the same first-order mixed term):

    (∂²L_T/∂λ∂w) u ≈ [∇_λ L_T(w + εu, λ) − ∇_λ L_T(w − εu, λ)] / 2ε,    ε = eps / ‖u‖,

so ``w ± εu`` lies ``eps`` away from ``w``. Cost: one validation gradient and two gradients of ``L_T``
(no double backward): it runs wherever a gradient does (data-parallel runs, ``compile=true`` inner
steps, mixed-precision inner steps). The truncation error is ``O(ε²)`` (zero where ``∇_λ L_T`` is
quadratic in ``w``, as for weight decay ``½λw²``), the rounding error ``O(δ/ε)`` for a machine
epsilon ``δ``; ``eps = 0.01`` balances them in float32.

``terms = K > 0`` replaces ``αI`` by the Neumann series ``α Σ_{j≤K} (I − αH)^j`` whose Hessian-vector
products are central differences of ``∇_w L_T`` as well (:class:`FiniteDifferenceHessian`, two
gradients each), a first-order Neumann IFT.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hoexp import tree
from hoexp.components import NonNegInt, PositiveFloat
from hoexp.method.base import gradients, scalars, train_inner
from hoexp.method.ift import LossFn, validation_gradient
from hoexp.method.solvers import Neumann
from hoexp.types import OuterResult, OuterStep


def _grads(loss: LossFn, w: Mapping[str, Tensor], lam: Mapping[str, Tensor], wrt: str) -> Tensor:
    """The flat gradient of ``loss(w, lam)`` with respect to ``w`` (``wrt="w"``) or ``lam``."""
    w_ = tree.detached(w, requires_grad=wrt == "w")
    lam_ = tree.detached(lam, requires_grad=wrt == "lam")
    inputs = list((w_ if wrt == "w" else lam_).values())
    return tree.flatten(gradients(loss(w_, lam_), inputs))


def _central(
    loss: LossFn, w: Mapping[str, Tensor], lam: Mapping[str, Tensor], u: Tensor, eps: float, wrt: str
) -> Tensor:
    """``[∇ L(w + εu) − ∇ L(w − εu)] / 2ε`` (flat, the gradient with respect to ``wrt``), ``ε = eps/‖u‖`` a 0-d tensor
    (no host sync; ``u = 0`` gives a finite step and a zero difference). Two gradients."""
    h = eps / torch.linalg.vector_norm(u).clamp_min(torch.finfo(u.dtype).tiny)
    flat = tree.flatten(w.values()).detach()
    plus = _grads(loss, tree.unflatten(flat + h * u, w), lam, wrt)
    minus = _grads(loss, tree.unflatten(flat - h * u, w), lam, wrt)
    return (plus - minus) / (2 * h)


class FiniteDifferenceHessian:
    """``v ↦ H v ≈ [∇_w L_T(w + εv) − ∇_w L_T(w − εv)] / 2ε`` with ``ε = eps/‖v‖`` (two gradients)."""

    def __init__(self, train_loss: LossFn, w: Mapping[str, Tensor], lam: Mapping[str, Tensor], eps: float):
        self.train_loss, self.w, self.lam, self.eps = train_loss, w, lam, eps
        self.n = tree.numel(w)
        self.hvps = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.hvps += 1
        return _central(self.train_loss, self.w, self.lam, v, self.eps, "w")

    def dense(self) -> Tensor:
        raise NotImplementedError("a finite-difference Hessian has no dense form here")


@dataclass
class FDStats:
    val_loss: float
    step: float  # ε·‖u‖ = eps: how far w ± εu lies from w
    u_norm: float
    hvps: int  # finite-difference Hessian-vector products (terms > 0), two gradients each


def fd_hypergradient(
    train_loss: LossFn,
    val_loss: LossFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    alpha: float = 0.01,
    eps: float = 0.01,
    terms: int = 0,
) -> tuple[dict[str, Tensor], FDStats]:
    """``∂L_V/∂λ − (∂²L_T/∂λ∂w) u`` with ``u = α Σ_{j≤terms} (I − αH)^j ∂L_V/∂w`` and every second
    derivative a central difference (see the module doc). Inputs are not modified; detached result."""
    w = tree.detached(params, requires_grad=True)
    lam = tree.detached(hparams, requires_grad=True)
    lv, v, direct = validation_gradient(val_loss, w, lam)
    hvps = 0
    if terms:
        op = FiniteDifferenceHessian(train_loss, params, hparams, eps)
        u = Neumann(terms, alpha, residual=False)(op, v).x
        hvps = op.hvps
    else:
        u = alpha * v
    mixed = tree.unflatten(_central(train_loss, params, hparams, u, eps, "lam"), hparams)
    hypergrad = {k: (d - mixed[k]).detach() for k, d in zip(lam.keys(), direct)}
    val_value, u_norm = torch.stack([lv.detach(), torch.linalg.vector_norm(u).to(lv.dtype)]).tolist()
    return hypergrad, FDStats(val_value, eps, u_norm, hvps)


@dataclass
class FiniteDifferenceMethod:
    """``method=fd``: train ``inner_steps`` plain steps, then :func:`fd_hypergradient` at the reached weights
    (mixed term on the next training batch, validation gradient on ``val_batch``, as the IFT methods)."""

    alpha: PositiveFloat = 0.01  # H⁻¹ ≈ αI (DARTS's ξ)
    eps: PositiveFloat = 0.01  # w ± εu with ε = eps/‖u‖: the perturbation's length
    terms: NonNegInt = 0  # > 0: Neumann terms with finite-difference Hessian-vector products (two gradients each)
    name: str = "fd"

    extra_batches: ClassVar[int] = 1  # the mixed term's batch, drawn after the inner steps' (as the IFT methods)
    needs_stationary_point: ClassVar[bool] = True  # the IFT's approximation: refused for lr / momentum
    differentiates_steps: ClassVar[bool] = False  # plain inner steps: compile=true and mixed precision apply
    needs_pathwise_hp: ClassVar[bool] = True  # the mixed term differences ∇_λ L_T: a derivative of L_T in λ
    refuses_data_parallel: ClassVar[str] = ""

    def __call__(self, st: OuterStep) -> OuterResult:
        problem, batch, val_batch = st.task, st.extra[0], st.val
        state, loss, gnorm = train_inner(problem, st.inner_opt, st.inner, st.raw, st.train, None, st.on_step, st.step)
        hg, s = fd_hypergradient(
            lambda w, lam: problem.train_loss(w, lam, batch),
            lambda w, lam: problem.val_loss(w, lam, val_batch),
            state.params,
            st.raw,
            alpha=self.alpha,
            eps=self.eps,
            terms=self.terms,
        )
        return OuterResult(
            hg,
            state,
            scalars(
                **{
                    "inner/grad_norm": gnorm,
                    "inner/loss": loss,
                    "hypergrad/norm": tree.norm(hg),
                    "solver/iterations": self.terms,
                    "solver/hvps": s.hvps,
                    "fd/u_norm": s.u_norm,
                }
            ),
        )
