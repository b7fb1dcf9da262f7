"""Linear solvers for ``H u = b`` given only Hessian-vector products (jaxopt-style ``solve(op, b)``).

Every solver takes a :class:`LinearOperator` (``matvec`` on flat vectors, optionally ``dense``) and
the right-hand side ``b`` and returns a :class:`SolveResult`. The implicit-differentiation
hypergradient (``hoexp.method.ift``) plugs any of them in. Costs are in Hessian-vector products
(HVPs), each about two gradient evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor


class LinearOperator(Protocol):
    n: int

    def matvec(self, v: Tensor) -> Tensor: ...

    def dense(self) -> Tensor: ...


@dataclass
class SolveResult:
    x: Tensor
    iterations: int
    hvps: int
    residual: float | None  # ‖H x − b‖ / ‖b‖ (None when not computed)
    info: str = ""


class Solver(Protocol):
    name: str

    def __call__(self, op: LinearOperator, b: Tensor) -> SolveResult: ...


def _relative(r: Tensor, b_norm: Tensor) -> float:
    b = float(b_norm)
    return float(torch.linalg.vector_norm(r)) / b if b > 0 else 0.0


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series (Lorraine et al. 2020): ``H⁻¹b ≈ α Σ_{j=0..K} (I − αH)^j b``.

    Converges iff ``0 < α < 2/λ_max(H)`` and ``H ≻ 0``. ``K = iterations`` HVPs, plus one more for
    the exact residual ``‖Hx − b‖/‖b‖ = ‖(I − αH)^{K+1} b‖/‖b‖`` when ``residual`` is set.
    Unlike the published code this returns ``α·p`` (not ``p``), so the result is ``≈ H⁻¹b`` and
    comparable across solvers.
    """

    iterations: int = 5
    alpha: float = 0.01
    residual: bool = True
    name: str = "neumann"

    def __call__(self, op: LinearOperator, b: Tensor) -> SolveResult:
        term = b
        total = b
        for _ in range(self.iterations):
            term = term - self.alpha * op.matvec(term)
            total = total + term
        hvps = self.iterations
        res = None
        if self.residual:
            r = term - self.alpha * op.matvec(term)
            hvps += 1
            res = _relative(r, torch.linalg.vector_norm(b))
        return SolveResult(self.alpha * total, self.iterations, hvps, res)


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point iteration ``u ← u − α(Hu − b)`` from ``u₀ = 0`` (Grazzi et al. 2020).

    From zero it produces the same iterates as :class:`Neumann` (``u_k = α Σ_{j<k} (I − αH)^j b``),
    with the residual ``b − Hu`` as a by-product: ``iterations`` HVPs in all, the last of which
    also gives the residual of the returned point when ``residual`` is set (one extra HVP).
    """

    iterations: int = 5
    alpha: float = 0.01
    residual: bool = True
    name: str = "fixed_point"

    def __call__(self, op: LinearOperator, b: Tensor) -> SolveResult:
        u = self.alpha * b  # the first iterate from u₀ = 0 needs no HVP
        hvps = 0
        for _ in range(self.iterations):
            u = u - self.alpha * (op.matvec(u) - b)
            hvps += 1
        res = None
        if self.residual:
            res = _relative(b - op.matvec(u), torch.linalg.vector_norm(b))
            hvps += 1
        return SolveResult(u, self.iterations, hvps, res)


@dataclass(frozen=True)
class ConjugateGradient:
    """Conjugate gradient on ``H u = b`` (HOAG, Pedregosa 2016): one HVP per iteration.

    Stops after ``iterations`` steps, when ``‖r‖ ≤ tol·‖b‖``, or on non-positive curvature
    ``pᵀHp ≤ 0`` (an indefinite Hessian; the last iterate is returned and ``info`` says so).
    The residual reported is CG's recursive residual, equal to ``‖b − Hu‖/‖b‖`` in exact arithmetic.
    """

    iterations: int = 20
    tol: float = 1e-10
    name: str = "cg"

    def __call__(self, op: LinearOperator, b: Tensor) -> SolveResult:
        x = torch.zeros_like(b)
        r = b
        p = r
        rs = torch.dot(r, r)
        b_norm = torch.linalg.vector_norm(b)
        threshold = float(self.tol * b_norm) ** 2
        info = "max iterations"
        k = 0
        if float(rs) <= threshold:
            return SolveResult(x, 0, 0, _relative(r, b_norm), "converged")
        while k < self.iterations:
            Ap = op.matvec(p)
            k += 1
            pAp = torch.dot(p, Ap)
            if not float(pAp) > 0:
                info = "non-positive curvature"
                break
            a = rs / pAp
            x = x + a * p
            r = r - a * Ap
            rs_new = torch.dot(r, r)
            if float(rs_new) <= threshold:
                info = "converged"
                break
            p = r + (rs_new / rs) * p
            rs = rs_new
        return SolveResult(x, k, k, _relative(r, b_norm), info)


@dataclass(frozen=True)
class Exact:
    """Dense solve: form ``H`` (``n`` HVPs, batched) and solve with LU, ``O(n³)`` time, ``O(n²)`` memory.

    A singular ``H`` falls back to least squares (the minimum-norm solution). Refuses above
    ``max_params`` so a large model does not silently allocate gigabytes.
    """

    max_params: int = 20_000
    name: str = "exact"

    def __call__(self, op: LinearOperator, b: Tensor) -> SolveResult:
        if op.n > self.max_params:
            raise ValueError(
                f"method=exact forms the dense {op.n}x{op.n} Hessian, above max_params={self.max_params}; "
                "use method=cg or method=neumann, or raise method.max_params"
            )
        H = op.dense()
        H = 0.5 * (H + H.T)  # symmetric up to rounding; symmetrise so LU and lstsq agree
        info = "lu"
        try:
            x, status = torch.linalg.solve_ex(H, b)
            if int(status) != 0 or not bool(torch.isfinite(x).all()):
                raise RuntimeError("singular")
        except RuntimeError:
            x = torch.linalg.lstsq(H, b.unsqueeze(-1)).solution.squeeze(-1)
            info = "lstsq (singular Hessian)"
        res = _relative(H @ x - b, torch.linalg.vector_norm(b))
        return SolveResult(x, 1, op.n, res, info)


def power_iteration(matvec: Callable[[Tensor], Tensor], n: int, iterations: int = 20, *,
                    like: Tensor, generator: torch.Generator | None = None) -> float:
    """Estimate the largest-magnitude eigenvalue of ``H`` (``iterations`` HVPs).

    Used to pick a Neumann / fixed-point step: the series converges for ``α < 2/λ_max``.
    """
    v = torch.randn(n, generator=generator, dtype=like.dtype).to(like.device)
    v = v / torch.linalg.vector_norm(v)
    lam = 0.0
    for _ in range(iterations):
        w = matvec(v)
        lam = float(torch.dot(v, w))
        w_norm = float(torch.linalg.vector_norm(w))
        if w_norm == 0 or not math.isfinite(w_norm):
            break
        v = w / w_norm
    return lam
