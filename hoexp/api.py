"""The library entry point for users who bring their own model: :func:`hypergradient`."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor

from hoexp import tree
from hoexp.method.curvature import CURVATURES, SplitLoss
from hoexp.method.ift import CompiledIFT, IFTStats, LossFn, ift_hypergradient
from hoexp.method.products import PRODUCT_MODES
from hoexp.method.solvers import AutoStep, ConjugateGradient, Exact, FixedPoint, Neumann, Solver

IFT_SOLVERS = ("exact", "cg", "neumann", "fixed_point", "t1t2")


def make_solver(method: str, **options: Any) -> Solver:
    """Build the linear solver behind an IFT method from user-facing option names.

    ``iterations`` is the number of Neumann terms / CG or fixed-point iterations, ``alpha`` the
    Neumann / fixed-point step (``"auto"``: ``1/λ_max`` by 20 power iterations per call), ``tol`` CG's
    relative tolerance, ``max_params`` exact's size cap.
    """
    allowed = {
        "exact": {"max_params"},
        "cg": {"iterations", "tol"},
        "neumann": {"iterations", "alpha", "residual"},
        "fixed_point": {"iterations", "alpha", "residual"},
        "t1t2": {"alpha", "residual"},
    }
    if method not in allowed:
        raise ValueError(f"unknown method '{method}'; valid: {', '.join(IFT_SOLVERS)}")
    unknown = set(options) - allowed[method]
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} for method='{method}'; "
            f"valid: {', '.join(sorted(allowed[method])) or 'none'}"
        )
    _check_options(method, options)
    auto = options.get("alpha") == "auto"
    if auto:
        del options["alpha"]
    if method == "t1t2":  # H⁻¹ ≈ αI: a Neumann series with no terms
        solver = Neumann(iterations=0, alpha=options.get("alpha", 0.01), residual=options.get("residual", False))
    else:
        cls = {"exact": Exact, "cg": ConjugateGradient, "neumann": Neumann, "fixed_point": FixedPoint}[method]
        solver = cls(**options)
    return AutoStep(solver) if auto else solver


def _check_options(method: str, options: Mapping[str, Any]) -> None:
    """The bounds of the config's factories (:mod:`hoexp.method.implicit`): a ValueError naming the option."""
    least = 1 if method == "cg" else 0  # CG from u = 0 with no iteration returns u = 0
    bounds = {"iterations": least, "max_params": 1}
    for key, lowest in bounds.items():
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest):
            raise ValueError(f"{key} must be >= {lowest} (an integer), got {value!r}")
    alpha = options.get("alpha")
    if alpha is not None and alpha != "auto" and not _finite_number(alpha, above=0):
        raise ValueError(f"alpha must be > 0 and finite, or 'auto', got {alpha!r}")
    tol = options.get("tol")
    if tol is not None and not (_finite_number(tol, above=0) or tol == 0):
        raise ValueError(f"tol must be >= 0 and finite, got {tol!r}")


def _finite_number(x: Any, above: float) -> bool:
    """Whether ``x`` is a number (a Python or NumPy scalar, a 0-d tensor) that is finite and above ``above``."""
    if isinstance(x, (bool, str)):
        return False
    try:
        f = float(x)
    except (TypeError, ValueError, RuntimeError):
        return False
    return math.isfinite(f) and f > above


def _require_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """A ValueError naming the entries of ``params`` or ``hparams`` that hold NaN or inf (one host sync)."""
    if not tensors:
        return
    bad = torch.stack([(~torch.isfinite(t.detach())).sum() for t in tensors.values()]).tolist()
    named = [
        f"{what}[{k!r}] has {n:,} of {t.numel():,} entries NaN or inf" for (k, t), n in zip(tensors.items(), bad) if n
    ]
    if named:
        raise ValueError(
            f"{'; '.join(named)}: the hypergradient needs finite weights and hyperparameters; check what "
            "produced them (a diverged inner training, a bad initial value)"
        )


