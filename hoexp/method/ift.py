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

The same hypergradient as one pure function (:func:`ift_tensors`: ``torch.func`` products of
:mod:`hoexp.method.functional`, the solvers' ``solve_tensors``, no host sync) is what
:class:`CompiledIFT` hands to ``torch.compile``. Both return their figures through one
:class:`~hoexp.method.solvers.SolveResult` and one :func:`ift_stats`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from hoexp import tree
from hoexp.method.compiling import quiet_compile
from hoexp.method.curvature import CURVATURES, Curvature, Hessian, HessianOperator, SplitLoss
from hoexp.method.functional import FunctionalOperator, Product, linearized_ggn
from hoexp.method.products import ProductMode, product_mode
from hoexp.method.solvers import Damped, Exact, Solver, SolveResult

__all__ = ["CompiledIFT", "HessianOperator", "IFTStats", "ift_hypergradient", "ift_tensors", "validation_gradient"]

LossFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]
Params = dict[str, Tensor]


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


def ift_stats(result: SolveResult, host: Tensor, hvps: int, train_grad: Tensor | None = None) -> IFTStats:
    """:class:`IFTStats` of a solve (host or tensor figures) and ``host = [L_T, L_V, ‖∂L_T/∂w‖(, ‖x0‖)]``, all
    read in one host sync (``‖x0‖``: a warm start's norm, logged as ``solver/warm_norm``)."""
    res, values = result.read(host)
    train_value, val_value, grad_norm, *warm = values
    extra = {**res.extra, **({"solver/warm_norm": warm[0]} if warm else {})}
    residual = None if res.residual is None else float(res.residual)
    x = res.x.detach()
    return IFTStats(
        train_value, val_value, grad_norm, residual, int(res.iterations), hvps, res.info, x, train_grad, extra
    )


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
    hvp: str | ProductMode = "rev_rev",
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

    ``hvp`` (Hessian curvature only): the product mode (:mod:`hoexp.method.products`), or its spelling:
    ``"rev_rev"`` differentiates the kept ``create_graph`` gradient for every product; ``"fwd_rev"`` runs
    :func:`~hoexp.method.functional.hvp_fwd_rev` (``jvp`` of ``grad``, no kept graph) instead; ``"auto"`` times
    both here once (its ratio in ``stats.extra``). ``method=exact`` (an :class:`Exact` solver) forms the dense
    Hessian from batched products either way.
    """
    if mixed not in ("auto", "merged", "separate"):
        raise ValueError(f"mixed must be 'auto', 'merged' or 'separate', got {mixed!r}")
    w = tree.detached(params, requires_grad=True)
    lam = tree.detached(hparams, requires_grad=True)
    w_list, lam_list = list(w.values()), list(lam.values())
    mode, timed = product_mode(hvp).resolve(train_loss, w, lam)
    lv, v, direct = validation_gradient(val_loss, w, lam)

    lt = train_loss(w, lam)
    g = torch.autograd.grad(lt, w_list, create_graph=True, allow_unused=True)
    g_flat = tree.flatten(tree.fill_none(g, w_list))
    merge = g_flat.requires_grad and (mixed == "merged" or (mixed == "auto" and mixed_term_is_deep(g_flat, lam_list)))
    mixed_inputs = lam_list if merge else None
    if getattr(curvature, "uses_product_mode", False):  # the Hessian's products are the product mode's
        op = mode.operator(train_loss, w, lam, g_flat, mixed_inputs, dense=isinstance(solver, Exact))
    else:
        op = curvature.operator(train_loss, w, lam, g_flat, mixed_inputs)
    if damping:
        op = Damped(op, damping)
    if x0 is not None and (x0.shape != v.shape or x0.dtype != v.dtype):
        x0 = None  # carried from another model: start from zero
    result = solver(op, v) if x0 is None else solver(op, v, x0.to(v.device))

    mixed_terms = _mixed_terms(result, g_flat, lam)
    hypergrad = {k: (d - m).detach() for k, d, m in zip(lam.keys(), direct, mixed_terms)}
    host = [lt.detach(), lv.detach(), torch.linalg.vector_norm(g_flat.detach()).to(lt.dtype)]
    if x0 is not None:
        host.append(torch.linalg.vector_norm(x0).to(device=lt.device, dtype=lt.dtype))
    stats = ift_stats(result, torch.stack(host), op.hvps, train_grad=g_flat.detach())
    stats.extra.update(timed)
    return hypergrad, stats


def _mixed_terms(result: SolveResult, g_flat: Tensor, lam: dict[str, Tensor]) -> list[Tensor]:
    """``(∂²L_T/∂λ∂w) u`` per hyperparameter: from the solve (a merged mixed map), else one VJP through ``g_flat``."""
    lam_list = list(lam.values())
    if result.mixed is not None:
        return list(tree.unflatten(result.mixed.detach(), lam).values())
    if g_flat.requires_grad and lam_list:
        return tree.fill_none(torch.autograd.grad(g_flat, lam_list, result.x.detach(), allow_unused=True), lam_list)
    return [torch.zeros_like(x) for x in lam_list]


def ift_tensors(
    train_loss: LossFn,
    val_loss: LossFn,
    solver: Solver,
    w: Params,
    lam: Params,
    x0: Tensor | None = None,
    *,
    curvature: str = "hessian",
    hvp: str | ProductMode = "fwd_rev",
    damping: float = 0.0,
    chunk: int = 256,
) -> tuple[Params, SolveResult, Tensor]:
    """The IFT hypergradient ``∂L_V/∂λ − (∂²L_T/∂λ∂w) u``, ``C u = ∂L_V/∂w``, as one pure function.

    No host sync and no autograd state crosses the call, so ``torch.compile`` can take it whole.
    Returns the hypergradient, the solve (tensors) and ``[L_T, L_V, ‖∂L_T/∂w‖]`` (one tensor).
    ``solver``: Neumann, fixed point, CG or exact (``solve_tensors``); ``x0`` a warm start; ``hvp``: the Hessian's
    product mode (:meth:`~hoexp.method.products.ProductMode.linearize`; ``auto`` once it has chosen).
    """
    (gv_w, gv_lam), lv = grad_and_value(val_loss, argnums=(0, 1))(w, lam)
    b = tree.flatten(gv_w.values())
    mixed_of: Callable[[Params], Params] | None = None
    if curvature == "gauss_newton":
        if not isinstance(train_loss, SplitLoss):
            raise TypeError(
                "curvature=gauss_newton needs the training loss as a SplitLoss(outputs, output_loss, "
                "penalty) (hoexp.method.curvature)"
            )
        g, lt, gv = linearized_ggn(train_loss, w, lam)
        product: Product = lambda _w, _lam, v: gv(v)  # noqa: E731
    else:
        g, lt, product, mixed_of = product_mode(hvp).linearize(train_loss, w, lam)
    op = FunctionalOperator(product, w, lam, damping, chunk)
    sol = solver.solve_tensors(op, b, x0)  # type: ignore[attr-defined]
    u = tree.unflatten(sol.x, w)
    # mixed term (∂g/∂λ)ᵀu: from the linearization's pullback, else one vjp through the gradient
    mixed = mixed_of(u) if mixed_of is not None else vjp(lambda lam_: grad(train_loss)(w, lam_), lam)[1](u)[0]
    hg = {k: gv_lam[k] - mixed[k] for k in lam}
    g_norm = torch.linalg.vector_norm(tree.flatten(g.values()))
    return hg, sol, torch.stack([lt.detach(), lv.detach(), g_norm.to(lt.dtype)])


@dataclass
class CompiledIFT:
    """:func:`ift_tensors` through ``torch.compile`` for losses ``train_loss(w, λ, *train_args)`` and
    ``val_loss(w, λ, *val_args)`` (the batches travel as arguments, so one compiled graph serves every
    outer step: new batches of the same shapes do not recompile).

    ``split(*train_args)`` gives the training loss as a :class:`SplitLoss` (needed for
    ``curvature=gauss_newton``). The first call compiles (seconds; minutes for an LSTM) and is
    checked against the eager reverse-over-reverse IFT (:func:`hoexp.method.ift.ift_hypergradient`):
    relative error above ``rtol``, a compile error or an operation without a forward-mode or batching
    rule switch this object to the eager path for good (``fallback`` holds the reason, ``stats.info``
    shows it). ``compile=False`` runs :func:`ift_tensors` eagerly (the reference the tests use).
    """

    solver: Solver
    train_loss: Callable[..., Tensor]
    val_loss: Callable[..., Tensor]
    split: Callable[..., SplitLoss] | None = None
    curvature: str = "hessian"
    hvp: str | ProductMode = "fwd_rev"
    damping: float = 0.0
    compile: bool = True
    verify: bool = True
    rtol: float = 1e-4
    fallback: str | None = None
    checked: bool = False
    _fns: dict[bool, Callable[..., Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.hvp = product_mode(self.hvp)  # made here, not inside the compiled function

    def _pure(
        self, w: Params, lam: Params, x0: Tensor | None, train_args: tuple, val_args: tuple
    ) -> tuple[Params, SolveResult, Tensor]:
        assert self.split is not None or self.curvature != "gauss_newton", "curvature=gauss_newton needs split"
        return ift_tensors(
            self._train(train_args, self.curvature == "gauss_newton"),
            lambda w_, lam_: self.val_loss(w_, lam_, *val_args),
            self.solver,
            w,
            lam,
            x0,
            curvature=self.curvature,
            hvp=self.hvp,
            damping=self.damping,
        )

    def _train(self, train_args: tuple, split: bool) -> Any:
        """The training loss on ``train_args``: ``split(*train_args)`` (a :class:`SplitLoss`) when ``split`` and
        there is one, else ``train_loss`` closed over them."""
        if split and self.split is not None:
            return self.split(*train_args)
        return lambda w_, lam_: self.train_loss(w_, lam_, *train_args)

    def _fn(self) -> Callable[..., Any]:
        fn = self._fns.get(self.compile)
        if fn is None:
            fn = self._fns[self.compile] = torch.compile(self._pure, dynamic=False) if self.compile else self._pure
        return fn

    def eager_reference(
        self, w: Params, lam: Params, x0: Tensor | None, train_args: tuple, val_args: tuple
    ) -> tuple[Params, Any]:
        return ift_hypergradient(
            self._train(train_args, True),
            lambda w_, lam_: self.val_loss(w_, lam_, *val_args),
            w,
            lam,
            self.solver,
            curvature=CURVATURES[self.curvature],
            damping=self.damping,
            x0=x0,
        )

    def __call__(
        self,
        params: Mapping[str, Tensor],
        hparams: Mapping[str, Tensor],
        x0: Tensor | None = None,
        train_args: tuple = (),
        val_args: tuple = (),
    ) -> tuple[Params, Any]:
        w, lam = tree.detached(params), tree.detached(hparams)
        if self.fallback is None and not hasattr(self.solver, "solve_tensors"):  # no host-sync-free form
            self.fallback = f"solver {self.solver.name} with alpha=auto has no compiled form"
        if self.fallback is not None:
            hg, stats = self.eager_reference(w, lam, x0, train_args, val_args)
            stats.info = f"{stats.info}; eager: {self.fallback}" if stats.info else f"eager: {self.fallback}"
            return hg, stats
        if x0 is not None and (x0.shape != (tree.numel(w),) or x0.dtype != next(iter(w.values())).dtype):
            x0 = None
        try:
            with quiet_compile() if self.compile and not self.checked else contextlib.nullcontext():  # first call
                hg, sol, host = self._fn()(w, lam, x0, train_args, val_args)
        except Exception as e:  # a compile error, no jvp / vmap rule for an operation, ...
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.fallback = (
                f"{'compiled' if self.compile else 'functional'} path failed ({type(e).__name__}: {msg[:200]})"
            )
            return self(params, hparams, x0, train_args, val_args)
        if not self.checked and self.verify:
            self.checked = True
            ref, _ = self.eager_reference(w, lam, x0, train_args, val_args)
            err = float(tree.norm({k: hg[k] - ref[k] for k in ref})) / max(float(tree.norm(ref)), 1e-30)
            if not err <= self.rtol:
                self.fallback = f"the compiled hypergradient disagreed with the eager one (relative error {err:.1e})"
                return self(params, hparams, x0, train_args, val_args)
        if isinstance(self.solver, Exact) and int(sol.reason) == 3:  # singular: lstsq
            return self.eager_reference(w, lam, x0, train_args, val_args)
        return hg, ift_stats(sol, host, sol.hvps)
