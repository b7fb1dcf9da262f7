"""Runner-facing IFT methods (``neumann``, ``cg``, ``fixed_point``, ``exact``, ``t1t2``) and ``none``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from hoexp import tree
from hoexp.components import CheckContext, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range
from hoexp.errors import ConfigError, HoexpError
from hoexp.method.base import inner_scalars, scalars, step_from_gradient, train_inner, with_extra
from hoexp.method.curvature import CURVATURES, Curvature, Hessian, SplitLoss
from hoexp.method.functional import CompiledIFT, time_hvp_modes
from hoexp.method.ift import ift_hypergradient
from hoexp.method.solvers import AutoStep, ConjugateGradient, Exact, FixedPoint, Neumann, Solver
from hoexp.types import OuterResult, OuterStep


@dataclass
class ImplicitMethod:
    """Train ``inner_steps`` steps, then the IFT hypergradient at the reached weights.

    The Hessian and mixed term use the next training batch, the validation gradient ``val_batch``.
    Cost per outer step: ``inner_steps`` training steps + the solver's HVPs + ~3 gradients.

    Long-horizon options (``hoexp.method.ift``): ``curvature`` (Hessian or Gauss-Newton), ``damping``
    ``μ`` (solve with ``C + μI``), and two that carry state across outer steps (:class:`CarriesState`:
    checkpointed with the run, reset by ``load_state_dict({})``):

    * ``warm_start`` (amortized IFT, as AmIGO / SOBA): the solve's ``u`` is the next solve's start,
      so over ``J`` outer steps a ``K``-iteration solver has run ``J·K`` iterations on a slowly
      moving system (a fixed system: exactly one solve of ``J·K``). No extra cost; ``P`` floats kept.
      A ``u`` whose residual exceeds 1 (worse than ``u = 0``: a diverged series, CG stopped on
      negative curvature) is dropped, so one bad solve does not poison the following ones.
    * ``alpha_every > 0`` (``method.alpha=auto``, Neumann / fixed point / T1-T2): ``α = 1/λ_max`` of
      the (damped) operator, re-estimated by power iteration (:class:`AutoStep`, 20 HVPs) every
      ``alpha_every`` outer steps (``20/alpha_every`` HVPs per step on average), and at the step after
      a solve whose residual exceeded 1 (the series diverged: ``α > 2/λ_max`` now). Curvature grows
      early in training: on the Iris preset ``λ_max(G)`` rose from 3.1 to 9.0 over the first 20 outer
      steps, so without that rule ``α = 1/3.1`` diverged (residuals 6-12) until the next estimate.
      With an indefinite Hessian the series diverges along negative curvature for any ``α`` and the
      rule re-estimates every step; use ``curvature=gauss_newton`` there.

    ``fuse_step`` (one gradient fewer per outer step): the IFT runs at the weights before the last inner
    step, on that step's batch, and the step takes its gradient from the IFT's ``create_graph``
    gradient (the same ``∂L_T/∂w`` at the same point), so no gradient is computed twice and no extra
    batch is drawn. The hypergradient is then one inner step older; eager only (``compile=false``).

    Speed options (same answer up to rounding): ``hvp`` (``rev_rev``: products through the kept
    ``create_graph`` gradient; ``fwd_rev``: ``jvp`` of ``grad``; ``auto``: both timed once at the
    first hypergradient, the faster kept, the ratio logged as ``solver/fwd_rev_over_rev_rev``) and
    ``compile`` (the whole hypergradient as one ``torch.compile``'d pure function,
    :class:`~hoexp.method.functional.CompiledIFT`: compiled once per run, checked once against the
    eager path, which it falls back to on a failure or a disagreement).
    """

    solver: Solver
    name: str
    # IFT differentiates at a stationary point of L_T, so it cannot tune families that change only the path (lr,
    # momentum); its inner steps are plain ones (compile=true and mixed precision apply).
    needs_stationary_point: ClassVar[bool] = True
    differentiates_steps: ClassVar[bool] = False
    needs_pathwise_hp: ClassVar[bool] = True  # the mixed term ∂²L_T/∂λ∂w differentiates the training loss in λ
    curvature: Curvature = Hessian()
    damping: float = 0.0
    warm_start: bool = False
    alpha_every: int = 0  # > 0: α = 1/λ_max, re-estimated every alpha_every outer steps; 0: the solver's α
    hvp: str = "rev_rev"  # rev_rev | fwd_rev | auto
    compile: bool = False
    fuse_step: bool = False
    _hvp_chosen: str | None = field(default=None, repr=False, compare=False)
    _compiled: dict[int, CompiledIFT] = field(default_factory=dict, repr=False, compare=False)
    carried: dict[str, Any] = field(default_factory=dict, repr=False)  # u, lambda_max, step

    def __post_init__(self) -> None:
        if self.fuse_step and self.compile:
            raise ValueError(
                "fuse_step=true takes the last inner step's gradient from the eager IFT; set method.compile=false "
                "or method.fuse_step=false"
            )

    @property
    def extra_batches(self) -> int:
        """The Hessian's batch, drawn after the inner steps' (none when fused: it is the last inner step's)."""
        return 0 if self.fuse_step else 1

    @property
    def refuses_data_parallel(self) -> str:
        """Why this method cannot run data-parallel ("" when it can): the dense solve vmaps its backward passes."""
        return (
            "forms the dense Hessian with batched (vmapped) backward passes, which cannot all-reduce"
            if isinstance(self.solver, Exact)
            else ""
        )

    def check(self, ctx: CheckContext) -> None:
        """Refuse a dense solve above ``max_params`` before training starts."""
        limit, n_params = getattr(self.solver, "max_params", None), ctx.n_params
        if limit is not None and n_params is not None and n_params > limit:
            raise ConfigError(
                f"method={self.name} would form a dense {n_params:,}x{n_params:,} Hessian, above "
                f"method.max_params={limit:,}; use method=cg or method=neumann, or raise "
                "method.max_params"
            )

    @property
    def carries(self) -> bool:
        """Whether an outer step's answer depends on earlier outer steps (warm start, auto α)."""
        return self.warm_start or bool(self.alpha_every)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.carried)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carried = dict(state)

    def __call__(self, st: OuterStep) -> OuterResult:
        problem, raw, val_batch = st.task, st.raw, st.val
        if self.fuse_step and not st.train:
            raise HoexpError("method.fuse_step=true needs inner_steps >= 1 (it fuses the last inner step)")
        # Fused: the IFT at the weights before the last inner step, on that step's batch, whose create_graph
        # gradient is also the step's gradient; else at the reached weights, on the batch after them.
        plain = st.train[:-1] if self.fuse_step else st.train
        state, _, _ = train_inner(problem, st.inner_opt, st.inner, raw, plain, None, st.on_step, st.step)
        train_batch = st.train[-1] if self.fuse_step else st.extra[0]  # the Hessian's and mixed term's batch
        solver, step = self.solver, int(self.carried.get("step", 0))
        if self.alpha_every:
            lam = self.carried.get("lambda_max") if step % self.alpha_every else None
            # build.py gives alpha_every only to Neumann / fixed point (T1-T2 is a Neumann): AutoStep needs an α
            assert isinstance(solver, (Neumann, FixedPoint)), f"alpha=auto needs an α to set, not {solver.name}"
            solver = AutoStep(solver, lam, seed=step)
        x0 = self.carried.get("u") if self.warm_start else None
        hvp_extra: dict[str, float] = {}
        hvp = self.hvp
        if hvp == "auto":
            if self._hvp_chosen is None:
                t = time_hvp_modes(lambda w, lam: problem.train_loss(w, lam, train_batch), state.params, raw)
                self._hvp_chosen = "fwd_rev" if t["fwd_rev"] < t["rev_rev"] else "rev_rev"
                hvp_extra["solver/fwd_rev_over_rev_rev"] = t["fwd_rev"] / t["rev_rev"]
            hvp = self._hvp_chosen
        if self.compile:
            fn = self._compiled.get(id(problem))
            if fn is None:
                fn = self._compiled[id(problem)] = CompiledIFT(
                    solver,
                    problem.train_loss,
                    problem.val_loss,
                    split=lambda batch: SplitLoss(*problem.train_parts(batch)),
                    curvature=self.curvature.name,
                    hvp="rev_rev" if hvp == "auto" else hvp,
                    damping=self.damping,
                )
            hg, s = fn(state.params, raw, x0, (train_batch,), (val_batch,))
        else:
            # Gauss-Newton needs the loss split at the model's outputs; the Hessian needs only L_T itself (so a
            # task that overrides train_loss alone, e.g. a per-example weighted loss, works with it).
            train_loss = (
                SplitLoss(*problem.train_parts(train_batch))
                if self.curvature.name == "gauss_newton"
                else lambda w, lam: problem.train_loss(w, lam, train_batch)
            )
            hg, s = ift_hypergradient(
                train_loss,
                lambda w, lam: problem.val_loss(w, lam, val_batch),
                state.params,
                raw,
                solver,
                curvature=self.curvature,
                damping=self.damping,
                x0=x0,
                hvp=hvp,
            )
        s.extra.update(hvp_extra)
        if self.fuse_step:
            assert s.train_grad is not None, "the eager IFT returns its training gradient"
            state = step_from_gradient(problem, st.inner_opt, state, raw, s.train_grad, len(plain))
            if st.on_step is not None:
                st.on_step()
        diverged = s.residual is not None and not s.residual <= 1  # worse than u = 0 (residual 1), or NaN
        carried: dict[str, Any] = {}
        if self.warm_start and not diverged:
            carried["u"] = s.solution
        if self.alpha_every:  # after a diverged series α is stale: estimate again next step
            carried.update(step=step + 1, lambda_max=None if diverged else s.extra["solver/lambda_max"])
        self.carried = carried
        return OuterResult(
            hg,
            state,
            with_extra(
                scalars(
                    **{
                        "inner/grad_norm": s.inner_grad_norm,
                        "inner/loss": s.train_loss,
                        "hypergrad/norm": tree.norm(hg),
                        "solver/residual": s.residual,
                        "solver/iterations": s.iterations,
                        "solver/hvps": s.hvps,
                    }
                ),
                s.extra,
            ),
        )


