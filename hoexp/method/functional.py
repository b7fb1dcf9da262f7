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
``vmap`` of the product over chunks of the identity's columns (``method=exact``). Which Hessian product a solve
runs is its product mode (:mod:`hoexp.method.products`).

The IFT hypergradient built from these products (:func:`hoexp.method.ift.ift_tensors`) is what
``torch.compile`` takes whole (:class:`hoexp.method.ift.CompiledIFT`). Eager ``torch.func``
transforms dispatch through Python (decompositions, interpreter levels) and are slow: a
forward-over-reverse product took 20× a gradient on the Iris MLP eagerly; compiled, the dispatch
is gone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp, vmap

from hoexp import tree
from hoexp.method.curvature import SplitLoss

Params = dict[str, Tensor]
Loss = Callable[[Params, Params], Tensor]
Product = Callable[[Params, Params, Params], Params]


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
