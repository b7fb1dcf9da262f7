"""Online hypergradient descent of the learning rate (Baydin et al. 2018, "Online learning rate
adaptation with hypergradient descent", ICLR).

Every variant updates ``θ_t = θ_{t-1} − α_t d_t`` along an optimizer direction ``d_t`` (SGD: the
gradient; SGDN: the Nesterov direction; Adam: ``m̂_t/(√v̂_t+ε)``). Since ``θ_{t-1}`` depends on the
learning rate only through the last step, ``∂f(θ_{t-1})/∂α = −∇f(θ_{t-1})·d_{t-1}``, so one
gradient-descent step on ``α`` with hyper-learning-rate ``β`` is::

    g_t = ∇f(θ_{t-1})
    h_t = g_t · d_{t-1}          (= −∂f(θ_{t-1})/∂α;  d_0 = 0, so h_1 = 0)
    α_t = α_{t-1} + β h_t        (α grows while consecutive steps agree, shrinks when they overshoot)
    θ_t = θ_{t-1} − α_t d_t

Directions (paper's Algorithms 2-4; ``v``, ``m`` start at 0)::

    SGD-HD:   d_t = g_t
    SGDN-HD:  v_t = μ v_{t-1} + g_t,                 d_t = g_t + μ v_t
    Adam-HD:  m_t = β1 m_{t-1} + (1−β1) g_t,  s_t = β2 s_{t-1} + (1−β2) g_t²,
              d_t = m̂_t / (√ŝ_t + ε),  m̂_t = m_t/(1−β1^t),  ŝ_t = s_t/(1−β2^t)

The learning rate may go negative, as in the paper; ``min_lr`` / ``max_lr`` clamp it if given.
Cost per step on top of the plain optimizer: one dot product of two parameter-sized vectors and one
stored parameter-sized direction (O(P) time and memory; no extra forward or backward pass).

With ``β = 0`` the trajectory is the plain optimizer's (bitwise ``torch.optim.SGD`` / ``SGD(nesterov)``
/ ``Adam`` when ``α`` is a Python number: the same fused kernels as :mod:`hoexp.optim`).

``α`` may be a Python number (each step reads ``h_t`` back to the host: one sync per step) or a
0-d tensor (no host sync, and differentiable in ``α``); the state keeps whichever it was given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from hoexp.components import CheckContext, NonNegFloat, PositiveFloat, Probability
from hoexp.errors import ConfigError
from hoexp.method.base import inner_scalars, train_inner
from hoexp.optim import Optimizer
from hoexp.optim.base import add_scaled, add_scaled_div, add_scaled_mul, lerp, safe_sqrt, zeros_like_params
from hoexp.types import InnerState, OuterResult, OuterStep

__all__ = ["VARIANTS", "HDMethod", "hd_adam_step", "hd_init", "hd_sgd_step", "hd_sgdn_step"]

Lr = float | Tensor
Params = dict[str, Tensor]
State = dict[str, Any]

VARIANTS = ("sgd", "sgdn", "adam")
_VARIANT_KEYS = {"sgd": (), "sgdn": ("hd_momentum_buffer",), "adam": ("hd_exp_avg", "hd_exp_avg_sq")}


def hd_init(params: Mapping[str, Tensor], lr0: Lr, variant: str = "sgd") -> State:
    """Initial HD state (every key prefixed ``hd_``; tensors, dicts of tensors, or numbers).

    ``hd_lr`` α (a number or 0-d tensor, as given), ``hd_h`` the last hypergradient, ``hd_step``
    the steps taken, ``hd_dir`` the previous direction ``d_{t-1}`` (zeros), and the variant's
    optimizer buffers (``hd_momentum_buffer``; ``hd_exp_avg``/``hd_exp_avg_sq``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown HD variant '{variant}'; valid: {', '.join(VARIANTS)}")
    state: State = {
        "hd_lr": lr0,
        "hd_h": torch.zeros_like(lr0) if isinstance(lr0, Tensor) else 0.0,
        "hd_step": 0,
        "hd_dir": zeros_like_params(params),
    }
    for key in _VARIANT_KEYS[variant]:
        state[key] = zeros_like_params(params)
    return state


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """``Σ_k ⟨a_k, b_k⟩`` over all parameters (a 0-d tensor; no host sync)."""
    return torch.stack([torch.sum(a[k] * b[k]) for k in a]).sum()


def _clamp(alpha: Lr, min_lr: float | None, max_lr: float | None) -> Lr:
    if min_lr is None and max_lr is None:
        return alpha
    if isinstance(alpha, Tensor):
        return torch.clamp(alpha, min=min_lr, max=max_lr)
    if min_lr is not None:
        alpha = max(alpha, min_lr)
    if max_lr is not None:
        alpha = min(alpha, max_lr)
    return alpha


def _hyper_step(
    grads: Mapping[str, Tensor], state: State, beta: float, min_lr: float | None, max_lr: float | None
) -> tuple[Lr, Lr]:
    """``h_t = g_t · d_{t-1}`` and ``α_t = clamp(α_{t-1} + β h_t)``, in α's own kind (number/tensor)."""
    h: Lr = _dot(grads, state["hd_dir"])
    alpha = state["hd_lr"]
    if not isinstance(alpha, Tensor):
        h = float(h)  # host sync: α stays a Python number so the θ update uses torch.optim's fused kernels
    return _clamp(alpha + beta * h, min_lr, max_lr), h


def _check_keys(state: State, variant: str) -> None:
    missing = [k for k in ("hd_lr", "hd_h", "hd_step", "hd_dir", *_VARIANT_KEYS[variant]) if k not in state]
    if missing:
        raise KeyError(f"HD state for variant '{variant}' lacks {', '.join(missing)}; start it with hd_init")


def _advanced(state: State, alpha: Lr, h: Lr, dirs: Params, **buffers: Params) -> State:
    """``state`` one HD step on: ``α``, ``h``, the step count, the direction and the variant's buffers replaced."""
    return {**state, "hd_lr": alpha, "hd_h": h, "hd_step": state["hd_step"] + 1, "hd_dir": dirs, **buffers}


def hd_sgd_step(
    params: Params,
    grads: Params,
    state: State,
    beta: float,
    *,
    min_lr: float | None = None,
    max_lr: float | None = None,
) -> tuple[Params, State]:
    """One SGD-HD step: ``h = g_t·g_{t-1}``, ``α ← α + βh``, ``θ ← θ − α g_t``.

    Pure (out of place). Returns the new parameters and ``state`` with its ``hd_`` keys replaced
    (other keys kept). Cost: O(P) flops; the previous gradient (P floats) is kept.
    """
    _check_keys(state, "sgd")
    alpha, h = _hyper_step(grads, state, beta, min_lr, max_lr)
    new_params = {k: add_scaled(p, -alpha, grads[k]) for k, p in params.items()}
    return new_params, _advanced(state, alpha, h, dict(grads))


def hd_sgdn_step(
    params: Params,
    grads: Params,
    state: State,
    beta: float,
    momentum: float = 0.9,
    *,
    min_lr: float | None = None,
    max_lr: float | None = None,
) -> tuple[Params, State]:
    """One SGDN-HD step (Nesterov momentum μ, as ``torch.optim.SGD(nesterov=True)``)::

        h = g_t · (g_{t-1} + μ v_{t-1});  α ← α + βh;  v_t = μ v_{t-1} + g_t;  θ ← θ − α (g_t + μ v_t)

    Cost: O(P) flops; momentum buffer and previous direction (2P floats) kept.
    """
    _check_keys(state, "sgdn")
    alpha, h = _hyper_step(grads, state, beta, min_lr, max_lr)
    new_params: Params = {}
    bufs: Params = {}
    dirs: Params = {}
    for k, p in params.items():
        g = grads[k]
        bufs[k] = add_scaled(state["hd_momentum_buffer"][k] * momentum, 1.0, g)
        dirs[k] = add_scaled(g, momentum, bufs[k])
        new_params[k] = add_scaled(p, -alpha, dirs[k])
    return new_params, _advanced(state, alpha, h, dirs, hd_momentum_buffer=bufs)


def hd_adam_step(
    params: Params,
    grads: Params,
    state: State,
    beta: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    min_lr: float | None = None,
    max_lr: float | None = None,
) -> tuple[Params, State]:
    """One Adam-HD step: ``h = g_t · u_{t-1}`` with ``u = m̂/(√v̂+ε)`` the previous Adam direction,
    ``α ← α + βh``, then the Adam step ``θ ← θ − α_t u_t`` (rounded as ``torch.optim.Adam``).

    Cost: O(P) flops; Adam's two moments and the previous direction (3P floats) kept.
    """
    _check_keys(state, "adam")
    b1, b2 = betas
    alpha, h = _hyper_step(grads, state, beta, min_lr, max_lr)
    t = state["hd_step"] + 1
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    new_params: Params = {}
    ms: Params = {}
    vs: Params = {}
    dirs: Params = {}
    for k, p in params.items():
        g = grads[k]
        m = lerp(state["hd_exp_avg"][k], g, 1 - b1)
        v = add_scaled_mul(state["hd_exp_avg_sq"][k] * b2, 1 - b2, g, g)
        denom = safe_sqrt(v) / bc2**0.5 + eps  # √v̂ + ε
        new_params[k] = add_scaled_div(p, -(alpha / bc1), m, denom)
        ms[k], vs[k], dirs[k] = m, v, (m / bc1) / denom
    return new_params, _advanced(state, alpha, h, dirs, hd_exp_avg=ms, hd_exp_avg_sq=vs)


@dataclass
class HDMethod:
    """``method=hd``: train with a learning rate adapted online by hypergradient descent.

    ``outer_step`` runs ``inner_steps`` SGD-HD / SGDN-HD / Adam-HD steps; its own update rule is the
    optimizer (``inner_opt`` is ignored). The HD state (α, previous direction, buffers) lives in
    ``state.opt_state`` under ``hd_`` keys, so it persists across outer steps; other keys are left
    as they are. α is kept as a 0-d float64 tensor on the parameters' device (no host sync per
    step). There is no outer update: the hypergradient returned is ``None``.
    Cost per inner step: one forward and backward pass plus O(P) (see the module docstring).
    """

    variant: str = "sgd"
    _: dataclasses.KW_ONLY
    beta: float
    lr0: float | None = None  # None: the tuned lr family's initial value, else optim/inner's lr
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    name: str = "hd"
    extra_batches: ClassVar[int] = 0
    returns_hypergradient: ClassVar[bool] = False  # its outer step returns None: the lr adapts inside training
    needs_stationary_point: ClassVar[bool] = False
    # Its steps follow HD's own rule (the hypergradient of the last step), not inner_opt's: compile=true and mixed
    # precision, which apply to inner_opt's plain steps, are refused.
    differentiates_steps: ClassVar[bool] = True
    # Its lr hypergradient is a product of two weight gradients (−∇L_t·∇L_{t−1}); no family's λ is differentiated.
    needs_pathwise_hp: ClassVar[bool] = False
    refuses_data_parallel: ClassVar[str] = (
        "adapts the learning rate inside its own optimizer, on one process's gradients"
    )

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown HD variant '{self.variant}'; valid: {', '.join(VARIANTS)}")
        if not self.beta >= 0:
            raise ValueError(f"HD hyper-learning-rate beta must be >= 0, got {self.beta}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    def check(self, ctx: CheckContext) -> None:
        """HD adapts one global learning rate: the family must be exactly that, and ``lr0`` known."""
        if self.lr0 is None and "lr" not in ctx.inner_opt.defaults:
            raise ValueError(f"optim/inner={ctx.inner_opt.name} has no configured lr; set method.lr0")
        family = ctx.family
        if family is not None and (family.name != "lr" or getattr(family, "granularity", None) != "global"):
            raise ConfigError(
                "method=hd adapts one global learning rate online: use hp=lr hp.lr.granularity=global "
                "(for other families use unrolled, truncated, forward or an IFT method)"
            )

    def init_state(self, params: Mapping[str, Tensor], lr0: float | None = None) -> State:
        """The HD state at ``lr0`` (default: ``self.lr0``)."""
        device = next(iter(params.values())).device if params else None
        start = self.lr0 if lr0 is None else lr0
        if start is None:
            raise ValueError("HDMethod.init_state needs lr0 (the method's lr0 is None: the run supplies it)")
        return hd_init(params, torch.tensor(float(start), dtype=torch.float64, device=device), self.variant)

    def start_lr(self, task: Any, inner_opt: Optimizer) -> float:
        """``lr0``, or the tuned lr family's initial value, or the inner optimizer's configured ``lr``."""
        if self.lr0 is not None:
            return float(self.lr0)
        return float(getattr(task.family, "init_value", None) or inner_opt.defaults["lr"])

    def hp_values(self, inner: InnerState) -> Tensor | None:
        """The learning rate in use (what ``hp_final`` and the ``hp/*`` scalars report): HD adapts it in its own
        state, never in the lr family's ``raw``; None before the first step."""
        lr = inner.opt_state.get("hd_lr")
        return None if lr is None else lr.detach().reshape(1)

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        """One HD step of this method's variant (see :func:`hd_sgd_step` and siblings)."""
        if self.variant == "sgd":
            return hd_sgd_step(params, grads, state, self.beta)
        if self.variant == "sgdn":
            return hd_sgdn_step(params, grads, state, self.beta, self.momentum)
        return hd_adam_step(params, grads, state, self.beta, self.betas, self.eps)

    def optimizer(self) -> Optimizer:
        """This method's update rule as an :class:`~hoexp.optim.Optimizer` (its HD state in ``hd_`` keys; the
        family's optimizer overrides are ignored: the learning rate is HD's own)."""
        return Optimizer(
            f"hd_{self.variant}", self.init_state, lambda params, grads, state, **_: self.step(params, grads, state)
        )

    def __call__(self, st: OuterStep) -> OuterResult:
        opt_state = st.inner.opt_state
        if "hd_lr" not in opt_state:
            opt_state = {**opt_state, **self.init_state(st.inner.params, self.start_lr(st.task, st.inner_opt))}
        _check_keys(opt_state, self.variant)
        # HD's steps are plain training steps with its own rule in place of inner_opt (one shared loop)
        state, loss, gnorm = train_inner(
            st.task, self.optimizer(), st.inner._replace(opt_state=opt_state), st.raw, st.train, None, st.on_step
        )
        return OuterResult(
            None,
            state,
            {
                **inner_scalars(loss, gnorm),
                "hd/lr": float(state.opt_state["hd_lr"]),
                "hd/h": float(state.opt_state["hd_h"]),
            },
        )


def hd(
    *,
    variant: Literal["sgd", "sgdn", "adam"] = "sgd",
    beta: NonNegFloat = 1e-3,
    lr0: PositiveFloat | None = None,
    momentum: Probability = 0.9,
    betas: tuple[Probability, Probability] = (0.9, 0.999),
    eps: NonNegFloat = 1e-8,
    name: str = "hd",
) -> HDMethod:
    """``method=hd``: SGD-HD, SGDN-HD or Adam-HD (Baydin et al. 2018) replacing ``optim/inner``; ``lr0`` None starts
    from the tuned lr family's initial value, else the inner optimizer's ``lr``."""
    return HDMethod(variant, beta=beta, lr0=lr0, momentum=momentum, betas=(betas[0], betas[1]), eps=eps, name=name)
