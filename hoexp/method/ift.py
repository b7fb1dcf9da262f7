"""Implicit-differentiation (IFT) hypergradients with a pluggable linear solver.

At a stationary point ``∂L_T/∂w = 0`` the implicit function theorem gives
``dw*/dλ = −H⁻¹ ∂²L_T/∂w∂λ`` with ``H = ∂²L_T/∂w²``, so

    dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂w) u,     H u = ∂L_V/∂w.

Cost: one gradient of ``L_V``, one gradient of ``L_T`` with ``create_graph`` (kept and reused by
every Hessian-vector product of the solve: reverse-over-reverse), the solver's HVPs, and one
vector-Jacobian product for the mixed term.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from hoexp import tree
from hoexp.method.solvers import Solver

LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]


class HessianOperator:
    """``v ↦ H v`` for ``H = ∂²L/∂w²``, from one differentiable gradient ``g = ∂L/∂w``.

    Each matvec is one backward pass through the graph of ``g`` (``retain_graph``), so the
    forward and first backward pass are paid once per solve, not once per HVP.
    """

    def __init__(self, grad_flat: Tensor, params: list[Tensor]):
        self.grad_flat = grad_flat
        self.params = params
        self.n = grad_flat.numel()
        self.hvps = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.hvps += 1
        if not self.grad_flat.requires_grad:  # the loss is linear in w: zero curvature
            return torch.zeros_like(v)
        hv = torch.autograd.grad(self.grad_flat, self.params, v, retain_graph=True, allow_unused=True)
        return tree.flatten(tree.fill_none(hv, self.params))

    def dense(self, chunk: int = 512) -> Tensor:
        """The full ``n×n`` Hessian, ``chunk`` rows at a time through batched HVPs."""
        rows = []
        eye = torch.eye(self.n, dtype=self.grad_flat.dtype, device=self.grad_flat.device)
        for start in range(0, self.n, chunk):
            basis = eye[start:start + chunk]
            try:
                cols = torch.autograd.grad(self.grad_flat, self.params, basis, retain_graph=True,
                                           allow_unused=True, is_grads_batched=True)
                cols = [torch.zeros(len(basis), *p.shape, dtype=p.dtype, device=p.device) if c is None else c
                        for c, p in zip(cols, self.params)]
                rows.append(torch.cat([c.reshape(len(basis), -1) for c in cols], dim=1))
            except RuntimeError:  # an op without a batching rule: fall back to one HVP per row
                rows.append(torch.stack([self.matvec(e) for e in basis]))
        self.hvps += self.n
        return torch.cat(rows, dim=0)


@dataclass
class IFTStats:
    """What one IFT hypergradient measured (all floats are on the host)."""

    train_loss: float
    val_loss: float
    inner_grad_norm: float  # ‖∂L_T/∂w‖: IFT assumes 0; large values mean the inner loop has not converged
    residual: float | None  # ‖H u − ∂L_V/∂w‖ / ‖∂L_V/∂w‖
    iterations: int
    hvps: int
    info: str


def ift_hypergradient(
    train_loss: LossFn,
    val_loss: LossFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    solver: Solver,
) -> tuple[dict[str, Tensor], IFTStats]:
    """``dL_V/dλ`` at ``params`` (taken as the inner optimum) by the implicit function theorem.

    ``train_loss(params, hparams)`` and ``val_loss(params, hparams)`` return scalars. Inputs are
    not modified; the result is detached and shaped like ``hparams``.
    """
    w = tree.detached(params, requires_grad=True)
    lam = tree.detached(hparams, requires_grad=True)
    w_list, lam_list = list(w.values()), list(lam.values())

    lv = val_loss(w, lam)
    grads_v = torch.autograd.grad(lv, w_list + lam_list, allow_unused=True)
    v = tree.flatten(tree.fill_none(grads_v[: len(w_list)], w_list)).detach()
    direct = tree.fill_none(grads_v[len(w_list):], lam_list)

    lt = train_loss(w, lam)
    g = torch.autograd.grad(lt, w_list, create_graph=True, allow_unused=True)
    g_flat = tree.flatten(tree.fill_none(g, w_list))
    op = HessianOperator(g_flat, w_list)
    result = solver(op, v)

    if g_flat.requires_grad and lam_list:
        mixed = torch.autograd.grad(g_flat, lam_list, result.x.detach(), allow_unused=True)
        mixed = tree.fill_none(mixed, lam_list)
    else:
        mixed = [torch.zeros_like(x) for x in lam_list]
    hypergrad = {k: (d - m).detach() for k, d, m in zip(lam.keys(), direct, mixed)}
    stats = IFTStats(
        train_loss=float(lt.detach()),
        val_loss=float(lv.detach()),
        inner_grad_norm=float(torch.linalg.vector_norm(g_flat.detach())),
        residual=result.residual,
        iterations=result.iterations,
        hvps=op.hvps,
        info=result.info,
    )
    return hypergrad, stats