@dataclass
class NoHO:
    """``method=none``: train with the initial hyperparameters; never returns a hypergradient."""

    name: str = "none"

    extra_batches: ClassVar[int] = 0
    returns_hypergradient: ClassVar[bool] = False  # plain training: no hypergradient
    needs_stationary_point: ClassVar[bool] = False
    differentiates_steps: ClassVar[bool] = False
    needs_pathwise_hp: ClassVar[bool] = False  # it differentiates nothing in λ: it trains any family at a fixed value
    refuses_data_parallel: ClassVar[str] = ""

    def __call__(self, s: OuterStep) -> OuterResult:
        state, loss, gnorm = train_inner(s.task, s.inner_opt, s.inner, s.raw, s.train, None, s.on_step, s.step)
        return OuterResult(None, state, inner_scalars(loss, gnorm))


# ------------------------------------------------------------------------------------------- factories
# conf/method/{neumann,cg,fixed_point,exact,t1t2}.yaml name these: one ImplicitMethod, a different solve.
# The keys shared by all (hoexp.method.ift, hoexp.method.functional):
#   curvature: hessian | gauss_newton (Jᵀ H_ℓ J + penalty Hessian: PSD, for non-convex nets)
#   damping: μ ≥ 0, solve with C + μI
#   hvp: rev_rev (a kept create_graph gradient differentiated again), fwd_rev (jvp of grad), or auto (both
#   timed once at the first hypergradient, the faster kept)
#   compile: the hypergradient as one torch.compile'd pure function, checked once against the eager one
#   warm_start (neumann, cg, fixed_point): start each solve from the previous outer step's solution
#   alpha: a step > 0, or auto: 1/λ_max of the (damped) operator by power iteration, re-estimated every
#   alpha_every outer steps (neumann, fixed_point, t1t2)
CurvatureName = Literal["hessian", "gauss_newton"]
HVPMode = Literal["rev_rev", "fwd_rev", "auto"]


