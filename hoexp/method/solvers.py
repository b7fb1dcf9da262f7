"""Linear solvers for ``H u = b`` given only Hessian-vector products (jaxopt-style ``solve(op, b)``).

Every solver takes a :class:`LinearOperator` (``matvec`` on flat vectors, optionally ``dense``) and
the right-hand side ``b`` and returns a :class:`SolveResult`. The implicit-differentiation
hypergradient (``hoexp.method.ift``) plugs any of them in. Costs are in Hessian-vector products
(HVPs), each about two gradient evaluations.

Fast paths (all optional, results unchanged):

* an operator with ``tracks_mixed`` offers ``matvec_mixed(v) → (Hv, Mv)``, where ``M`` is a second
  linear map sharing ``H``'s backward pass (the IFT's mixed term ``∂²L/∂λ∂w``). When the solution is
  a linear combination of vectors the solver multiplies by ``H`` anyway (CG; Neumann and
  fixed-point iteration with ``residual``), the solver returns ``M x`` as ``SolveResult.mixed`` and
  the IFT saves its separate mixed-term pass;
* warm starts from ``x0`` (the previous outer step's solution, ``ImplicitMethod.warm_start``): CG from
  ``r = b − H x0``, fixed-point iteration (and so a Neumann series) from ``u₀ = x0``; the dense solve ignores it;
* no host synchronisation inside the Neumann and fixed-point loops; CG reads its stopping rules on the host
  every ``check_every`` iterations (:class:`ConjugateGradient`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal, Protocol, TypeGuard, cast

import torch
from torch import Tensor

from hoexp.bounds import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range


class LinearOperator(Protocol):
    n: int

    @property
    def hvps(self) -> int: ...  # products so far (``dense`` counts ``n``)

    def matvec(self, v: Tensor) -> Tensor: ...

    def dense(self) -> Tensor: ...


class MixedOperator(LinearOperator, Protocol):
    """An operator with ``tracks_mixed`` set: it also offers ``(H v, M v)`` from one backward pass."""

    def matvec_mixed(self, v: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class SolveResult:
    """A solve's answer ``x`` and what it measured. From ``solver(op, b)`` the figures are host numbers; from
    ``solver.solve_tensors(op, b)`` (no host sync: what a compiled hypergradient returns) ``residual``,
    ``iterations`` and ``reason`` are 0-d tensors until :meth:`read` reads them in one host sync."""

    x: Tensor
    iterations: int | Tensor
    hvps: int
    residual: float | Tensor | None  # ‖H x − b‖ / ‖b‖ (None when not computed)
    info: str = ""
    mixed: Tensor | None = None  # M x, when the operator tracks a mixed map and the solver could form it
    extra: dict[str, float] = field(default_factory=dict)  # solver scalars to log (e.g. solver/alpha)
    reason: int | Tensor | None = None  # a tensor solve's stopping rule (an index into REASONS), read into info
    series: bool = False  # a Neumann / fixed-point series: read() adds solver/diverging

    def read(self, *more: Tensor) -> tuple[SolveResult, list[float]]:
        """This result with host figures (``info`` from ``reason``), and the values of ``more`` (flattened), read
        together in one host sync."""
        names = [f for f in ("residual", "iterations", "reason") if isinstance(getattr(self, f), Tensor)]
        n = sum(t.numel() for t in more)
        flat = [t.reshape(-1).to(self.x.dtype) for t in (*more, *(getattr(self, f) for f in names))]
        values = torch.cat(flat).tolist() if flat else []
        if not names:
            return self, values
        host = dict(zip(names, values[n:]))
        residual, reason = host.get("residual", self.residual), host.get("reason", self.reason)
        info = self.info or ("" if reason is None else REASONS[int(reason)])
        extra = {**self.extra, **(series_scalars(residual) if self.series else {})}
        iterations = int(host.get("iterations", self.iterations))
        return replace(self, iterations=iterations, residual=residual, info=info, extra=extra, reason=reason), values[
            :n
        ]


REASONS = ("max iterations", "converged", "non-positive curvature", "singular")


def _relative_tensor(r: Tensor, b: Tensor) -> Tensor:
    """``‖r‖/‖b‖`` on the device (0 where ``b = 0``): no host sync."""
    b_norm = torch.linalg.vector_norm(b)
    rel = torch.where(
        b_norm > 0, torch.linalg.vector_norm(r) / torch.where(b_norm > 0, b_norm, 1.0), torch.zeros_like(b_norm)
    )
    return torch.where(torch.isfinite(b_norm), rel, torch.full_like(rel, math.nan))  # NaN b: not converged


def _tracks_mixed(op: LinearOperator) -> TypeGuard[MixedOperator]:
    return bool(getattr(op, "tracks_mixed", False))


def _matvec(op: LinearOperator, v: Tensor, mixed: bool) -> tuple[Tensor, Tensor | None]:
    """``(H v, M v)`` when ``mixed`` (the caller's ``_tracks_mixed(op)``), else ``(H v, None)``."""
    if mixed:
        return cast(MixedOperator, op).matvec_mixed(v)
    return op.matvec(v), None


class Solver(Protocol):
    @property
    def name(self) -> str: ...

    def __call__(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> SolveResult: ...


class Damped:
    """``H + μI`` (Levenberg-Marquardt / Tikhonov damping): shifts every eigenvalue by ``μ``, so a PSD
    curvature becomes positive definite and the solve's condition number ``(λ_max+μ)/(λ_min+μ)``
    bounded. Free: one ``axpy`` per product. The mixed map ``M`` is not damped."""

    def __init__(self, op: LinearOperator, mu: float):
        self.op, self.mu, self.n = op, float(mu), op.n
        self.tracks_mixed = _tracks_mixed(op)

    @property
    def hvps(self) -> int:
        return self.op.hvps

    def matvec(self, v: Tensor) -> Tensor:
        return torch.add(self.op.matvec(v), v, alpha=self.mu)

    def matvec_mixed(self, v: Tensor) -> tuple[Tensor, Tensor]:  # only when the wrapped operator tracks_mixed
        hv, mv = cast(MixedOperator, self.op).matvec_mixed(v)
        return torch.add(hv, v, alpha=self.mu), mv

    def dense(self) -> Tensor:
        H = self.op.dense()
        return H + self.mu * torch.eye(self.n, dtype=H.dtype, device=H.device)


def series_scalars(residual: float | None) -> dict[str, float]:
    """``solver/diverging`` = 1 when a Neumann or fixed-point series' residual exceeds 1 (worse than ``u = 0``:
    ``α > 2/λ_max``, or negative curvature); what the engine warns on, once per run."""
    return {"solver/diverging": 1.0} if residual is not None and residual > 1 else {}


def _relative(r: Tensor, b_norm: Tensor) -> float:
    """``‖r‖/‖b‖`` (0 where ``b = 0``; NaN where ``b`` is not finite: that is no converged solve)."""
    r_norm, b = torch.stack([torch.linalg.vector_norm(r), b_norm.to(r.dtype)]).tolist()  # one host sync
    if not math.isfinite(b):
        return math.nan
    return r_norm / b if b > 0 else 0.0


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series (Lorraine et al. 2020): ``H⁻¹b ≈ α Σ_{j=0..K} (I − αH)^j b``.

    Converges iff ``0 < α < 2/λ_max(H)`` and ``H ≻ 0``. ``K = iterations`` HVPs, plus one more for
    the exact residual ``‖Hx − b‖/‖b‖ = ‖(I − αH)^{K+1} b‖/‖b‖`` when ``residual`` is set.
    Unlike the published code this returns ``α·p`` (not ``p``), so the result is ``≈ H⁻¹b`` and
    comparable across solvers.

    Warm start: the series is the fixed-point iteration from zero, so from a start ``x0`` this *is*
    :class:`FixedPoint` from ``x0`` (``iterations`` HVPs, same residual rule); carried over outer
    steps the series keeps growing instead of restarting at ``b``.
    """

    iterations: int = 5
    alpha: float = 0.01
    residual: bool = True
    name: str = "neumann"

    def __call__(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        if x0 is not None:
            return FixedPoint(self.iterations, self.alpha, self.residual)(op, b, x0)
        x, r, m_total = self._iterate(op, b)
        res = None if r is None else _relative(r, torch.linalg.vector_norm(b))
        return SolveResult(
            x, self.iterations, self.iterations + self.residual, res, mixed=m_total, extra=series_scalars(res)
        )

    def solve_tensors(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        """The same solve with no host sync (for a compiled hypergradient); no mixed map."""
        if x0 is not None:
            return FixedPoint(self.iterations, self.alpha, self.residual).solve_tensors(op, b, x0)
        x, r, _ = self._iterate(op, b, mixed=False)
        res = None if r is None else _relative_tensor(r, b)
        return SolveResult(x, self.iterations, self.iterations + self.residual, res, series=True)

    def _iterate(
        self, op: LinearOperator, b: Tensor, mixed: bool | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(x, r = b − Hx or None, M x or None)``; no host sync."""
        # With the residual every term j = 0..K is multiplied by H, so M x = α Σ_j M term_j comes free.
        mixed = self.residual and _tracks_mixed(op) if mixed is None else mixed
        term, total, m_total = b, b.clone(), None
        for j in range(self.iterations + self.residual):  # with the residual, one more term: b − Hx = (I − αH)^{K+1} b
            hv, mv = _matvec(op, term, mixed)
            if mv is not None:
                m_total = mv if m_total is None else m_total.add_(mv)
            term = torch.add(term, hv, alpha=-self.alpha)
            if j < self.iterations:
                total.add_(term)
        r = term if self.residual else None
        return total.mul_(self.alpha), r, None if m_total is None else m_total.mul_(self.alpha)


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point iteration ``u ← u − α(Hu − b)`` from ``u₀ = 0`` or a start ``x0`` (Grazzi et al. 2020).

    From zero it produces the same iterates as :class:`Neumann` (``u_k = α Σ_{j<k} (I − αH)^j b``),
    with the residual ``b − Hu`` as a by-product: ``iterations`` HVPs in all, the last of which
    also gives the residual of the returned point when ``residual`` is set (one extra HVP).

    ``iterations`` counts HVPs: from zero the first step ``u₁ = αb`` is free (``iterations + 1``
    steps), from ``x0`` every step costs one (``iterations`` steps). So ``J`` calls chained through
    ``x0`` (the first from zero) are exactly one call with ``J·iterations`` (amortized IFT: the error
    contracts like ``‖I − αH‖^{J·K}`` while ``H`` and ``b`` stay put).
    """

    iterations: int = 5
    alpha: float = 0.01
    residual: bool = True
    name: str = "fixed_point"

    def __call__(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        u, r, mixed = self._iterate(op, b, x0, _tracks_mixed(op))
        res = None if r is None else _relative(r, torch.linalg.vector_norm(b))
        return SolveResult(
            u, self.iterations, self.iterations + self.residual, res, mixed=mixed, extra=series_scalars(res)
        )

    def solve_tensors(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        """The same solve with no host sync (for a compiled hypergradient); no mixed map."""
        u, r, _ = self._iterate(op, b, x0, False)
        res = None if r is None else _relative_tensor(r, b)
        return SolveResult(u, self.iterations, self.iterations + self.residual, res, series=True)

    def _iterate(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None, mixed: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        u = self.alpha * b if x0 is None else x0  # the first iterate from u₀ = 0 needs no HVP
        for _ in range(self.iterations):
            u = torch.add(u, op.matvec(u).sub_(b), alpha=-self.alpha)
        r = m = None
        if self.residual:  # the residual's HVP is of u itself: with a mixed map, M u comes with it
            hu, m = _matvec(op, u, mixed)
            r = b - hu
        return u, r, m


def _start(op: LinearOperator, b: Tensor, x0: Tensor | None, mixed: bool) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """CG's start: ``x``, ``r = b − Hx``, ``Mx`` (None from zero) and the HVPs spent (0 or 1)."""
    if x0 is None:
        return torch.zeros_like(b), b, None, 0
    hx, mx = _matvec(op, x0, mixed)
    return x0, b - hx, mx, 1


@dataclass(frozen=True)
class ConjugateGradient:
    """Conjugate gradient on ``H u = b`` (HOAG, Pedregosa 2016): one HVP per iteration.

    Stops after ``iterations`` steps, when ``‖r‖ ≤ tol·‖b‖``, or on non-positive curvature
    ``pᵀHp ≤ 0`` (an indefinite Hessian; the last iterate is returned and ``info`` says so).
    The residual reported is CG's recursive residual, equal to ``‖b − Hu‖/‖b‖`` in exact arithmetic.

    ``check_every``: the stopping rules need the host to read two scalars, which stalls an
    accelerator's queue; with ``check_every = c > 1`` the rules are evaluated on the device every
    iteration (a stopped solve is frozen: same iterates, same answer) and read on the host every
    ``c`` iterations, at the price of up to ``c − 1`` wasted HVPs after the stop (counted in
    ``hvps``, not in ``iterations``). ``0`` (default): 1 on CPU, 8 elsewhere.

    Warm start from ``x0``: ``r₀ = b − H x0`` (one more HVP), then the same iterations; each call
    minimizes the ``H``-norm error over ``x0 + K_k(H, r₀)``, so calls chained through ``x0`` are
    restarted CG and converge on a fixed positive-definite system.
    """

    iterations: int = 20
    tol: float = 1e-10
    name: str = "cg"
    check_every: int = 0

    def __call__(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        every = self.check_every or (1 if b.device.type == "cpu" else 8)
        x, r, m_x, hvps, counted, reason = self._iterate(op, b, every, x0, _tracks_mixed(op))
        iterations, why = torch.stack([counted, reason.long()]).tolist()
        return SolveResult(x, iterations, hvps, _relative(r, torch.linalg.vector_norm(b)), REASONS[why], mixed=m_x)

    def solve_tensors(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        """All ``iterations`` with the stopping rules on the device and no host sync at all (a stopped
        solve is frozen, so the answer equals :meth:`__call__`'s); no mixed map."""
        x, r, _, hvps, counted, reason = self._iterate(op, b, self.iterations + 1, x0, False)
        return SolveResult(x, counted, hvps, _relative_tensor(r, b), reason=reason)

    def _iterate(
        self, op: LinearOperator, b: Tensor, every: int, x0: Tensor | None, mixed: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, int, Tensor, Tensor]:
        """The one CG body: ``(x, r, M x, HVPs, iterations, reason)``, the stopping rules evaluated on the device
        every iteration and read on the host every ``every`` iterations (``every = 1``: a plain CG loop; a start
        that already meets the tolerance then costs no HVP)."""
        x, r, m_x, hvps = _start(op, b, x0, mixed)
        p = r
        rs = torch.dot(r, r)
        b_norm = torch.linalg.vector_norm(b)
        threshold = (self.tol * b_norm) ** 2
        active = rs > threshold
        # 0: max iterations, 1: converged, 2: non-positive curvature
        reason = torch.where(active, 0, 1)
        counted = torch.zeros((), dtype=torch.long, device=b.device)
        zero = torch.zeros((), dtype=b.dtype, device=b.device)
        for k in range(1, self.iterations + 1):
            # the only host sync in the loop (with every = 1 also before the first product, as a plain CG loop)
            if (k > 1 or every == 1) and (k - 1) % every == 0 and not bool(active):
                break
            Ap, Mp = _matvec(op, p, mixed)
            hvps += 1
            counted = counted + active.long()
            pAp = torch.dot(p, Ap)
            step = active & (pAp > 0)
            reason = torch.where(active & ~step, 2, reason)
            a = torch.where(step, rs / torch.where(step, pAp, 1.0), zero)
            x = x + a * p
            if Mp is not None:
                m_x = a * Mp if m_x is None else m_x + a * Mp
            r = r - a * Ap
            rs_new = torch.dot(r, r)
            converged = step & (rs_new <= threshold)
            reason = torch.where(converged, 1, reason)
            active = step & ~converged
            p = torch.where(active, r + (rs_new / torch.where(active, rs, 1.0)) * p, p)
            rs = torch.where(active, rs_new, rs)
        return x, r, m_x, hvps, counted, reason


@dataclass(frozen=True)
class Exact:
    """Dense solve: form ``H`` (``n`` HVPs, batched) and solve with LU, ``O(n³)`` time, ``O(n²)`` memory.

    A singular ``H`` falls back to least squares (the minimum-norm solution); a start ``x0`` is
    ignored. Refuses above ``max_params`` so a large model does not silently allocate gigabytes.
    """

    max_params: int = 20_000
    name: str = "exact"

    def __call__(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        if op.n > self.max_params:
            raise ValueError(
                f"method=exact forms the dense {op.n}x{op.n} Hessian, above max_params={self.max_params}; "
                "use method=cg or method=neumann, or raise method.max_params"
            )
        H = op.dense()
        H = 0.5 * (H + H.T)  # symmetric up to rounding; symmetrise so LU and lstsq agree
        if not bool(torch.isfinite(H).all() & torch.isfinite(b).all()):  # LAPACK's lstsq fails on NaN (an assert)
            return SolveResult(torch.full_like(b, math.nan), 1, op.n, math.nan, "non-finite Hessian or right-hand side")
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

    def solve_tensors(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        """LU on the device, no host sync: ``reason`` 3 when ``H`` is singular (then :meth:`__call__`'s
        least squares is the answer: the caller falls back to it)."""
        if op.n > self.max_params:
            self(op, b)  # raises
        H = op.dense()
        H = 0.5 * (H + H.T)
        x, status = torch.linalg.solve_ex(H, b)
        singular = (status != 0) | ~torch.isfinite(x).all()
        return SolveResult(x, 1, op.n, _relative_tensor(H @ x - b, b), "lu", reason=torch.where(singular, 3, 1))


def power_iteration(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    iterations: int = 20,
    *,
    like: Tensor,
    generator: torch.Generator | None = None,
) -> float:
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


@dataclass(frozen=True)
class AutoStep:
    """Neumann or fixed-point iteration with ``α = 1/λ_max`` of the operator (``method.alpha=auto``).

    ``α·λ_max = 1`` solves the top eigendirection in one step and contracts every mode with
    ``0 < λ ≤ λ_max``: the largest safe step (below ``2/λ_max``) that needs no tuning. ``lambda_max``:
    an earlier estimate to reuse (the runner re-estimates every ``method.alpha_every`` outer steps);
    ``None``: estimate ``|λ|_max`` now by :func:`power_iteration` (``power_iterations`` HVPs, from a
    random start drawn from ``seed``; the Rayleigh quotient approaches ``λ_max`` from below, so ``α``
    errs large by the estimate's error, far inside ``2/λ_max``). A zero or non-finite estimate keeps
    the wrapped solver's ``α``. Logs ``solver/alpha`` and ``solver/lambda_max``.
    """

    solver: Neumann | FixedPoint
    lambda_max: float | None = None
    power_iterations: int = 20
    seed: int = 0

    @property
    def name(self) -> str:
        return self.solver.name

    def __call__(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        lam = self.lambda_max
        if lam is None:
            lam = abs(
                power_iteration(
                    op.matvec, op.n, self.power_iterations, like=b, generator=torch.Generator().manual_seed(self.seed)
                )
            )
        alpha = 1.0 / lam if 0 < lam < math.inf else self.solver.alpha
        result = replace(self.solver, alpha=alpha)(op, b, x0)
        result.extra.update({"solver/alpha": alpha, "solver/lambda_max": lam})
        return result


# ------------------------------------------------------------------------------------------- factories
# An IFT method's solver node (implicit.ift(solver=...)) under the names users type, the defaults the solvers' own.
Alpha = PositiveFloat | Literal["auto"]


def _series(solver: Neumann | FixedPoint, alpha: float | str) -> Solver:
    """``solver`` with step ``alpha``, or with ``alpha=auto`` an :class:`AutoStep` around it (``1/λ_max``, the IFT
    method re-estimating it every ``alpha_every`` outer steps; 0.01 stands in until then)."""
    if alpha == "auto":
        return AutoStep(replace(solver, alpha=0.01))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha must be a number > 0 or auto, got {alpha!r}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be > 0, got {float(alpha)} (or alpha=auto: 1/λ_max by power iteration)")
    return replace(solver, alpha=float(alpha))


def neumann(
    *, terms: NonNegInt = Neumann.iterations, alpha: Alpha = Neumann.alpha, residual: bool = Neumann.residual
) -> Solver:
    """``method=neumann``: ``H⁻¹v ≈ α Σ_{j=0..terms} (I − αH)^j v`` (Lorraine et al. 2020)."""
    return _series(Neumann(terms, residual=residual), alpha)


def t1t2(*, alpha: Alpha = Neumann.alpha, residual: bool = False) -> Solver:
    """``method=t1t2``: one-step greedy IFT, ``H⁻¹ ≈ αI`` (Luketina et al. 2016): Neumann with 0 terms."""
    return _series(Neumann(0, residual=residual), alpha)


def fixed_point(
    *,
    iterations: NonNegInt = FixedPoint.iterations,
    alpha: Alpha = FixedPoint.alpha,
    residual: bool = FixedPoint.residual,
) -> Solver:
    """``method=fixed_point``: ``u ← u − α(Hu − v)`` (Grazzi et al. 2020)."""
    return _series(FixedPoint(iterations, residual=residual), alpha)


def cg(
    *,
    iterations: Annotated[int, Range(ge=1)] = ConjugateGradient.iterations,  # 0 returns u = 0: no implicit term
    tol: NonNegFloat = ConjugateGradient.tol,
) -> Solver:
    """``method=cg``: conjugate gradient on ``Hu = v`` (HOAG, Pedregosa 2016)."""
    return ConjugateGradient(iterations, tol)


def exact(*, max_params: PositiveInt = Exact.max_params) -> Solver:
    """``method=exact``: a dense solve; ``O(P²)`` memory, ``O(P³)`` time, refused above ``max_params``."""
    return Exact(max_params)