def hypergradient(
    train_loss: LossFn,
    val_loss: LossFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    method: str | Solver = "exact",
    *,
    return_stats: bool = False,
    damping: float = 0.0,
    curvature: str = "hessian",
    hvp: str = "rev_rev",
    compile: bool = False,
    **options: Any,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], IFTStats]:
    """Hypergradient ``dL_V/dλ`` by implicit differentiation at ``params`` (taken as ``w*(λ)``).

    ``train_loss(params, hparams)`` and ``val_loss(params, hparams)`` return scalar tensors;
    ``params`` and ``hparams`` are ``dict[str, Tensor]``. ``method`` picks the inverse-HVP solver:
    ``"exact"`` (dense Hessian, small models), ``"cg"``, ``"neumann"``, ``"fixed_point"`` or ``"t1t2"``
    (``H⁻¹ ≈ αI``), or is a solver object of your own (``solver(op, b) -> SolveResult``, see
    :mod:`hoexp.method.solvers`); ``options`` are passed to a named one (``iterations``, ``alpha``, ``tol``,
    ``max_params``).
    ``damping`` ``μ ≥ 0`` solves with ``H + μI``; ``curvature="gauss_newton"`` with the Gauss-Newton
    matrix instead of ``H``, which needs ``train_loss`` as a
    :class:`~hoexp.method.curvature.SplitLoss` (outputs, loss on outputs, penalty).
    ``hvp``: how Hessian-vector products are formed, ``"rev_rev"`` (a kept ``create_graph`` gradient,
    differentiated again) or ``"fwd_rev"`` (``torch.func.jvp`` of ``torch.func.grad``).
    ``compile=True`` runs the whole hypergradient (products, solver loop, mixed term) as one
    ``torch.compile``'d pure function (:class:`~hoexp.method.ift.CompiledIFT`, compiled at the first call
    with a given ``(train_loss, val_loss)`` and options and reused by later calls with the same ones, checked
    then against the eager path, which it falls back to on a failure or a disagreement; ``alpha="auto"``
    always runs eagerly). Returns a dict shaped like ``hparams`` (and an :class:`IFTStats` with
    ``return_stats=True``).

    >>> hg = hypergradient(train_loss, val_loss, w, {"log_decay": raw}, method="cg", iterations=50)
    """
    solver, label = _solver(method, options, curvature, damping, hvp)
    _require_finite(params, "params")
    _require_finite(hparams, "hparams")
    with torch.enable_grad():  # like torch.func: works inside torch.no_grad() too
        if compile:
            fn = _compiled(train_loss, val_loss, solver, curvature, hvp, float(damping))
            train_loss, val_loss = fn.train_loss, fn.val_loss
            hg, stats = fn(params, hparams)
        else:
            train_loss, val_loss = _scalar_loss(train_loss, "train_loss"), _scalar_loss(val_loss, "val_loss")
            curv = CURVATURES[curvature]
            hg, stats = ift_hypergradient(
                train_loss, val_loss, params, hparams, solver, curvature=curv, damping=float(damping), hvp=hvp
            )
        _check_solve(label, train_loss, val_loss, params, hparams, hg, stats)
    return (hg, stats) if return_stats else hg


def _solver(
    method: str | Solver, options: dict[str, Any], curvature: str, damping: float, hvp: str
) -> tuple[Solver, str]:
    """The solver :func:`hypergradient` runs and its label, after checking the options (a ValueError naming one)."""
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature '{curvature}'; valid: {', '.join(CURVATURES)}")
    if not (_finite_number(damping, above=0) or damping == 0):
        raise ValueError(f"damping must be >= 0 and finite, got {damping!r}")
    fixed = sorted(k for k, mode in PRODUCT_MODES.items() if not getattr(mode, "timed", False))  # auto: a run's
    if hvp not in fixed:
        raise ValueError(f"unknown hvp '{hvp}'; valid: {', '.join(fixed)}")
    if isinstance(method, str):
        return make_solver(method, **options), method
    if options:
        raise ValueError(f"options {', '.join(sorted(options))} apply to a named method, not to a solver object")
    return method, type(method).__name__


_COMPILED: OrderedDict[tuple, CompiledIFT] = OrderedDict()  # hypergradient(compile=True)'s, most recent last
MAX_COMPILED = 8  # a few problems at a time; the least recently used goes


