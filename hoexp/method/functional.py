"""Curvature products as pure functions (``torch.func``) and an IFT hypergradient ``torch.compile`` can take whole.

The eager operators of :mod:`hoexp.method.curvature` keep one ``create_graph`` gradient and
differentiate it again for every product (reverse-over-reverse). Here a product is a pure function
of ``(w, λ, v)`` with no autograd state crossing the call:

* :func:`hvp_fwd_rev`: ``H v = ∂/∂ε ∇_w L(w + εv, λ)``, forward-mode ``jvp`` of ``grad``;
* :func:`hvp_rev_rev`: ``H v = ∇_w ⟨∇_w L(w, λ), v⟩``, ``vjp`` of ``grad``;
* :func:`ggn_product`: ``G v = Jᵀ H_ℓ J v + ∇²r v`` for a :class:`~hoexp.method.curvature.SplitLoss`
  (``J v`` by ``jvp``, ``H_ℓ`` by ``jvp`` of the output loss's ``grad``, ``Jᵀ`` by ``vjp``);
* :func:`linearized_hvp` and :func:`linearized_ggn`: the same products for many ``v`` at one point, the
  forward (and backward) pass run once and its intermediates kept. A solve uses these: the products
  above recompute the pass every time, and ``torch.compile`` does not merge the K copies in a solve.

:class:`FunctionalOperator` wraps a product as a solver's :class:`LinearOperator`; its ``dense`` is
``vmap`` of the product over chunks of the identity's columns (``method=exact``).

:func:`ift_tensors` is the whole IFT hypergradient (validation gradient, solve, mixed term) as one
pure function with no host sync (the solvers' ``solve_tensors``); :class:`CompiledIFT` runs it through
``torch.compile`` (products, solver loop and mixed term in one graph). Eager ``torch.func``
transforms dispatch through Python (decompositions, interpreter levels) and are slow: a
forward-over-reverse product took 20× a gradient on the Iris MLP eagerly; compiled, the dispatch
is gone. Safety: the first compiled call is checked against the eager reference
(:func:`hoexp.method.ift.ift_hypergradient`, reverse-over-reverse); a compile failure, an operation
torch cannot differentiate twice in this form (no forward-mode rule, no batching rule), or a
disagreement makes every later call take the eager path (``fallback`` says why).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp, vmap

from hoexp import tree
from hoexp.method.compiling import quiet_compile
from hoexp.method.curvature import SplitLoss
from hoexp.method.solvers import REASONS, AutoStep, Exact, FixedPoint, Neumann, Solver, TensorSolve, series_scalars

Params = dict[str, Tensor]
Loss = Callable[[Params, Params], Tensor]
Product = Callable[[Params, Params, Params], Params]
HVP_MODES = ("auto", "fwd_rev", "rev_rev")


def _loss_grad(loss: Loss, lam: Params) -> Callable[[Params], Params]:
    return lambda w: grad(loss)(w, lam)


def hvp_fwd_rev(loss: Loss, w: Params, lam: Params, v: Params) -> Params:
    """``H v`` by forward-over-reverse: one ``jvp`` through the gradient computation."""
    return jvp(_loss_grad(loss, lam), (w,), (v,))[1]


def hvp_rev_rev(loss: Loss, w: Params, lam: Params, v: Params) -> Params:
    """``H v`` by reverse-over-reverse: the ``vjp`` of the gradient (``H`` is symmetric)."""
    return vjp(_loss_grad(loss, lam), w)[1](v)[0]


def linearized_hvp(loss: Loss, w: Params, lam: Params) -> tuple[Params, Tensor, Callable[[Params], Params]]:
    """``(∇_w L, L, v ↦ H v)`` at ``(w, λ)``: the forward and backward pass run once and their
    intermediates serve every later product (the ``vjp`` of the gradient: reverse-over-reverse without
    recomputing the gradient per product). Each product costs one double-backward pass; a solve of
    K products saves K forward+backward passes over :func:`hvp_rev_rev` (compiled CG-10 on the peer
    problem: 1.93 → 1.66 ms a call, 10.5 → 2.8 s to compile)."""
    # torch's stub types vjp's result as a 2-tuple whatever has_aux says: it is 3 here
    g, pullback, value = vjp(lambda w_: grad_and_value(loss)(w_, lam), w, has_aux=True)  # type: ignore[misc]
    return g, value, lambda v: pullback(v)[0]


def linearized_hvp_and_mixed(
    loss: Loss, w: Params, lam: Params
) -> tuple[Params, Tensor, Callable[[Params], Params], Callable[[Params], Params]]:
    """:func:`linearized_hvp` linearized in ``(w, λ)`` together: also ``u ↦ (∂²L/∂λ∂w) u`` (the IFT's mixed
    term) from the same kept pullback, so the hypergradient needs no further forward and backward pass for
    it. Where only ``H v`` is used (the solve's products) a compiler drops the ``λ`` half of each pass;
    eagerly each product also pays it (one more elementwise pass for weight decay)."""
    # torch's stub types vjp's result as a 2-tuple whatever has_aux says: it is 3 here
    g, pullback, value = vjp(lambda w_, lam_: grad_and_value(loss)(w_, lam_), w, lam, has_aux=True)  # type: ignore[misc]
    return g, value, lambda v: pullback(v)[0], lambda u: pullback(u)[1]


def ggn_product(split: SplitLoss, w: Params, lam: Params, v: Params) -> Params:
    """``G v = Jᵀ H_ℓ J v + ∇²r v`` (Gauss-Newton; see :mod:`hoexp.method.curvature`) as a pure function."""
    outputs = lambda w_: split.outputs(w_, lam)  # noqa: E731
    z, pullback = vjp(outputs, w)[:2]
    jv = jvp(outputs, (w,), (v,))[1]
    hjv = jvp(grad(split.output_loss), (z,), (jv,))[1]
    out = pullback(hjv)[0]
    penalty = split.penalty(w, lam)
    if isinstance(penalty, Tensor):
        pen = hvp_fwd_rev(lambda w_, lam_: torch.as_tensor(split.penalty(w_, lam_)), w, lam, v)
        out = {k: out[k] + pen[k] for k in out}
    return out


def linearized_ggn(split: SplitLoss, w: Params, lam: Params) -> tuple[Params, Tensor, Callable[[Params], Params]]:
    """``(∇_w L, L, v ↦ G v)`` (``G`` as in :func:`ggn_product`) with the forward pass run once for the
    gradient and every product: ``J v`` is the ``vjp`` of the linear pullback ``u ↦ Jᵀu`` (no
    forward-mode pass), ``H_ℓ`` and ``∇²r`` come from the kept pullbacks of their gradients. A product
    costs about two backward passes."""
    z, pullback = vjp(lambda w_: split.outputs(w_, lam), w)[:2]
    transpose = lambda u: pullback(u)[0]  # noqa: E731
    jacobian = vjp(transpose, torch.zeros_like(z))[1]
    # torch's stub types vjp's result as a 2-tuple whatever has_aux says: it is 3 here
    g_out, h_out, value = vjp(grad_and_value(split.output_loss), z, has_aux=True)  # type: ignore[misc]
    g = transpose(g_out)
    penalty = split.penalty(w, lam)
    pen = None
    if isinstance(penalty, Tensor):
        g_pen, penalty, pen = linearized_hvp(lambda w_, lam_: torch.as_tensor(split.penalty(w_, lam_)), w, lam)
        g = {k: g[k] + g_pen[k] for k in g}

    def product(v: Params) -> Params:
        out = transpose(h_out(jacobian(v)[0])[0])
        if pen is not None:
            extra = pen(v)
            out = {k: out[k] + extra[k] for k in out}
        return out

    return g, value + penalty, product


def product_for(train_loss: Loss, curvature: str, hvp: str) -> Callable[[Params, Params, Params], Params]:
    """The pure product ``(w, λ, v) ↦ C v`` of ``curvature`` (``hessian``: ``hvp`` picks the mode)."""
    if curvature == "gauss_newton":
        if not isinstance(train_loss, SplitLoss):
            raise TypeError(
                "curvature=gauss_newton needs the training loss as a SplitLoss(outputs, output_loss, "
                "penalty) (hoexp.method.curvature)"
            )
        return lambda w, lam, v: ggn_product(train_loss, w, lam, v)
    fn = hvp_rev_rev if hvp == "rev_rev" else hvp_fwd_rev
    return lambda w, lam, v: fn(train_loss, w, lam, v)


class FunctionalOperator:
    """A pure product at a fixed ``(w, λ)`` as a :class:`LinearOperator` on flat vectors.

    No graph is kept between products: each one runs the product function anew (the forward and
    backward pass included: a compiled caller lets the compiler share them). ``dense(chunk)``:
    ``vmap`` of the product over ``chunk`` columns of the identity at a time (``n`` products in
    ``⌈n/chunk⌉`` batched calls; peak memory ``chunk`` × one product's); ``damping`` adds ``μI``.
    """

    tracks_mixed = False

    def __init__(self, product: Product, w: Params, lam: Params, damping: float = 0.0, chunk: int = 256):
        self.product, self.w, self.lam, self.mu, self.chunk = product, w, lam, float(damping), chunk
        self.n = tree.numel(w)
        self.hvps = 0

    def _apply(self, v: Tensor) -> Tensor:
        out = tree.flatten(self.product(self.w, self.lam, tree.unflatten(v, self.w)).values())
        return torch.add(out, v, alpha=self.mu) if self.mu else out

    def matvec(self, v: Tensor) -> Tensor:
        self.hvps += 1
        return self._apply(v)

    def dense(self) -> Tensor:
        eye = torch.eye(self.n, dtype=next(iter(self.w.values())).dtype, device=next(iter(self.w.values())).device)
        rows = [vmap(self._apply)(eye[s : s + self.chunk]) for s in range(0, self.n, self.chunk)]
        self.hvps += self.n
        return torch.cat(rows, dim=0)


def time_hvp_modes(train_loss: Loss, w: Params, lam: Params, repeats: int = 2) -> dict[str, float]:
    """Seconds of one ``C v`` product in each mode at ``(w, λ)`` (the best of ``repeats`` after a warm-up):
    ``rev_rev`` through a kept ``create_graph`` gradient (:class:`~hoexp.method.curvature.HessianOperator`,
    the graph's cost not counted: a solve pays it once), ``fwd_rev`` by :func:`hvp_fwd_rev`, eagerly."""
    import time

    from hoexp.method.curvature import HessianOperator

    wl = tree.detached(w, requires_grad=True)
    g = torch.autograd.grad(train_loss(wl, lam), list(wl.values()), create_graph=True, allow_unused=True)
    rr = HessianOperator(tree.flatten(tree.fill_none(g, list(wl.values()))), list(wl.values()))
    fr = FunctionalOperator(
        lambda w_, lam_, v_: hvp_fwd_rev(train_loss, w_, lam_, v_), tree.detached(w), tree.detached(lam)
    )
    v = torch.randn(rr.n, generator=torch.Generator().manual_seed(0), dtype=rr.grad_flat.dtype).to(rr.grad_flat.device)
    out = {}
    for name, op in (("rev_rev", rr), ("fwd_rev", fr)):
        best = float("inf")
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            float(op.matvec(v)[0])  # the read waits for an accelerator
            if i:
                best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def ift_tensors(
    train_loss: Loss,
    val_loss: Loss,
    solver: Solver,
    w: Params,
    lam: Params,
    x0: Tensor | None = None,
    *,
    curvature: str = "hessian",
    hvp: str = "fwd_rev",
    damping: float = 0.0,
    chunk: int = 256,
) -> tuple[Params, TensorSolve, Tensor]:
    """The IFT hypergradient ``∂L_V/∂λ − (∂²L_T/∂λ∂w) u``, ``C u = ∂L_V/∂w``, as one pure function.

    No host sync and no autograd state crosses the call, so ``torch.compile`` can take it whole.
    Returns the hypergradient, the solve (tensors) and ``[L_T, L_V, ‖∂L_T/∂w‖]`` (one tensor).
    ``solver``: Neumann, fixed point, CG or exact (``solve_tensors``); ``x0`` a warm start.
    """
    (gv_w, gv_lam), lv = grad_and_value(val_loss, argnums=(0, 1))(w, lam)
    b = tree.flatten(gv_w.values())
    mixed_of: Callable[[Params], Params] | None = None
    if curvature == "hessian" and hvp == "rev_rev":
        g, lt, hv, mixed_of = linearized_hvp_and_mixed(train_loss, w, lam)
        product: Product = lambda _w, _lam, v: hv(v)  # noqa: E731
    elif curvature == "gauss_newton" and isinstance(train_loss, SplitLoss):
        g, lt, gv = linearized_ggn(train_loss, w, lam)
        product = lambda _w, _lam, v: gv(v)  # noqa: E731
    else:
        g, lt = grad_and_value(train_loss)(w, lam)
        product = product_for(train_loss, curvature, hvp)
    op = FunctionalOperator(product, w, lam, damping, chunk)
    sol = solver.solve_tensors(op, b, x0)  # type: ignore[attr-defined]
    u = tree.unflatten(sol.x, w)
    # mixed term (∂g/∂λ)ᵀu: from the linearization's pullback, else one vjp through the gradient
    mixed = mixed_of(u) if mixed_of is not None else vjp(lambda lam_: grad(train_loss)(w, lam_), lam)[1](u)[0]
    hg = {k: gv_lam[k] - mixed[k] for k in lam}
    g_norm = torch.linalg.vector_norm(tree.flatten(g.values()))
    return hg, sol, torch.stack([lt.detach(), lv.detach(), g_norm.to(lt.dtype)])


def supports_tensors(solver: Solver) -> bool:
    """Whether ``solver`` has a host-sync-free form (``alpha=auto``'s power iteration has not)."""
    return hasattr(solver, "solve_tensors") and not isinstance(solver, AutoStep)


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
    hvp: str = "fwd_rev"
    damping: float = 0.0
    compile: bool = True
    verify: bool = True
    rtol: float = 1e-4
    fallback: str | None = None
    checked: bool = False
    _fns: dict[bool, Callable[..., Any]] = field(default_factory=dict, repr=False)

    def _pure(
        self, w: Params, lam: Params, x0: Tensor | None, train_args: tuple, val_args: tuple
    ) -> tuple[Params, TensorSolve, Tensor]:
        if self.curvature == "gauss_newton":
            assert self.split is not None, "curvature=gauss_newton needs split"
            train: Any = self.split(*train_args)
        else:
            train = lambda w_, lam_: self.train_loss(w_, lam_, *train_args)  # noqa: E731
        return ift_tensors(
            train,
            lambda w_, lam_: self.val_loss(w_, lam_, *val_args),
            self.solver,
            w,
            lam,
            x0,
            curvature=self.curvature,
            hvp=self.hvp,
            damping=self.damping,
        )

    def _fn(self) -> Callable[..., Any]:
        fn = self._fns.get(self.compile)
        if fn is None:
            fn = self._fns[self.compile] = torch.compile(self._pure, dynamic=False) if self.compile else self._pure
        return fn

    def eager_reference(
        self, w: Params, lam: Params, x0: Tensor | None, train_args: tuple, val_args: tuple
    ) -> tuple[Params, Any]:
        from hoexp.method.curvature import CURVATURES
        from hoexp.method.ift import ift_hypergradient

        train: Any = (
            self.split(*train_args)
            if self.split is not None
            else (lambda w_, lam_: self.train_loss(w_, lam_, *train_args))
        )
        return ift_hypergradient(
            train,
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
        from hoexp.method.ift import IFTStats

        w, lam = tree.detached(params), tree.detached(hparams)
        if self.fallback is None and not supports_tensors(self.solver):
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
        if isinstance(self.solver, Exact) and int(sol.reason) == 3:  # singular: eager least squares
            return self.eager_reference(w, lam, x0, train_args, val_args)
        extra = [
            sol.residual if sol.residual is not None else host[0] * 0,
            torch.as_tensor(sol.iterations, dtype=host.dtype, device=host.device),
            torch.as_tensor(sol.reason, dtype=host.dtype, device=host.device),
        ]
        lt, lv, gn, res, iters, why = torch.cat([host, torch.stack(extra)]).tolist()  # one host read
        info = REASONS[int(why)] if self.solver.name == "cg" else "lu" if isinstance(self.solver, Exact) else ""
        stats_res = res if sol.residual is not None else None
        stats = IFTStats(
            train_loss=lt,
            val_loss=lv,
            inner_grad_norm=gn,
            residual=stats_res,
            iterations=int(iters),
            hvps=sol.hvps,
            info=info,
            solution=sol.x,
            extra=series_scalars(stats_res) if isinstance(self.solver, (Neumann, FixedPoint)) else {},
        )
        return hg, stats
