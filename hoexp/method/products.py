"""How an IFT solve forms its Hessian-vector products ``H v``: the product mode, a part of its own (``method.hvp``).

The same ``H v = ∂²L_T/∂w² v``, three ways:

* :class:`RevRev` (``rev_rev``, the default): eagerly, one backward pass per product through the kept
  ``create_graph`` gradient (:class:`~hoexp.method.curvature.HessianOperator`: the forward and first backward pass
  paid once per solve); a dense solve ``vmap``\\ s the ``vjp`` of the gradient linearized once instead (2.4× faster
  than batching the kept graph's backward); purely, the gradient linearized in ``(w, λ)``
  (:func:`~hoexp.method.functional.linearized_hvp_and_mixed`), whose pullback also gives the mixed term.
* :class:`FwdRev` (``fwd_rev``): ``jvp`` of ``grad`` per product (:func:`~hoexp.method.functional.hvp_fwd_rev`), no
  kept graph; its forward pass is rerun by every product.
* :class:`Auto` (``auto``): one product of each timed at the first hypergradient, the faster kept for the run.

A mode gives the eager solve its :class:`~hoexp.method.solvers.LinearOperator` (:meth:`ProductMode.operator`) and
the pure, compilable hypergradient its gradient, value and product (:meth:`ProductMode.linearize`). It forms the
Hessian's products; a Gauss-Newton curvature forms its own. Same answer in every mode, up to rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.func import grad_and_value

from hoexp import tree
from hoexp.method.curvature import HessianOperator
from hoexp.method.functional import (
    FunctionalOperator,
    Loss,
    Params,
    Product,
    hvp_fwd_rev,
    linearized_hvp,
    linearized_hvp_and_mixed,
)
from hoexp.method.solvers import LinearOperator
from hoexp.tree import Tree

# (∇_w L, L, (w, λ, v) ↦ H v, u ↦ (∂²L/∂λ∂w) u or None: the mixed term then takes one vjp of its own)
Linearized = tuple[Params, Tensor, Product, Callable[[Params], Params] | None]


@runtime_checkable
class ProductMode(Protocol):
    """How ``H v`` is formed at ``(w, λ)`` for the training loss ``train_loss(w, λ)``."""

    @property
    def name(self) -> str: ...

    def resolve(self, train_loss: Loss, w: Params, lam: Params) -> tuple[ProductMode, dict[str, float]]:
        """The mode to run at this point and scalars to log (a fixed mode: itself, nothing)."""
        ...

    def operator(
        self, train_loss: Loss, w: Tree, lam: Tree, grad_flat: Tensor, mixed_inputs: list[Tensor] | None, dense: bool
    ) -> LinearOperator:
        """The eager solve's operator ``v ↦ H v``; ``w``, ``lam``: the leaves ``grad_flat = ∂L_T/∂w`` (with its
        graph) was taken from; ``mixed_inputs``: leaves whose mixed map it may track; ``dense``: the solve forms
        the whole matrix (``method=exact``)."""
        ...

    def linearize(self, train_loss: Loss, w: Params, lam: Params) -> Linearized:
        """The pure form (no host sync, no autograd state across the call: ``torch.compile`` takes it)."""
        ...


@dataclass(frozen=True)
class RevRev:
    """Reverse-over-reverse: differentiate the gradient's graph again for each product."""

    name: ClassVar[str] = "rev_rev"  # a class constant: not an option of the config node

    def resolve(self, train_loss: Loss, w: Params, lam: Params) -> tuple[ProductMode, dict[str, float]]:
        return self, {}

    def operator(
        self, train_loss: Loss, w: Tree, lam: Tree, grad_flat: Tensor, mixed_inputs: list[Tensor] | None, dense: bool
    ) -> LinearOperator:
        if not dense:
            return HessianOperator(grad_flat, list(w.values()), mixed_inputs)
        w0, lam0 = tree.detached(w), tree.detached(lam)
        hv = linearized_hvp(train_loss, w0, lam0)[2]  # the batched vjp of the gradient: one forward and backward
        return FunctionalOperator(lambda w_, lam_, u: hv(u), w0, lam0)

    def linearize(self, train_loss: Loss, w: Params, lam: Params) -> Linearized:
        g, value, hv, mixed_of = linearized_hvp_and_mixed(train_loss, w, lam)
        return g, value, lambda w_, lam_, v: hv(v), mixed_of


