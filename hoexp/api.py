"""The library entry point for users who bring their own model: :func:`hypergradient`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from hoexp.method.ift import IFTStats, LossFn, ift_hypergradient
from hoexp.method.solvers import ConjugateGradient, Exact, FixedPoint, Neumann, Solver

IFT_SOLVERS = ("exact", "cg", "neumann", "fixed_point", "t1t2")


def make_solver(method: str, **options: Any) -> Solver:
    """Build the linear solver behind an IFT method from user-facing option names.

    ``iterations`` is the number of Neumann terms / CG or fixed-point iterations, ``alpha`` the
    Neumann / fixed-point step, ``tol`` CG's relative tolerance, ``max_params`` exact's size cap.
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
    if "iterations" in options and int(options["iterations"]) < 0:
        raise ValueError(f"iterations must be >= 0, got {options['iterations']}")
    if "alpha" in options and not float(options["alpha"]) > 0:
        raise ValueError(f"alpha must be > 0, got {options['alpha']}")
    if method == "t1t2":  # H⁻¹ ≈ αI: a Neumann series with no terms
        return Neumann(iterations=0, alpha=options.get("alpha", 0.01), residual=options.get("residual", False))
    cls = {"exact": Exact, "cg": ConjugateGradient, "neumann": Neumann, "fixed_point": FixedPoint}[method]
    return cls(**options)


def hypergradient(
    train_loss: LossFn,
    val_loss: LossFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    method: str = "exact",
    *,
    return_stats: bool = False,
    **options: Any,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], IFTStats]:
    """Hypergradient ``dL_V/dλ`` by implicit differentiation at ``params`` (taken as ``w*(λ)``).

    ``train_loss(params, hparams)`` and ``val_loss(params, hparams)`` return scalar tensors;
    ``params`` and ``hparams`` are ``dict[str, Tensor]``. ``method`` picks the inverse-HVP solver:
    ``"exact"`` (dense Hessian, small models), ``"cg"``, ``"neumann"``, ``"fixed_point"`` or ``"t1t2"``
    (``H⁻¹ ≈ αI``);
    ``options`` are passed to it (``iterations``, ``alpha``, ``tol``, ``max_params``).
    Returns a dict shaped like ``hparams`` (and an :class:`IFTStats` with ``return_stats=True``).

    >>> hg = hypergradient(train_loss, val_loss, w, {"log_decay": raw}, method="cg", iterations=50)
    """
    solver = make_solver(method, **options)
    hg, stats = ift_hypergradient(train_loss, val_loss, params, hparams, solver)
    return (hg, stats) if return_stats else hg
