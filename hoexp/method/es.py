"""Evolution-strategies hypergradients over truncated unrolls (``method=pes``): PES, NRES and truncated ES.

One outer step is one truncation of ``K = inner_steps`` training steps. The engine's inner state (the
*central* run, trained at the current raw hyperparameters ``λ``) advances plainly, as under the IFT
methods: it is the model the run evaluates and returns. Beside it the method carries ``N`` *particles*,
each its own copy of the weights and inner-optimizer state, trained over the same batches (common
random numbers: the same examples and dropout noise ``u``; a mask is a deterministic function of
``(u, λ)``) at ``λ + σ ε_i``, ``ε_i ~ N(0, I)``; with ``antithetic`` the particles come in pairs
``±ε``. ``L_i`` is particle ``i``'s validation loss at the end of the truncation, and::

    ĝ = 1/(Nσ) Σ_i v_i L_i          (antithetic: 1/(Nσ) Σ_pairs v_j (L_j⁺ − L_j⁻))

* ``variant=pes`` (Vicol, Metz & Sohl-Dickstein, ICML 2021): fresh ``ε_i`` every truncation, particle
  states persist, ``v_i = ξ_i`` with ``ξ_i ← ξ_i + ε_i`` (all of the particle's perturbations since its
  inner run started). Unbiased for the gradient of the Gaussian-smoothed loss of the whole run so far
  (each truncation's ``λ`` perturbed independently), whatever the truncation length.
* ``variant=nres`` (noise-reuse ES; Li, Harrison, Sohl-Dickstein, Smith & Metz, NeurIPS 2023): ``ε_i``
  drawn once per inner run and reused in every truncation, particle states persist, ``v_i = ε_i``.
  Unbiased for the gradient of the loss smoothed with one perturbation for the whole run, with lower
  variance than PES where the loss forgets early truncations (``ξ``'s variance grows with their count).
* ``variant=tes`` (truncated ES, the biased baseline): fresh ``ε_i`` and particles restarted from the
  central state every truncation, ``v_i = ε_i``: it ignores how earlier truncations' ``λ`` shaped the
  state (short-horizon bias).

With ``λ`` held fixed, the sum over truncations of the estimates is unbiased for the gradient of the
smoothed total validation loss (PES, NRES; ``tests/test_pes.py`` checks it on a linear recursion). Only
losses are needed: no derivative with respect to ``λ`` is taken, so any family works (discrete masks,
learning rates, hyperparameters no derivative reaches). Perturbations are not clamped to the family's
bounds (the smoothed objective is the unconstrained one's).

Particles start as copies of the central state at the method's first call and whenever the inner run
restarts (``reset_inner``: ``load_state_dict({})``). Their weights, optimizer states, ``ξ`` / ``ε`` and
the perturbations' generator (seeded from the run's seed) are checkpointed (:class:`CarriesState`),
so a resumed run continues bit for bit.

Cost per outer step: ``(N + 1)·K`` training steps and ``N`` validation losses; memory ``N`` copies of the
weights and optimizer state. ``vectorize``: the particles' steps as one ``torch.func.vmap`` over stacked
weights, optimizer states and ``λ``\\s (in the run's dtype: ``precision`` and ``compile`` apply to the
central run only); else a loop of plain training steps (:func:`~hoexp.method.base.train_inner`, which
``precision``, ``compile`` and data-parallel runs apply to).

Several processes (``torchrun``): with ``spread`` (the default) the particles are spread over the ranks: each
draws every perturbation (one generator, seeded alike), trains the central run and its ``N / ranks`` particles on
whole batches, and all-gathers their weights, optimizer states and losses, so every rank holds the whole population
(rank 0 checkpoints it) and computes the same estimate as one process, at ``1 / ranks`` of the particles' cost
each. ``spread=false``: data-parallel instead (loop only), every rank training every particle on its shard,
gradients and validation losses averaged over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.func import grad, vmap

from hoexp import tree
from hoexp.components import BuildContext, PositiveFloat, PositiveInt
from hoexp.errors import HoexpError
from hoexp.method.base import inner_scalars, train_inner
from hoexp.optim import Optimizer
from hoexp.task.base import Task
from hoexp.types import InnerState, OuterResult, OuterStep, Ranks, Stepper

VARIANTS = ("pes", "nres", "tes")
PERTURBATION_SEED = 2_000_029  # offset of the perturbations' generator from the run's seed (hoexp.task.streams')

Tree = Any  # a tensor or a nested dict of tensors


# ------------------------------------------------------------------------------------------ stacked trees
def _map(fn: Callable[[Tensor], Tensor], x: Tree) -> Tree:
    return fn(x) if isinstance(x, Tensor) else {k: _map(fn, v) for k, v in x.items()}


def _pick(x: Tree, index: int | slice) -> Tree:
    """Particle(s) ``index`` of a stacked tree."""
    return _map(lambda t: t[index], x)


def _stack(xs: Sequence[Tree]) -> Tree:
    """Trees of the same structure stacked along a new dimension 0."""
    if isinstance(xs[0], Tensor):
        return torch.stack(list(xs))
    return {k: _stack([x[k] for x in xs]) for k in xs[0]}


def _tile(x: Tree, n: int) -> Tree:
    """``n`` copies of a tree, stacked (fresh memory)."""
    return _map(lambda t: t.detach().unsqueeze(0).expand(n, *t.shape).clone(), x)


def _split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer state's tensors (and dicts of tensors) and the rest (step counters, shared by the particles)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, (Tensor, dict))}
    return tensors, {k: v for k, v in state.items() if k not in tensors}


# ---------------------------------------------------------------------------------------- particle steps
def vmapped_training(
    task: Task,
    inner_opt: Optimizer,
    params: Tree,
    opt_state: Tree,
    rest: dict[str, Any],
    raws: dict[str, Tensor],
    batches: Sequence[tuple],
) -> tuple[Tree, Tree, dict[str, Any]]:
    """``len(batches)`` training steps of every particle at once: ``torch.func.vmap`` over the stacked weights,
    optimizer tensors and raw hyperparameters (dimension 0), the batches shared. Returns the new stacked
    weights and optimizer tensors and the optimizer state's shared rest. Cost: one batched forward and backward
    pass per step."""
    for t, batch in enumerate(batches):
        captured: dict[str, Any] = {}

        def one(w: Tree, s: Tree, r: dict[str, Tensor], batch: tuple = batch, t: int = t) -> tuple[Tree, Tree]:
            g = grad(lambda w_: task.train_loss(w_, r, batch))(w)
            new_w, new_s = inner_opt.update(w, g, {**s, **rest}, **task.family.optimizer_overrides(r, t))
            tensors, captured["rest"] = _split_state(new_s)
            return new_w, tensors

        params, opt_state = vmap(one)(params, opt_state, raws)
        rest = captured["rest"]
    return params, opt_state, rest


def looped_training(
    task: Task,
    inner_opt: Optimizer,
    params: Tree,
    opt_state: Tree,
    rest: dict[str, Any],
    raws: dict[str, Tensor],
    batches: Sequence[tuple],
    step: Stepper | None = None,
) -> tuple[Tree, Tree, dict[str, Any]]:
    """:func:`vmapped_training` one particle at a time, each by :func:`~hoexp.method.base.train_inner` (the
    central run's plain steps ``step``: compiled, mixed-precision or data-parallel where the run is)."""
    n = next(iter(raws.values())).shape[0]
    out_w, out_s = [], []
    for i in range(n):
        start = InnerState(_pick(params, i), {**_pick(opt_state, i), **rest})
        state, _, _ = train_inner(task, inner_opt, start, _pick(raws, i), batches, None, None, step)
        tensors, new_rest = _split_state(state.opt_state)
        out_w.append(state.params)
        out_s.append(tensors)
    return _stack(out_w), _stack(out_s), new_rest


def particle_losses(task: Task, params: Tree, raws: dict[str, Tensor], batch: tuple, vectorize: bool) -> Tensor:
    """``L_V`` of every particle on ``batch`` (a vector; averaged over the ranks of a data-parallel run)."""
    with torch.no_grad():
        if vectorize:
            losses = vmap(lambda w, r: task.val_loss(w, r, batch))(params, raws)
        else:
            n = next(iter(raws.values())).shape[0]
            losses = torch.stack([task.val_loss(_pick(params, i), _pick(raws, i), batch) for i in range(n)])
    mean = getattr(task, "mean_across_ranks", None)  # the task as a data-parallel run presents it (engine.runtime)
    return losses if mean is None else mean(losses)


def _share(n: int, ranks: Ranks) -> slice:
    """Rank ``ranks.rank``'s particles of ``n``: a contiguous ``n / ranks.size`` of them."""
    size = n // ranks.size
    return slice(ranks.rank * size, (ranks.rank + 1) * size)


def es_estimate(losses: Tensor, directions: Mapping[str, Tensor], sigma: float) -> dict[str, Tensor]:
    """``ĝ = 1/(Nσ) Σ_i v_i L_i`` for the ``N`` particles' losses and directions ``v_i`` (dimension 0)."""
    n = losses.shape[0]
    return {k: torch.tensordot(losses.to(v.dtype), v, dims=1) / (n * sigma) for k, v in directions.items()}


# ---------------------------------------------------------------------------------------------- the method
@dataclass
class ESMethod:
    """``method=pes`` (module doc): ``variant`` pes | nres | tes, ``particles`` N (pairs ``±ε`` with
    ``antithetic``), perturbation scale ``sigma`` on the raw hyperparameters, ``vectorize`` (vmap or loop),
    ``seed`` of the perturbations' generator (the run's), ``spread`` the particles over the ranks of a
    multi-process run (else data-parallel)."""

    variant: str = "pes"
    particles: int = 8
    sigma: float = 0.1
    antithetic: bool = True
    vectorize: bool = True
    seed: int = 0
    name: str = "pes"
    spread: bool = True
    carried: dict[str, Any] = field(default_factory=dict, repr=False)  # the particles (see state_dict)
    _generator: torch.Generator = field(init=False, repr=False)
    _vmap_checked: bool = field(default=False, init=False, repr=False)

    extra_batches: ClassVar[int] = 0
    needs_stationary_point: ClassVar[bool] = False  # losses only: any family, path-only ones (lr) included
    needs_pathwise_hp: ClassVar[bool] = False  # no derivative in λ: discrete (Bernoulli) masks are fine
    differentiates_steps: ClassVar[bool] = False  # the central run's steps are plain ones (compile, precision)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown ES variant '{self.variant}'; valid: {', '.join(VARIANTS)}")
        if self.particles < 1 or (self.antithetic and self.particles % 2):
            raise ValueError(
                f"antithetic=true pairs the particles (±ε): particles must be even, got {self.particles}; "
                "set method.particles to an even number or method.antithetic=false"
            )
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        self._generator = torch.Generator().manual_seed(self.seed + PERTURBATION_SEED)

    @property
    def spreads_over_ranks(self) -> bool:
        """Whether several processes share the particles (``spread``) rather than each batch (data-parallel)."""
        return self.spread

    def refuses_ranks(self, size: int) -> str:
        """Why the particles cannot be spread over ``size`` ranks ("" when they can)."""
        if self.particles % size:
            return (
                f"method.particles={self.particles} cannot be spread evenly over them; use a multiple of {size}, or "
                "method.spread=false (data-parallel)"
            )
        return ""

    @property
    def refuses_data_parallel(self) -> str:
        """Why this configuration cannot run data-parallel ("" when it can: the loop, or spread over the ranks)."""
        if self.vectorize and not self.spread:
            return "vmaps its particles' training steps, which cannot all-reduce inside torch.func"
        return ""

    @property
    def carries(self) -> bool:
        """Whether an outer step's answer depends on earlier ones beyond the generator (PES, NRES: the particles)."""
        return self.variant != "tes"

    # CarriesState: the particles (stacked weights ``params``, optimizer tensors ``opt`` and its shared ``rest``,
    # the directions ``noise``: ξ for PES, ε for NRES) and the generator's state ``rng``. ``{}`` drops the particles
    # (the inner run restarted); the generator goes on.
    def state_dict(self) -> dict[str, Any]:
        return {**self.carried, "rng": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        rng = state.pop("rng", None)
        if rng is not None:
            self._generator.set_state(rng)
        self.carried = state

    def _draw(self, raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``ε`` for every particle (``±`` halves with ``antithetic``), shaped ``[N, *λ_k.shape]``."""
        n = self.particles // 2 if self.antithetic else self.particles
        out = {}
        for k, v in raw.items():
            e = torch.randn((n, *v.shape), generator=self._generator, dtype=v.dtype).to(v.device)
            out[k] = torch.cat([e, -e]) if self.antithetic else e
        return out

    def _start(self, st: OuterStep) -> dict[str, Any]:
        """Particles at the central state before this truncation, with their first directions."""
        tensors, rest = _split_state(st.inner.opt_state)
        n = self.particles
        noise = (
            self._draw(st.raw)
            if self.variant == "nres"
            else {k: torch.zeros((n, *v.shape), dtype=v.dtype, device=v.device) for k, v in st.raw.items()}
        )
        return {"params": _tile(st.inner.params, n), "opt": _tile(tensors, n), "rest": rest, "noise": noise}

    def _sharing(self, st: OuterStep) -> Ranks | None:
        """The ranks this step's particles are spread over; None: this process trains them all."""
        return st.ranks if self.spread and st.ranks is not None and st.ranks.size > 1 else None

    def _train(self, st: OuterStep, particles: dict[str, Any], raws: dict[str, Tensor]) -> tuple[Tree, Tree, dict]:
        """The particles' ``K`` training steps; spread over ``st.ranks``: this rank's share, then all of them."""
        ranks = self._sharing(st)
        if ranks is None:
            return self._train_share(st, particles, raws)
        mine = _share(self.particles, ranks)
        share = {**particles, "params": _pick(particles["params"], mine), "opt": _pick(particles["opt"], mine)}
        params, opt, rest = self._train_share(st, share, _pick(raws, mine))
        return _map(ranks.gather, params), _map(ranks.gather, opt), rest

    def _losses(self, st: OuterStep, params: Tree, raws: dict[str, Tensor]) -> Tensor:
        """Every particle's validation loss; spread over ``st.ranks``: each rank's share, gathered."""
        ranks = self._sharing(st)
        if ranks is None:
            return particle_losses(st.task, params, raws, st.val, self.vectorize)
        mine = _share(self.particles, ranks)
        return ranks.gather(particle_losses(st.task, _pick(params, mine), _pick(raws, mine), st.val, self.vectorize))

    def _train_share(
        self, st: OuterStep, particles: dict[str, Any], raws: dict[str, Tensor]
    ) -> tuple[Tree, Tree, dict]:
        args = (st.task, st.inner_opt, particles["params"], particles["opt"], dict(particles["rest"]), raws, st.train)
        if not self.vectorize:
            return looped_training(*args, st.step)
        if self._vmap_checked:
            return vmapped_training(*args)
        try:  # the first call: an operation vmap cannot batch is reported in one line
            out = vmapped_training(*args)
        except (RuntimeError, NotImplementedError) as e:
            raise HoexpError(
                f"method.vectorize=true: torch.func.vmap failed on the particles' training step ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); set method.vectorize=false"
            ) from e
        self._vmap_checked = True
        return out

    def __call__(self, st: OuterStep) -> OuterResult:
        central, loss, gnorm = train_inner(st.task, st.inner_opt, st.inner, st.raw, st.train, None, st.on_step, st.step)
        fresh = self.variant == "tes" or "params" not in self.carried
        particles = self._start(st) if fresh else self.carried
        if self.variant == "nres":
            perturbation = directions = particles["noise"]
        else:
            perturbation = self._draw(st.raw)
            directions = (
                {k: particles["noise"][k] + e for k, e in perturbation.items()}
                if self.variant == "pes"
                else perturbation
            )
        raws = {k: v.detach().unsqueeze(0) + self.sigma * perturbation[k] for k, v in st.raw.items()}
        params, opt, rest = self._train(st, particles, raws)
        losses = self._losses(st, params, raws)
        hg = es_estimate(losses, directions, self.sigma)
        self.carried = (
            {} if self.variant == "tes" else {"params": params, "opt": opt, "rest": rest, "noise": directions}
        )
        mean, std, dnorm, hnorm = torch.stack(
            [
                losses.mean(),
                losses.std() if losses.numel() > 1 else torch.zeros_like(losses[0]),
                tree.norm(directions).to(losses.dtype) / self.particles**0.5,
                tree.norm(hg).to(losses.dtype),
            ]
        ).tolist()
        return OuterResult(
            hg,
            central,
            {
                **inner_scalars(loss, gnorm),
                "hypergrad/norm": hnorm,
                "es/val_loss_mean": mean,
                "es/val_loss_std": std,
                "es/direction_norm": dnorm,  # RMS over particles of ‖v_i‖: PES's ξ grows like √(truncations)
            },
        )


def pes(
    ctx: BuildContext,
    *,
    variant: Literal["pes", "nres", "tes"] = "pes",
    particles: PositiveInt = 8,
    sigma: PositiveFloat = 0.1,
    antithetic: bool = True,
    vectorize: bool = True,
    spread: bool = True,
    name: str = "pes",
) -> ESMethod:
    """``method=pes``: ES over truncations of ``inner_steps``: PES, noise-reuse ES or truncated ES (``variant``)
    with ``particles`` perturbed copies of the inner run (``±σε`` pairs with ``antithetic``), vmapped or looped
    (``vectorize``), spread over the ranks of a multi-process run (``spread``; else data-parallel); the
    perturbations are seeded from the run's seed."""
    return ESMethod(variant, particles, sigma, antithetic, vectorize, seed=ctx.seed, name=name, spread=spread)