def _alpha(alpha: float | str, compile: bool) -> float:
    """A series step: a number > 0 (returned), or ``auto`` (0.01 stands in until the method sets ``α``)."""
    if alpha == "auto":
        if compile:
            raise ValueError(
                "compile=true needs a fixed alpha (alpha=auto's power iteration reads the host); set "
                "method.alpha to a number or method.compile=false"
            )
        return 0.01
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha must be a number > 0 or auto, got {alpha!r}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be > 0, got {float(alpha)} (or alpha=auto: 1/λ_max by power iteration)")
    return float(alpha)


def ift(
    solver: Solver,
    *,
    name: str = "ift",
    curvature: CurvatureName = "hessian",
    damping: NonNegFloat = 0.0,
    hvp: HVPMode = "rev_rev",
    compile: bool = False,
    warm_start: bool = False,
    auto_alpha: bool = False,
    alpha_every: PositiveInt = 10,
    fuse_step: bool = False,
) -> ImplicitMethod:
    """IFT with any linear ``solver`` (``solver(op, b) -> SolveResult``, e.g. your own under ``_target_``)."""
    return ImplicitMethod(
        solver,
        name,
        curvature=CURVATURES[curvature],
        damping=damping,
        warm_start=warm_start,
        alpha_every=alpha_every if auto_alpha else 0,
        hvp=hvp,
        compile=compile,
        fuse_step=fuse_step,
    )


