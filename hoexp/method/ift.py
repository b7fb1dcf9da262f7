"""Implicit-differentiation (IFT) hypergradients with a pluggable linear solver.

At a stationary point ``∂L_T/∂w = 0`` the implicit function theorem gives
``dw*/dλ = −H⁻¹ ∂²L_T/∂w∂λ`` with ``H = ∂²L_T/∂w²``, so

    dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂w) u,     H u = ∂L_V/∂w.

Cost: one gradient of ``L_V``, one gradient of ``L_T`` with ``create_graph`` (kept and reused by
every Hessian-vector product of the solve: reverse-over-reverse), the solver's HVPs, and one
vector-Jacobian product for the mixed term.

Long horizons (``hoexp.method.curvature``, ``hoexp.method.solvers``): the operator can be the
Gauss-Newton matrix ``G`` instead of ``H`` (PSD where ``H`` is indefinite: the hypergradient is then
``∂L_V/∂λ − (∂²L_T/∂λ∂w) u`` with ``G u = ∂L_V/∂w``), damped (``C + μI``), and the solve can start
from the previous outer step's ``u`` (warm start), so the iterations add up over training.

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hoexp import tree
from hoexp.method.curvature import Curvature, Hessian, HessianOperator  # noqa: F401 (HessianOperator: re-exported)
from hoexp.method.solvers import Damped, Exact, Solver

LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]


# Autograd nodes whose backward is a matrix product or a reduction over a large axis: where the
# time of a backward pass goes.
_HEAVY_NODES = (
    "Mm",
    "Addmm",
    "Bmm",
    "Baddbmm",
    "Matmul",
    "Linear",
    "Convolution",
    "Conv",
    "Cudnn",
    "Mkldnn",
    "LogSoftmax",
    "Softmax",
    "Embedding",
    "Lstm",
    "Rnn",
    "Gru",
)


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
    solution: Tensor | None = None  # the solve's u (flat, detached): what a warm start carries to the next step
    train_grad: Tensor | None = None  # ∂L_T/∂w at the point (flat, detached): a fused inner step's gradient
    extra: dict[str, float] = field(default_factory=dict)  # solver scalars to log (solver/alpha, solver/warm_norm)


def validation_gradient(
    val_loss: LossFn, w: dict[str, Tensor], lam: dict[str, Tensor]
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``L_V(w, λ)``, ``v = ∂L_V/∂w`` (flat, detached) and ``∂L_V/∂λ`` per hyperparameter (zeros where
    ``L_V`` does not use one), for leaves ``w``, ``λ`` that require grad. One backward pass."""
    w_list, lam_list = list(w.values()), list(lam.values())
    lv = val_loss(w, lam)
    grads_v = torch.autograd.grad(lv, w_list + lam_list, allow_unused=True)
    v = tree.flatten(tree.fill_none(grads_v[: len(w_list)], w_list)).detach()
    return lv, v, tree.fill_none(grads_v[len(w_list) :], lam_list)


