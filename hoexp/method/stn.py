"""Self-tuning networks (``method=stn``): a best response ``ŵ(λ)`` fitted on perturbed hyperparameters,
and the hypergradient taken through it (MacKay et al., ICLR 2019; Δ-STN: Bae & Grosse, NeurIPS 2020).

The structured response is STN's hyper-conditioned layer ``W0 x + s(λ) ⊙ (W1 x)`` written on the
weights, so it needs no model code: for every covered parameter ``p`` with ``n_p`` output units (its
leading dimension; a 0-d tensor is one unit)::

    ŵ_p(λ) = W0_p + (V_p δ) ⊙_rows W1_p,    δ = λ − λ0    (the H raw hyperparameters, flat)

with ``V_p`` an ``n_p × H`` matrix and ``W1_p`` shaped like ``p``. ``ŵ(λ0) = W0`` exactly, so the
engine's weights are the model at the centre (the one evaluated and returned), and the response is
linear in λ around it (Δ-STN's centred parameterization). The response's gradients are scaled by ``1/σ²``:
over perturbations of size σ its loss moves by O(σ²), and without the scale the fit of ``W1`` and
``V`` (whose target ``dw*/dλ`` does not depend on σ) slows down as σ².

Each outer step, on the batches the engine drew:

1. ``inner_steps`` training steps, step ``t`` at its own ``λ̃ = clamp(λ0 + σε)``, ``ε ~ N(0, I)``:

   * ``variant=stn``: one gradient of ``L_T(ŵ(λ̃), λ̃)`` updates ``W0``, ``W1`` and ``V`` together;
   * ``variant=delta``: a plain step of ``W0`` on ``L_T(W0, λ0)``, then a step of ``W1, V`` on the
     training loss at ``λ̃`` with the model's outputs linearized in the response (``linearize``):
     ``f(W0 + Δ) ≈ f(W0) + J_w f(W0)·Δ`` (one ``jvp``), ``Δ = ŵ(λ̃) − W0``.

   ``antithetic``: odd steps reuse the even steps' ε, negated, so what a non-stationary ``W0`` adds to
   the response's gradient (``δ · ∇L_T(W0)``, zero-mean but O(1/σ) after the scale) cancels in pairs.
   Dropout masks at ``λ̃`` are the family's (hard 0/1 masks with a Bernoulli relaxation): nothing
   differentiates a mask, so any family that moves the training optimum can be tuned.
2. The hypergradient ``∇_λ L_V(ŵ(λ), λ)`` at ``λ0`` on the validation batch: the direct term plus
   ``∂L_V/∂w · ∂ŵ/∂λ`` with ``∂ŵ_p/∂λ = V_p ⊙_rows W1_p``. It never differentiates a training step.

``hold``: the first ``hold`` outer steps the method runs (counted over the run) fit the response with λ
held (no outer update; the hypergradient is still logged). A response starts flat (``V = 0``), so the first
hypergradients after a warm-up go through a response fitted on a few dozen perturbed steps; STN's authors
train it for a while before the first hyper-step for the same reason.

``recentre``: at the next outer step, once the outer optimizer moved ``λ0``, ``W0 ← ŵ(λ0_new)`` (the
response's own prediction of the weights there; ``ŵ`` as a function of λ is unchanged: the uncentred
STN). ``W1``, ``V``, their optimizer state and the last centre are carried (:class:`CarriesState`).

Cost per inner step, in passes over the batch: ``stn`` ≈ 1 (on ``ŵ``) plus O(P + Σ n_p H) to form
``ŵ`` and a second optimizer update; ``delta`` ≈ 1 plain pass plus a linearized one (forward, ``jvp``
and backward). The hypergradient is one validation gradient. Memory: ``W1`` (P) and ``V`` (Σ n_p · H),
with their optimizer state. Measured on ``experiment=mnist_dropout`` (CPU time per outer step, one
thread): ``stn`` 1.5×, ``delta`` 3.4× (2.4× with ``linearize=false``) that of ``method=none``.

Defaults: ``variant=stn`` and ``σ = 1`` (Δ-STN's initial scale on dropout logits). On the MNIST preset
with near-hard masks (concrete, τ = 10⁻³) the joint step ended below a fixed rate of 0.3 in validation
and test loss on seeds 0-2, while ``delta`` pushed a hidden rate to ~0.9 within 30 outer steps and its
response diverged (with and without ``recentre``; at outer lr 0.3 and 0.1). With the preset's Gaussian
masks, whose noise grows without bound with the rate, σ = 1 diverged at outer step 92 (σ = 0.5 finished).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.func import jvp

from hoexp import tree
from hoexp.components import BuildContext, CheckContext, NonNegInt, PositiveFloat, PositiveInt
from hoexp.errors import ConfigError
from hoexp.hp.base import select
from hoexp.method.base import gradients
from hoexp.task.base import Task
from hoexp.types import InnerState, OuterResult, OuterStep

__all__ = ["STN", "init_response", "perturbation", "respond", "stn", "stn_hypergradient"]

Params = dict[str, Tensor]
W1, V = "w1:", "v:"  # key prefixes of the response weights in one dict (what the inner optimizer updates)
SEED_OFFSET = 7_919  # keeps the perturbations' stream apart from the batches' and the dropout noise's


def units(p: Tensor) -> int:
    """Output units of a parameter: its leading dimension (1 for a 0-d tensor)."""
    return p.shape[0] if p.ndim else 1


def init_response(
    params: Mapping[str, Tensor], names: Sequence[str], n_hparams: int, generator: torch.Generator
) -> Params:
    """``W1_p ~ U(±1/√fan_in)`` (``fan_in`` = entries per unit; the layer's own initialization, as STN's) and
    ``V_p = 0`` (Δ-STN: the response starts flat) for every covered parameter ``p``."""
    out: Params = {}
    for k in names:
        p = params[k]
        bound = 1.0 / math.sqrt(max(p.numel() // units(p), 1))
        u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
        out[W1 + k] = ((2 * u - 1) * bound).to(p.dtype).to(p.device)
        out[V + k] = torch.zeros(units(p), n_hparams, dtype=p.dtype, device=p.device)
    return out


def shift(response: Mapping[str, Tensor], delta: Tensor) -> Params:
    """``Δ_p = (V_p δ) ⊙_rows W1_p`` for every covered parameter (keys without prefix)."""
    out: Params = {}
    for key, v in response.items():
        if key.startswith(V):
            k = key[len(V) :]
            w1 = response[W1 + k]
            s = v @ delta  # [n_p]: one scale per output unit
            out[k] = (s.reshape(s.shape + (1,) * (w1.ndim - 1)) if w1.ndim else s[0]) * w1
    return out


def respond(params: Mapping[str, Tensor], response: Mapping[str, Tensor], delta: Tensor) -> Params:
    """``ŵ = W0 + Δ(δ)`` (uncovered parameters as they are); ``δ = 0`` gives ``W0`` exactly."""
    shifts = shift(response, delta)
    return {k: (p + shifts[k] if k in shifts else p) for k, p in params.items()}


def offset(raw: Mapping[str, Tensor], centre: Mapping[str, Tensor]) -> Tensor:
    """``δ = λ − λ0`` flat, in the order of ``raw`` (differentiable in ``raw``)."""
    return tree.flatten(raw[k] - centre[k] for k in raw)


def perturbation(
    family: Any, raw: Mapping[str, Tensor], sigma: float, generator: torch.Generator, sign: float = 1.0
) -> tuple[Params, Tensor]:
    """``λ̃ = clamp(λ0 + sign·σε)``, ``ε ~ N(0, I)`` (drawn on the CPU, then moved: the same on every device),
    and its offset ``δ = λ̃ − λ0`` (after the clamp: the response sees the λ̃ the loss uses)."""
    scale = sign * sigma
    noisy = {
        k: r + scale * torch.randn(r.shape, generator=generator, dtype=torch.float64).to(r.dtype).to(r.device)
        for k, r in raw.items()
    }
    lam = family.clamp(noisy)
    return lam, offset(lam, raw)


def stn_hypergradient(
    task: Task, params: Mapping[str, Tensor], response: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: tuple
) -> tuple[Params, Tensor]:
    """``∇_λ L_V(ŵ(λ), λ; batch)`` at ``λ = λ0 = raw``: the direct term and the one through the response.
    Returns it (detached, shaped like ``raw``) and ``L_V``. Cost: one forward and backward pass."""
    lam = tree.detached(raw, requires_grad=True)
    w = respond(tree.detached(params), tree.detached(response), offset(lam, tree.detached(raw)))
    loss = task.val_loss(w, lam, batch)
    return dict(zip(lam, gradients(loss, list(lam.values())))), loss.detach()


def _grads(loss: Tensor, inputs: Mapping[str, Tensor]) -> Params:
    values = list(inputs.values())
    return dict(zip(inputs, tree.fill_none(torch.autograd.grad(loss, values, allow_unused=True), values)))


def linearized_loss(
    task: Task,
    w0: Mapping[str, Tensor],
    response: Mapping[str, Tensor],
    lam: Mapping[str, Tensor],
    delta: Tensor,
    batch: tuple,
) -> Tensor:
    """Δ-STN's response objective: ``ℓ(f(W0) + J_w f(W0)·Δ) + penalty(W0 + Δ, λ̃)``, with the outputs ``f`` and
    the data loss ``ℓ`` of ``task.train_parts`` and the masks at ``λ̃``; differentiable in the response only."""
    outputs, output_loss, penalty = task.train_parts(batch)
    shifts = shift(response, delta)
    base = {k: w0[k] for k in shifts}

    def f(d: Mapping[str, Tensor]) -> Tensor:
        return outputs({**w0, **d}, lam)

    out = jvp(f, (base,), (shifts,))  # (f(W0), J_w f · Δ)
    y, dy = out[0], out[1]
    return output_loss(y + dy) + penalty({k: (p + shifts[k] if k in shifts else p) for k, p in w0.items()}, lam)


@dataclass
class STN:
    """``method=stn`` (see the module docstring). ``include``: shell patterns of the parameters that get a
    response; ``seed``: the run's (the perturbations of inner step ``t`` are drawn from ``(seed, t)``)."""

    variant: str = "stn"
    sigma: float = 1.0
    linearize: bool = True
    recentre: bool = True
    antithetic: bool = True
    include: tuple[str, ...] = ("*",)
    max_hparams: int = 20_000
    response_clip: float | None = None
    hold: int = 0
    seed: int = 0
    name: str = "stn"
    carried: dict[str, Any] = field(default_factory=dict, repr=False)  # response, response_opt, centre
    calls: int = field(default=0, repr=False)  # outer steps run (for hold), over the run: a reset keeps it

    extra_batches: ClassVar[int] = 0
    # The response fits w*(λ) on L_T: a family that moves only the optimization path (lr, momentum) does not move it.
    needs_stationary_point: ClassVar[bool] = True
    # Its steps train ŵ(λ̃) (W0, W1 and V), not inner_opt's plain steps: compile=true and mixed precision do not apply.
    differentiates_steps: ClassVar[bool] = True
    needs_pathwise_hp: ClassVar[bool] = False  # masks at λ̃ are only evaluated, never differentiated
    refuses_data_parallel: ClassVar[str] = "trains its response weights on one process's gradients"
    carries: ClassVar[bool] = True

    def check(self, ctx: CheckContext) -> None:
        """Refuse path-only families (with why) and more hyperparameters than ``max_hparams``."""
        members = list(getattr(ctx.family, "families", (ctx.family,))) if ctx.family is not None else []
        path_only = [f.name for f in members if getattr(f, "moves_optimum", True) is False]
        if path_only:
            raise ConfigError(
                f"method={self.name} fits the best response w*(λ) of the training loss, which hp={path_only[0]} "
                "does not change (it moves only the optimization path); use unrolled, truncated or forward"
            )
        if ctx.n_hparams is not None and ctx.n_hparams > self.max_hparams:
            raise ConfigError(
                f"method={self.name} keeps an n_units x {ctx.n_hparams:,} response matrix per parameter, above "
                f"method.max_hparams={self.max_hparams:,}; use a coarser granularity or raise method.max_hparams"
            )

    def state_dict(self) -> dict[str, Any]:
        return {**self.carried, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's state, or ``{}`` (``reset_inner``: a fresh response; the count of steps run is kept)."""
        self.carried = {k: v for k, v in state.items() if k != "calls"}
        self.calls = int(state.get("calls", self.calls))

    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        """The generator of inner step ``step`` of the run: its perturbation (``stream`` 0) or a response's
        initialization (1). A function of the run's seed and the checkpointed step: reproducible, resumable."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 2 + stream) + SEED_OFFSET)

    def _start(self, st: OuterStep) -> tuple[Params, Params, dict[str, Any]]:
        """The weights at this step's centre, the response and its optimizer state (fresh after a reset)."""
        params, c = st.inner.params, self.carried
        if "response" not in c:
            names = select(list(params), self.include)
            response = init_response(params, names, tree.numel(st.raw), self.generator(st.inner.step, 1))
            return params, response, st.inner_opt.init(response)
        response = c["response"]
        if self.recentre and "centre" in c:  # W0 ← ŵ(λ0_new): the response's prediction at the moved centre
            with torch.no_grad():
                params = respond(params, response, offset(st.raw, c["centre"]))
        return params, response, c["response_opt"]

    def _step(
        self, st: OuterStep, state: InnerState, response: Params, resp_opt: dict[str, Any], batch: tuple, t: int
    ) -> tuple[InnerState, Params, dict[str, Any], Tensor, Tensor]:
        """One training step (module docstring, 1.) at inner step ``t`` of this outer step; also returns the norm
        of the response's scaled gradient (before ``response_clip``)."""
        task, opt, raw = st.task, st.inner_opt, tree.detached(st.raw)
        # antithetic: the odd steps reuse the even steps' ε, negated (what the weights' noise adds to the fit cancels)
        pair, odd = divmod(state.step, 2) if self.antithetic else (state.step, 0)
        lam, delta = perturbation(task.family, raw, self.sigma, self.generator(pair), -1.0 if odd else 1.0)
        overrides = task.family.optimizer_overrides(raw, t)
        w0, resp = tree.detached(state.params, requires_grad=True), tree.detached(response, requires_grad=True)
        if self.variant == "stn":
            loss = task.train_loss(respond(w0, resp, delta), lam, batch)
            grads = _grads(loss, {**w0, **resp})
            g0 = {k: grads[k] for k in w0}
        else:  # delta: W0 on the unperturbed loss, then the response at λ̃ with W0 fixed
            loss = task.train_loss(w0, raw, batch)
            g0 = _grads(loss, w0)
        with torch.no_grad():
            params, opt_state = opt.update(state.params, g0, state.opt_state, **overrides)
        if self.variant != "stn":
            w0 = tree.detached(params)
            fit = (
                linearized_loss(task, w0, resp, lam, delta, batch)
                if self.linearize
                else task.train_loss(respond(w0, resp, delta), lam, batch)
            )
            grads = _grads(fit, resp)
        with torch.no_grad():
            scale = 1.0 / self.sigma**2  # the fit's speed independent of σ (module docstring)
            g_resp = {k: grads[k] * scale for k in resp}
            norm = tree.norm(g_resp)
            if self.response_clip is not None:
                # The response (V δ) ⊙ W1 is bilinear: at σ < 1 its scaled gradient can grow over a few steps
                # and throw V to ~1e6 in one (MNIST preset, Bernoulli masks, σ = 0.5: seed 2's norm rose 1 → 12
                # over 5 outer steps, then NaN; σ = 0.3: 3 of 5 seeds).
                factor = torch.clamp(self.response_clip / (norm + 1e-12), max=1.0)  # no host read
                g_resp = {k: g * factor for k, g in g_resp.items()}
            response, resp_opt = opt.update(response, g_resp, resp_opt)
        return InnerState(params, opt_state, state.step + 1), response, resp_opt, loss.detach(), norm

    def __call__(self, st: OuterStep) -> OuterResult:
        params, response, resp_opt = self._start(st)
        state, loss, norms = st.inner._replace(params=params), None, []
        for t, batch in enumerate(st.train):
            state, response, resp_opt, loss, norm = self._step(st, state, response, resp_opt, batch, t)
            norms.append(norm)
            if st.on_step is not None:
                st.on_step()
        hg, val_loss = stn_hypergradient(st.task, state.params, response, st.raw, st.val)
        self.carried = {"response": response, "response_opt": resp_opt, "centre": tree.detached(st.raw)}
        self.calls += 1  # checkpointed with the response: a resumed run holds the same steps
        scale = tree.norm({k: v for k, v in response.items() if k.startswith(V)})
        values = [
            hg_norm := tree.norm(hg),
            val_loss,
            scale,
            *([] if loss is None else [loss, torch.stack(norms).max()]),
        ]
        host = torch.stack([v.to(hg_norm.dtype) for v in values]).tolist()  # one host read
        scalars = {"hypergrad/norm": host[0], "stn/val_loss": host[1], "stn/response_v_norm": host[2]}
        if loss is not None:  # the largest scaled gradient of the response this step (before the clip)
            scalars["inner/loss"], scalars["stn/response_grad_max"] = host[3], host[4]
        return OuterResult(None if self.calls <= self.hold else hg, state, scalars)


def stn(
    ctx: BuildContext,
    *,
    variant: Literal["stn", "delta"] = "stn",
    sigma: PositiveFloat = 1.0,
    linearize: bool = True,
    recentre: bool = True,
    antithetic: bool = True,
    include: Sequence[str] = ("*",),
    max_hparams: PositiveInt = 20_000,
    response_clip: PositiveFloat | None = None,
    hold: NonNegInt = 0,
    name: str = "stn",
) -> STN:
    """``method=stn``: a self-tuning network's structured best response on every parameter matching
    ``include``, trained at ``λ̃ = λ0 + σε`` in raw space (``sigma``): STN (``variant=stn``: one joint step)
    or Δ-STN (``variant=delta``: W0 trained at λ0, the response on ``linearize``d outputs). ``response_clip``:
    the largest L2 norm of the response's (``1/σ²``-scaled) gradient in one step (``None``: unclipped); ``hold``:
    outer steps that fit the response before the first outer update."""
    names = select(list(ctx.param_names), tuple(include))
    if not names:
        raise ValueError(
            f"method.include {list(include)} matches no parameter; parameters are: {', '.join(ctx.param_names)}"
        )
    return STN(
        variant,
        sigma,
        linearize=linearize,
        recentre=recentre,
        antithetic=antithetic,
        include=tuple(include),
        max_hparams=max_hparams,
        response_clip=response_clip,
        hold=hold,
        seed=ctx.seed,
        name=name,
    )