def neumann(
    *,
    terms: NonNegInt = 5,
    alpha: PositiveFloat | Literal["auto"] = 0.01,
    residual: bool = True,
    curvature: CurvatureName = "hessian",
    damping: NonNegFloat = 0.0,
    hvp: HVPMode = "rev_rev",
    compile: bool = False,
    warm_start: bool = False,
    alpha_every: PositiveInt = 10,
    fuse_step: bool = False,
    name: str = "neumann",
) -> ImplicitMethod:
    """``method=neumann``: ``H⁻¹v ≈ α Σ_{j=0..terms} (I − αH)^j v`` (Lorraine et al. 2020)."""
    solver = Neumann(terms, _alpha(alpha, compile), residual)
    return ift(
        solver,
        name=name,
        curvature=curvature,
        damping=damping,
        hvp=hvp,
        compile=compile,
        warm_start=warm_start,
        auto_alpha=alpha == "auto",
        alpha_every=alpha_every,
        fuse_step=fuse_step,
    )


def t1t2(
    *,
    alpha: PositiveFloat | Literal["auto"] = 0.01,
    residual: bool = False,
    curvature: CurvatureName = "hessian",
    damping: NonNegFloat = 0.0,
    hvp: HVPMode = "rev_rev",
    compile: bool = False,
    alpha_every: PositiveInt = 10,
    fuse_step: bool = False,
    name: str = "t1t2",
) -> ImplicitMethod:
    """``method=t1t2``: one-step greedy IFT, ``H⁻¹ ≈ αI`` (Luketina et al. 2016): Neumann with 0 terms."""
    return ift(
        Neumann(0, _alpha(alpha, compile), residual),
        name=name,
        curvature=curvature,
        damping=damping,
        hvp=hvp,
        compile=compile,
        auto_alpha=alpha == "auto",
        alpha_every=alpha_every,
        fuse_step=fuse_step,
    )


def fixed_point(
    *,
    iterations: NonNegInt = 5,
    alpha: PositiveFloat | Literal["auto"] = 0.01,
    residual: bool = True,
    curvature: CurvatureName = "hessian",
    damping: NonNegFloat = 0.0,
    hvp: HVPMode = "rev_rev",
    compile: bool = False,
    warm_start: bool = False,
    alpha_every: PositiveInt = 10,
    fuse_step: bool = False,
    name: str = "fixed_point",
) -> ImplicitMethod:
    """``method=fixed_point``: ``u ← u − α(Hu − v)`` (Grazzi et al. 2020)."""
    if warm_start and iterations == 0:
        raise ValueError("warm_start needs iterations >= 1 (0 would return the carried vector unchanged)")
    return ift(
        FixedPoint(iterations, _alpha(alpha, compile), residual),
        name=name,
        curvature=curvature,
        damping=damping,
        hvp=hvp,
        compile=compile,
        warm_start=warm_start,
        auto_alpha=alpha == "auto",
        alpha_every=alpha_every,
        fuse_step=fuse_step,
    )


def cg(
    *,
    iterations: Annotated[int, Range(ge=1)] = 20,  # 0 returns u = 0: the implicit term of the hypergradient is 0
    tol: NonNegFloat = 1e-10,
    curvature: CurvatureName = "hessian",
    damping: NonNegFloat = 0.0,
    hvp: HVPMode = "rev_rev",
    compile: bool = False,
    warm_start: bool = False,
    fuse_step: bool = False,
    name: str = "cg",
) -> ImplicitMethod:
    """``method=cg``: conjugate gradient on ``Hu = v`` (HOAG, Pedregosa 2016)."""
    return ift(
        ConjugateGradient(iterations, tol),
        name=name,
        curvature=curvature,
        damping=damping,
        hvp=hvp,
        compile=compile,
        warm_start=warm_start,
        fuse_step=fuse_step,
    )


def exact(
    *,
    max_params: PositiveInt = 20_000,
    curvature: CurvatureName = "hessian",
    damping: NonNegFloat = 0.0,
    hvp: HVPMode = "rev_rev",
    compile: bool = False,
    fuse_step: bool = False,
    name: str = "exact",
) -> ImplicitMethod:
    """``method=exact``: a dense solve; ``O(P²)`` memory, ``O(P³)`` time, refused above ``max_params``."""
    return ift(
        Exact(max_params),
        name=name,
        curvature=curvature,
        damping=damping,
        hvp=hvp,
        compile=compile,
        fuse_step=fuse_step,
    )