def _compiled(
    train_loss: LossFn, val_loss: LossFn, solver: Solver, curvature: str, hvp: str, damping: float
) -> CompiledIFT:
    """The compiled IFT of this problem: keyed on what identifies it (the caller's two loss functions, the solver's
    value, the options), so a second call with the same problem reuses the compiled graph (no new entry, no
    recompilation); the losses' scalar wrappers are made once, with the entry."""
    try:
        key: tuple = (train_loss, val_loss, solver, curvature, hvp, damping)
        hash(key)
    except TypeError:  # an unhashable solver (a mutable dataclass) or loss: its identity (the entry keeps it alive)
        key = (id(train_loss), id(val_loss), id(solver), curvature, hvp, damping)
    fn = _COMPILED.get(key)
    if fn is None:
        tl, vl = _scalar_loss(train_loss, "train_loss"), _scalar_loss(val_loss, "val_loss")
        split = (lambda: cast(SplitLoss, tl)) if curvature == "gauss_newton" else None
        fn = _COMPILED[key] = CompiledIFT(solver, tl, vl, split=split, curvature=curvature, hvp=hvp, damping=damping)
        while len(_COMPILED) > MAX_COMPILED:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(key)
    return fn


def _scalar(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
    """``fn`` with a one-element tensor result as a 0-d tensor (a loss shaped ``(1,)``); more elements
    are a ValueError."""

    def one(*args: Any) -> Any:
        out = fn(*args)
        if isinstance(out, Tensor) and out.dim():
            if out.numel() != 1:
                raise ValueError(f"{what} must return one number (a 0-d tensor), got shape {tuple(out.shape)}")
            return out.reshape(())
        return out

    return one


def _scalar_loss(loss: LossFn, what: str) -> LossFn:
    if isinstance(loss, SplitLoss):
        return dataclasses.replace(
            loss,
            output_loss=_scalar(loss.output_loss, f"{what}.output_loss"),
            penalty=_scalar(loss.penalty, f"{what}.penalty"),
        )
    return _scalar(loss, what)


def _check_solve(
    method: str,
    train_loss: LossFn,
    val_loss: LossFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    hg: Mapping[str, Tensor],
    stats: IFTStats,
) -> None:
    """A ValueError when the solve diverged (a non-finite answer or residual): ``H u = ∂L_V/∂w`` has
    no solution, e.g. because the validation loss uses a parameter the training loss does not (zero
    rows in ``H``; then the error names it). Cost: nothing unless the residual exceeds 1 (the residual
    of ``u = 0``); then one gradient of each loss."""
    residual = stats.residual if stats.residual is not None else 0.0
    answers = [*hg.values(), *([] if stats.solution is None else [stats.solution])]
    finite = math.isfinite(residual) and all(bool(torch.isfinite(t).all()) for t in answers)
    if finite and residual <= 1:
        return
    for what, value in (("train_loss", stats.train_loss), ("val_loss", stats.val_loss)):
        if not math.isfinite(value):  # the inputs were finite: what the loss closes over (data) is not
            raise ValueError(
                f"{what}(params, hparams) is {value} at finite params and hparams: the losses must be finite "
                "there; check the data or constants they use"
            )
    w = tree.detached(params, requires_grad=True)
    lam = tree.detached(hparams, requires_grad=True)
    names = list(w)
    used = torch.autograd.grad(train_loss(w, lam), list(w.values()), allow_unused=True)
    val = torch.autograd.grad(val_loss(w, lam), list(w.values()), allow_unused=True)
    for what, grads in (("train_loss", used), ("val_loss", val)):
        bad = [n for n, gr in zip(names, grads) if gr is not None and not bool(torch.isfinite(gr).all())]
        if bad:
            raise ValueError(
                f"the gradient of {what} with respect to params {bad} is not finite though the loss is: "
                "the losses must be differentiable at params (e.g. no sqrt or log at 0)"
            )
    orphans = [n for n, t, v in zip(names, used, val) if t is None and v is not None and bool(v.ne(0).any())]
    if orphans:
        raise ValueError(
            f"val_loss depends on params {orphans} but train_loss does not: the Hessian is zero there and "
            f"H u = ∂L_V/∂w has no solution (method={method!r}: residual {residual:.3g}); leave them out "
            "of params (they are not trained), or pass damping > 0"
        )
    if not finite:
        raise ValueError(
            f"the {method!r} solve diverged (residual {residual:.3g}, {stats.info or 'no info'}): H u = "
            "∂L_V/∂w has no solution or H is far from positive definite; pass damping > 0, "
            "curvature='gauss_newton', or method='exact' (least squares)"
        )