def ift_hypergradient(
    train_loss: LossFn,
    val_loss: LossFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    solver: Solver,
    *,
    mixed: str = "separate",
    curvature: Curvature = Hessian(),
    damping: float = 0.0,
    x0: Tensor | None = None,
    hvp: str = "rev_rev",
) -> tuple[dict[str, Tensor], IFTStats]:
    """``dL_V/dλ`` at ``params`` (taken as the inner optimum) by the implicit function theorem.

    ``train_loss(params, hparams)`` and ``val_loss(params, hparams)`` return scalars. Inputs are
    not modified; the result is detached and shaped like ``hparams``. ``mixed``: how the mixed
    term is computed, ``"separate"`` (one VJP after the solve), ``"merged"`` (with the solve's HVPs
    where the solver allows it, else separately) or ``"auto"`` (merged when
    :func:`mixed_term_is_deep`); the answer is the same up to rounding.

    ``curvature``: the operator solved with, :class:`~hoexp.method.curvature.Hessian` (default) or
    :class:`~hoexp.method.curvature.GaussNewton` (``train_loss`` a ``SplitLoss``); ``damping`` ``μ ≥ 0``
    solves with ``C + μI`` instead; ``x0``: the solver's start (a warm start; ignored when its shape
    or dtype does not match ``∂L_V/∂w``'s). ``stats.solution`` is the solve's ``u``.

    ``hvp`` (Hessian curvature only): ``"rev_rev"`` differentiates the kept ``create_graph`` gradient
    for every product; ``"fwd_rev"`` runs :func:`~hoexp.method.functional.hvp_fwd_rev` (``jvp`` of
    ``grad``, no kept graph) instead. ``method=exact`` (an :class:`Exact` solver) forms the dense
    Hessian from batched products either way: ``vmap`` of the pure product over chunks of the
    identity (:class:`~hoexp.method.functional.FunctionalOperator`; with ``"rev_rev"`` the batched
    ``vjp`` of the gradient, measured 2.4× faster than batching the kept graph's backward).
    """
    if mixed not in ("auto", "merged", "separate"):
        raise ValueError(f"mixed must be 'auto', 'merged' or 'separate', got {mixed!r}")
    w = tree.detached(params, requires_grad=True)
    lam = tree.detached(hparams, requires_grad=True)
    w_list, lam_list = list(w.values()), list(lam.values())
    lv, v, direct = validation_gradient(val_loss, w, lam)

    lt = train_loss(w, lam)
    g = torch.autograd.grad(lt, w_list, create_graph=True, allow_unused=True)
    g_flat = tree.flatten(tree.fill_none(g, w_list))
    merge = g_flat.requires_grad and (mixed == "merged" or (mixed == "auto" and mixed_term_is_deep(g_flat, lam_list)))
    from hoexp.method.functional import FunctionalOperator, hvp_fwd_rev, linearized_hvp

    if curvature.name == "hessian" and (hvp == "fwd_rev" or isinstance(solver, Exact)):
        w0, lam0 = tree.detached(w), tree.detached(lam)
        if hvp == "fwd_rev":
            product: Any = lambda w_, lam_, u: hvp_fwd_rev(train_loss, w_, lam_, u)  # noqa: E731
        else:  # the batched vjp of the gradient, its forward and backward pass run once
            hv = linearized_hvp(train_loss, w0, lam0)[2]
            product = lambda w_, lam_, u: hv(u)  # noqa: E731
        op: Any = FunctionalOperator(product, w0, lam0)
    else:
        op = curvature.operator(train_loss, w, lam, g_flat, lam_list if merge else None)
    if damping:
        op = Damped(op, damping)
    if x0 is not None and (x0.shape != v.shape or x0.dtype != v.dtype):
        x0 = None  # carried from another model: start from zero
    result = solver(op, v) if x0 is None else solver(op, v, x0.to(v.device))

    if result.mixed is not None:
        mixed_terms = list(tree.unflatten(result.mixed.detach(), lam).values())
    elif g_flat.requires_grad and lam_list:
        mixed_terms = tree.fill_none(
            torch.autograd.grad(g_flat, lam_list, result.x.detach(), allow_unused=True), lam_list
        )
    else:
        mixed_terms = [torch.zeros_like(x) for x in lam_list]
    hypergrad = {k: (d - m).detach() for k, d, m in zip(lam.keys(), direct, mixed_terms)}
    host = [lt.detach(), lv.detach(), torch.linalg.vector_norm(g_flat.detach()).to(lt.dtype)]
    if x0 is not None:
        host.append(torch.linalg.vector_norm(x0).to(device=lt.device, dtype=lt.dtype))
    train_value, val_value, grad_norm, *warm = torch.stack(host).tolist()  # one host sync for these numbers
    extra = dict(result.extra)
    if warm:
        extra["solver/warm_norm"] = warm[0]
    stats = IFTStats(
        train_loss=train_value,
        val_loss=val_value,
        inner_grad_norm=grad_norm,
        residual=result.residual,
        iterations=result.iterations,
        hvps=op.hvps,
        info=result.info,
        solution=result.x.detach(),
        train_grad=g_flat.detach(),
        extra=extra,
    )
    return hypergrad, stats