@dataclass(frozen=True)
class FwdRev:
    """Forward-over-reverse: a ``jvp`` through the gradient computation for each product."""

    name: ClassVar[str] = "fwd_rev"

    def resolve(self, train_loss: Loss, w: Params, lam: Params) -> tuple[ProductMode, dict[str, float]]:
        return self, {}

    def operator(
        self, train_loss: Loss, w: Tree, lam: Tree, grad_flat: Tensor, mixed_inputs: list[Tensor] | None, dense: bool
    ) -> LinearOperator:
        return FunctionalOperator(self._product(train_loss), tree.detached(w), tree.detached(lam))

    def linearize(self, train_loss: Loss, w: Params, lam: Params) -> Linearized:
        g, value = grad_and_value(train_loss)(w, lam)
        return g, value, self._product(train_loss), None

    @staticmethod
    def _product(train_loss: Loss) -> Product:
        return lambda w_, lam_, v: hvp_fwd_rev(train_loss, w_, lam_, v)


@dataclass
class Auto:
    """Both fixed modes timed once, at the first point it is resolved at (one eager product each, the best of two
    after a warm-up; ``rev_rev``'s graph not counted: a solve pays it once), the faster kept: ``chosen``
    (not carried over a resume: a resumed run times again). Logs ``solver/fwd_rev_over_rev_rev`` then. Eager:
    a pure or compiled hypergradient takes the mode it chose."""

    name: ClassVar[str] = "auto"
    timed: ClassVar[bool] = True  # chooses by timing the host: resolved eagerly, before a compiled hypergradient
    chosen: ProductMode | None = field(default=None, repr=False, compare=False)

    def resolve(self, train_loss: Loss, w: Params, lam: Params) -> tuple[ProductMode, dict[str, float]]:
        if self.chosen is not None:
            return self.chosen, {}
        rev, fwd = RevRev(), FwdRev()
        t_rev, t_fwd = _seconds_per_product((rev, fwd), train_loss, w, lam)
        self.chosen = fwd if t_fwd < t_rev else rev
        return self.chosen, {f"solver/{fwd.name}_over_{rev.name}": t_fwd / t_rev}

    def operator(
        self, train_loss: Loss, w: Tree, lam: Tree, grad_flat: Tensor, mixed_inputs: list[Tensor] | None, dense: bool
    ) -> LinearOperator:
        return self.resolve(train_loss, w, lam)[0].operator(train_loss, w, lam, grad_flat, mixed_inputs, dense)

    def linearize(self, train_loss: Loss, w: Params, lam: Params) -> Linearized:
        if self.chosen is None:
            raise TypeError("hvp=auto times its modes eagerly: resolve() it before a pure or compiled hypergradient")
        return self.chosen.linearize(train_loss, w, lam)


def _seconds_per_product(
    modes: tuple[ProductMode, ...], train_loss: Loss, w: Params, lam: Params, repeats: int = 2
) -> list[float]:
    """Seconds of one eager product of each mode's operator at ``(w, λ)`` (the best of ``repeats`` after a warm-up),
    all built on one ``create_graph`` gradient, whose cost is not counted (a solve pays it once)."""
    wl = tree.detached(w, requires_grad=True)
    g = torch.autograd.grad(train_loss(wl, lam), list(wl.values()), create_graph=True, allow_unused=True)
    g_flat = tree.flatten(tree.fill_none(g, list(wl.values())))
    v = torch.randn(g_flat.numel(), generator=torch.Generator().manual_seed(0), dtype=g_flat.dtype).to(g_flat.device)
    out = []
    for mode in modes:
        op = mode.operator(train_loss, wl, tree.detached(lam), g_flat, None, dense=False)
        best = float("inf")
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            float(op.matvec(v)[0])  # the read waits for an accelerator
            if i:
                best = min(best, time.perf_counter() - t0)
        out.append(best)
    return out


# The config's spellings (method.hvp=fwd_rev), as CURVATURES holds curvature's; a node naming a ProductMode of your
# own passes as itself.
PRODUCT_MODES: dict[str, Callable[[], ProductMode]] = {m.name: m for m in (RevRev, FwdRev, Auto)}


def product_mode(hvp: str | ProductMode) -> ProductMode:
    """``hvp`` as a :class:`ProductMode` (a spelling of :data:`PRODUCT_MODES`: a new one; a mode: itself)."""
    if not isinstance(hvp, str):
        return hvp
    if hvp not in PRODUCT_MODES:
        raise ValueError(f"unknown hvp '{hvp}'; valid: {', '.join(sorted(PRODUCT_MODES))}")
    return PRODUCT_MODES[hvp]()
