"""Runner-facing IFT methods (``neumann``, ``cg``, ``fixed_point``, ``exact``, ``t1t2``) and ``none``."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import Tensor

from hoexp import tree
from hoexp.components import CheckContext, NonNegFloat, PositiveInt
from hoexp.errors import ConfigError, HoexpError
from hoexp.method import solvers
from hoexp.method.base import inner_scalars, scalars, step_from_gradient, train_inner
from hoexp.method.curvature import CURVATURES, Curvature, Hessian, SplitLoss
from hoexp.method.ift import CompiledIFT, IFTStats, ift_hypergradient
from hoexp.method.products import PRODUCT_MODES, ProductMode, RevRev
from hoexp.method.solvers import AutoStep, Exact, FixedPoint, Neumann, Solver
from hoexp.types import OuterResult, OuterStep

Params = dict[str, Tensor]


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

    Speed options (same answer up to rounding), as :func:`ift` has them: ``hvp`` (``auto`` logs its timing ratio as
    ``solver/fwd_rev_over_rev_rev``) and ``compile`` (:class:`~hoexp.method.ift.CompiledIFT`: compiled once per run,
    checked once against the eager path, which it falls back to on a failure or a disagreement).
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
    hvp: ProductMode = RevRev()  # how H v is formed (hoexp.method.products)
    compile: bool = False
    fuse_step: bool = False
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
        if self.fuse_step and not st.train:
            raise HoexpError("method.fuse_step=true needs inner_steps >= 1 (it fuses the last inner step)")
        # Fused: the IFT at the weights before the last inner step, on that step's batch, whose create_graph
        # gradient is also the step's gradient; else at the reached weights, on the batch after them.
        plain = st.train[:-1] if self.fuse_step else st.train
        state, _, _ = train_inner(st.task, st.inner_opt, st.inner, st.raw, plain, None, st.on_step, st.step)
        train_batch = st.train[-1] if self.fuse_step else st.extra[0]  # the Hessian's and mixed term's batch
        step = int(self.carried.get("step", 0))
        solver = self.solver
        if self.alpha_every:
            lam = self.carried.get("lambda_max") if step % self.alpha_every else None
            # ift() gives alpha_every only to Neumann / fixed point (T1-T2 is a Neumann): AutoStep needs an α
            assert isinstance(solver, (Neumann, FixedPoint)), f"alpha=auto needs an α to set, not {solver.name}"
            solver = AutoStep(solver, lam, seed=step)
        x0 = self.carried.get("u") if self.warm_start else None
        hg, s = self._hypergradient(st.task, state.params, st.raw, train_batch, st.val, solver, x0)
        if self.fuse_step:
            assert s.train_grad is not None, "the eager IFT returns its training gradient"
            state = step_from_gradient(st.task, st.inner_opt, state, st.raw, s.train_grad, len(plain))
            if st.on_step is not None:
                st.on_step()
        diverged = s.residual is not None and not s.residual <= 1  # worse than u = 0 (residual 1), or NaN
        carried: dict[str, Any] = {}
        if self.warm_start and not diverged:
            carried["u"] = s.solution
        if self.alpha_every:  # after a diverged series α is stale: estimate again next step
            carried.update(step=step + 1, lambda_max=None if diverged else s.extra["solver/lambda_max"])
        self.carried = carried
        named = {"inner/grad_norm": s.inner_grad_norm, "inner/loss": s.train_loss, "hypergrad/norm": tree.norm(hg)}
        solve = {"solver/residual": s.residual, "solver/iterations": s.iterations, "solver/hvps": s.hvps}
        return OuterResult(hg, state, {**scalars(**named, **solve), **{k: float(v) for k, v in s.extra.items()}})

    def _hypergradient(
        self, task: Any, params: Params, raw: Params, train_batch: Any, val_batch: Any, solver: Solver, x0: Any
    ) -> tuple[Params, IFTStats]:
        """The IFT at ``params``: compiled (one :class:`CompiledIFT` per task) or eager, with the product mode
        ``hvp`` resolves to here (``auto``: timed at the first call; what it logs then joins the stats)."""
        hvp, extra = self.hvp.resolve(lambda w, lam: task.train_loss(w, lam, train_batch), params, raw)
        split = getattr(self.curvature, "needs_split_loss", False)
        if self.compile:
            fn = self._compiled.get(id(task))
            if fn is None:
                fn = self._compiled[id(task)] = CompiledIFT(
                    solver,
                    task.train_loss,
                    task.val_loss,
                    split=lambda batch: SplitLoss(*task.train_parts(batch)),
                    curvature=self.curvature.name,
                    hvp=hvp,
                    damping=self.damping,
                )
            hg, s = fn(params, raw, x0, (train_batch,), (val_batch,))
        else:
            # Gauss-Newton needs the loss split at the model's outputs; the Hessian needs only L_T itself (so a
            # task that overrides train_loss alone, e.g. a per-example weighted loss, works with it).
            train_loss = (
                SplitLoss(*task.train_parts(train_batch))
                if split
                else lambda w, lam: task.train_loss(w, lam, train_batch)
            )
            val_loss = lambda w, lam: task.val_loss(w, lam, val_batch)  # noqa: E731
            hg, s = ift_hypergradient(
                train_loss,
                val_loss,
                params,
                raw,
                solver,
                curvature=self.curvature,
                damping=self.damping,
                x0=x0,
                hvp=hvp,
            )
        s.extra.update(extra)
        return hg, s


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
CurvatureName = Literal["hessian", "gauss_newton"]
HVPMode = Literal["rev_rev", "fwd_rev", "auto"]  # the spellings of hoexp.method.products.PRODUCT_MODES


def ift(
    solver: Solver,
    *,
    curvature: CurvatureName | Curvature = "hessian",
    damping: NonNegFloat = 0.0,
    hvp: HVPMode | ProductMode = "rev_rev",
    compile: bool = False,
    warm_start: bool = False,
    alpha_every: PositiveInt = 10,
    fuse_step: bool = False,
    name: str = "ift",
) -> ImplicitMethod:
    """The IFT method, its parts nested: ``solver`` (``solver(op, b) -> SolveResult``: a ``_target_`` node such as
    ``hoexp.method.solvers.cg``, or your own), ``curvature`` (``hessian``, ``gauss_newton``, or a node of your own:
    :class:`~hoexp.method.curvature.Curvature`), ``damping`` ``μ ≥ 0`` (solve with ``C + μI``) and ``hvp``, the
    product mode (``rev_rev``: through a kept ``create_graph`` gradient; ``fwd_rev``: ``jvp`` of ``grad``; ``auto``:
    both timed once at the first hypergradient, the faster kept; or a node of your own:
    :class:`~hoexp.method.products.ProductMode`). ``compile``: the hypergradient as one
    ``torch.compile``'d pure function, checked once against the eager one. ``warm_start``: start each solve from the
    previous outer step's solution. A solver with ``alpha=auto`` (:class:`AutoStep`) re-estimates ``α = 1/λ_max``
    every ``alpha_every`` outer steps. ``fuse_step``: the IFT before the last inner step, which reuses its gradient.
    The shipped methods (``method=neumann``, ``cg``, ...) are this factory with their solver's options beside its
    own (:func:`_with_solver`)."""
    auto = isinstance(solver, AutoStep)
    if auto and compile:
        raise ValueError(
            "compile=true needs a fixed alpha (alpha=auto's power iteration reads the host); set "
            "method.alpha to a number or method.compile=false"
        )
    curv = CURVATURES[curvature] if isinstance(curvature, str) else curvature
    mode = PRODUCT_MODES[hvp]() if isinstance(hvp, str) else hvp
    if compile and CURVATURES.get(curv.name) != curv:  # the compiled form knows the two pure products
        raise ValueError(
            f"compile=true takes curvature=hessian or gauss_newton, not {curv!r}; set method.compile=false"
        )
    inner = solver.solver if isinstance(solver, AutoStep) else solver
    if warm_start and getattr(inner, "iterations", 1) == 0:  # a series from x0 with no step returns x0
        raise ValueError("warm_start needs iterations >= 1 (0 would return the carried vector unchanged)")
    return ImplicitMethod(
        inner,
        name,
        curvature=curv,
        damping=damping,
        warm_start=warm_start,
        alpha_every=alpha_every if auto else 0,
        hvp=mode,
        compile=compile,
        fuse_step=fuse_step,
    )


def _with_solver(solve: Callable[..., Solver], name: str) -> Callable[..., ImplicitMethod]:
    """``method=<name>``: :func:`ift` with the solver ``solve(**its options)``, the solver's options and the IFT's
    side by side in one signature (``method.terms=…`` next to ``method.damping=…``, as users type them), each
    default written once: the solver's in ``solve``, the IFT's in :func:`ift` (torchopt's ``solve_cg(**kw)``)."""
    own = typing.get_type_hints(solve, include_extras=True)
    hints = typing.get_type_hints(ift, include_extras=True)
    solver_params = [p.replace(annotation=own[p.name]) for p in inspect.signature(solve).parameters.values()]
    hints["curvature"] = CurvatureName  # a preset names its curvature (a node passes unchecked, as for ift)
    hints["hvp"] = HVPMode  # and its product mode
    ift_params = [
        p.replace(annotation=hints[p.name], default=name if p.name == "name" else p.default)
        for p in inspect.signature(ift).parameters.values()
        if p.name != "solver"
    ]
    keys = {p.name for p in solver_params}

    def factory(**options: Any) -> ImplicitMethod:
        return ift(solve(**{k: options.pop(k) for k in keys & set(options)}), **options)

    factory.__signature__ = inspect.Signature(solver_params + ift_params, return_annotation=ImplicitMethod)  # type: ignore[attr-defined]
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = solve.__doc__
    return factory


neumann = _with_solver(solvers.neumann, "neumann")
t1t2 = _with_solver(solvers.t1t2, "t1t2")
fixed_point = _with_solver(solvers.fixed_point, "fixed_point")
cg = _with_solver(solvers.cg, "cg")
exact = _with_solver(solvers.exact, "exact")
