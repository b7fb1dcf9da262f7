"""Implicit-differentiation (IFT) hypergradients with a pluggable linear solver.

At a stationary point ``∂L_T/∂w = 0`` the implicit function theorem gives
``dw*/dλ = −H⁻¹ ∂²L_T/∂w∂λ`` with ``H = ∂²L_T/∂w²``, so

    dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂w) u,     H u = ∂L_V/∂w.

Cost: one gradient of ``L_V``, one gradient of ``L_T`` with ``create_graph`` (kept and reused by
every Hessian-vector product of the solve: reverse-over-reverse), the solver's HVPs, and one
vector-Jacobian product for the mixed term.

The mixed term can also ride along with the solve's HVPs (``mixed="merged"``): each HVP's backward
pass then computes ``(∂²L_T/∂λ∂w) v`` as well, and solvers whose answer is a linear combination
of vectors they multiply by ``H`` (CG; Neumann and fixed-point with their residual) return the
mixed term of the answer with no pass of its own, but every HVP then also differentiates with
respect to ``λ``. ``mixed="auto"`` merges when ``λ`` acts deep inside the model
(:func:`mixed_term_is_deep`: dropout masks, where the separate pass costs about one HVP). Measured
on the PTB LSTM preset (CPU, Neumann K=5 with residual) merging did not pay: 1,443 against 1,391 ms
per hypergradient, the extra work in six HVPs costing as much as the pass it saves; so the default
is ``"separate"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from hoexp import tree
from hoexp.method.solvers import Solver

LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]


class HessianOperator:
    """``v ↦ H v`` for ``H = ∂²L/∂w²``, from one differentiable gradient ``g = ∂L/∂w``.

    Each matvec is one backward pass through the graph of ``g`` (``retain_graph``), so the
    forward and first backward pass are paid once per solve, not once per HVP.

    With ``mixed_inputs`` (the hyperparameter leaves) it also offers :meth:`matvec_mixed`, which
    returns ``(H v, M v)`` with ``M v = (∂g/∂λ)ᵀ v`` flattened, from the same backward pass.
    """

    def __init__(self, grad_flat: Tensor, params: list[Tensor], mixed_inputs: list[Tensor] | None = None):
        self.grad_flat = grad_flat
        self.params = params
        self.n = grad_flat.numel()
        self.hvps = 0
        self.mixed_inputs = list(mixed_inputs or [])
        self.tracks_mixed = bool(self.mixed_inputs)

    def matvec(self, v: Tensor) -> Tensor:
        self.hvps += 1
        if not self.grad_flat.requires_grad:  # the loss is linear in w: zero curvature
            return torch.zeros_like(v)
        hv = torch.autograd.grad(self.grad_flat, self.params, v, retain_graph=True, allow_unused=True)
        return tree.flatten(tree.fill_none(hv, self.params))

    def matvec_mixed(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(H v, M v)`` from one backward pass (``M v`` flat, ordered like ``mixed_inputs``)."""
        self.hvps += 1
        inputs = self.params + self.mixed_inputs
        if not self.grad_flat.requires_grad:
            out = [torch.zeros_like(x) for x in inputs]
        else:
            out = tree.fill_none(torch.autograd.grad(self.grad_flat, inputs, v, retain_graph=True,
                                                     allow_unused=True), inputs)
        k = len(self.params)
        return tree.flatten(out[:k]), tree.flatten(out[k:])

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


# Autograd nodes whose backward is a matrix product or a reduction over a large axis: where the
# time of a backward pass goes.
_HEAVY_NODES = ("Mm", "Addmm", "Bmm", "Baddbmm", "Matmul", "Linear", "Convolution", "Conv", "Cudnn", "Mkldnn",
                "LogSoftmax", "Softmax", "Embedding", "Lstm", "Rnn", "Gru")


def mixed_term_is_deep(grad_flat: Tensor, hparams: list[Tensor]) -> bool:
    """Whether most of the expensive nodes of ``grad_flat``'s graph lie on paths to ``hparams``.

    Then the separate mixed-term pass ``(∂g/∂λ)ᵀu`` costs about as much as an HVP, while adding
    ``λ`` to the solve's HVPs costs next to nothing (dropout masks). Weight decay enters ``g`` as
    ``λ ⊙ w``: no matrix product leads to ``λ``, and the separate pass is cheap. A walk over the
    graph's nodes (microseconds each; no tensor is touched).
    """
    root = grad_flat.grad_fn
    if root is None or not hparams:
        return False
    targets = {id(t) for t in hparams}
    reach: dict[Any, bool] = {}  # node → whether a path from it leads to a hyperparameter
    heavy = heavy_on_path = 0
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:  # iterative post-order DFS: every node once, its children before it
        node, expanded = stack.pop()
        if expanded:
            name = type(node).__name__
            leads = name == "AccumulateGrad" and id(node.variable) in targets
            if not leads:
                leads = any(c is not None and reach[c] for c, _ in node.next_functions)
            reach[node] = leads
            if name.startswith(_HEAVY_NODES):
                heavy += 1
                heavy_on_path += leads
            continue
        if node in reach:
            continue
        reach[node] = False  # provisional (the graph is acyclic, so no child can read it)
        stack.append((node, True))
        stack.extend((c, False) for c, _ in node.next_functions if c is not None and c not in reach)
    return heavy > 0 and 2 * heavy_on_path > heavy


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
    *,
    mixed: str = "separate",
) -> tuple[dict[str, Tensor], IFTStats]:
    """``dL_V/dλ`` at ``params`` (taken as the inner optimum) by the implicit function theorem.

    ``train_loss(params, hparams)`` and ``val_loss(params, hparams)`` return scalars. Inputs are
    not modified; the result is detached and shaped like ``hparams``. ``mixed``: how the mixed
    term is computed, ``"separate"`` (one VJP after the solve), ``"merged"`` (with the solve's HVPs
    where the solver allows it, else separately) or ``"auto"`` (merged when
    :func:`mixed_term_is_deep`); the answer is the same up to rounding.
    """
    if mixed not in ("auto", "merged", "separate"):
        raise ValueError(f"mixed must be 'auto', 'merged' or 'separate', got {mixed!r}")
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
    merge = g_flat.requires_grad and (mixed == "merged"
                                      or (mixed == "auto" and mixed_term_is_deep(g_flat, lam_list)))
    op = HessianOperator(g_flat, w_list, lam_list if merge else None)
    result = solver(op, v)

    if result.mixed is not None:
        mixed_terms = list(tree.unflatten(result.mixed.detach(), lam).values())
    elif g_flat.requires_grad and lam_list:
        mixed_terms = tree.fill_none(torch.autograd.grad(g_flat, lam_list, result.x.detach(), allow_unused=True),
                                     lam_list)
    else:
        mixed_terms = [torch.zeros_like(x) for x in lam_list]
    hypergrad = {k: (d - m).detach() for k, d, m in zip(lam.keys(), direct, mixed_terms)}
    train_value, val_value, grad_norm = torch.stack(  # one host sync for the three numbers
        [lt.detach(), lv.detach(), torch.linalg.vector_norm(g_flat.detach()).to(lt.dtype)]).tolist()
    stats = IFTStats(
        train_loss=train_value,
        val_loss=val_value,
        inner_grad_norm=grad_norm,
        residual=result.residual,
        iterations=result.iterations,
        hvps=op.hvps,
        info=result.info,
    )
    return hypergrad, stats
