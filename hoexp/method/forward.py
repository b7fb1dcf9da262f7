"""Forward-mode hypergradients: carry ``Z_t = d(w_t, s_t)/dλ`` through training with JVPs.

For each hyperparameter direction ``e_h`` the tangent of the weights and optimizer state is pushed
through every step with ``torch.func.jvp`` (forward-over-reverse through the inner gradient), and
``dL_V/dλ_h`` is the JVP of ``L_V(w_T, λ)`` at the end (Franceschi et al. 2017 "Forward-HG").
No graph is stored: memory ``O(P·H)`` whatever ``T``; time ``~T·H`` JVPs, so it suits a handful of
hyperparameters (learning rates, a global decay), not one per weight.

Three strategies compute the same tangents (tests hold them to rounding):

* ``"hessian"`` (default): the tangent of the gradient ``ġ = H_ww ẇ + H_wλ λ̇`` is one reverse pass
  through the ``create_graph`` gradient of ``L_T`` with respect to ``(w, λ)`` together, with
  ``(ẇ, λ̇)`` as its output gradient: by the symmetry of the joint Hessian of ``L_T``,
  ``∂/∂w ⟨∇_{w,λ} L_T, (ẇ, λ̇)⟩ = H_ww ẇ + H_wλ λ̇``. One gradient with ``create_graph`` per step
  plus one backward pass per direction, all in autograd's C++ engine; only the optimizer update
  (elementwise) goes through ``torch.func.jvp``, vmapped over the directions. The validation
  hypergradient is one gradient: ``dL_V/dλ_h = ⟨∇_w L_V, ẇ_h⟩ + ⟨∇_λ L_V, λ̇_h⟩``;
* ``"vmap"``: ``torch.func.vmap`` over the directions of one ``jvp`` of the whole step
  (forward-over-reverse through ``torch.func.grad``; every op passes three functorch layers, which
  costs more than the arithmetic on small models);
* ``"loop"``: the reference, one ``jvp`` of the whole step per direction in a Python loop.

``chunk_size`` bounds how many directions share one batched call (memory; ``vmap`` strategy).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from hoexp import tree
from hoexp.components import CheckContext, PositiveInt, Range
from hoexp.errors import ConfigError
from hoexp.method.unrolled import StepLoss, Unroll, UnrolledResult, detach_state, grad_norm, path_outputs, path_result
from hoexp.optim import Optimizer
from hoexp.tree import Tree
from hoexp.types import OuterResult, OuterStep

Tangents = tuple[Tree, Any]  # (ẇ, ṡ), batched [H, ...] over the hyperparameter directions


def _split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensor-valued parts of an optimizer state (which get tangents) and the rest (step counters)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, (Tensor, dict))}
    return tensors, {k: v for k, v in state.items() if k not in tensors}


def _map(f: Callable[[Tensor], Tensor], x: Any) -> Any:
    """``f`` applied to every tensor of nested dicts and tuples of tensors."""
    if isinstance(x, Tensor):
        return f(x)
    if isinstance(x, tuple):
        return tuple(_map(f, v) for v in x)
    return {k: _map(f, v) for k, v in x.items()}


def _cat(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return {k: _cat([p[k] for p in parts]) for k in parts[0]}


def _update_fn(u: Unroll, rest: dict[str, Any], t: int, whole_step: bool = False) -> tuple[Callable[..., Any], dict]:
    """Step ``t``'s optimizer update as a function of ``(w, g, state tensors, λ)`` → ``(w', state tensors')``, the
    form every strategy differentiates (``whole_step``: of ``(w, state tensors, λ)``, ``g`` by ``torch.func.grad``),
    and the dict where the non-tensor rest of the new state lands (``"rest"``)."""
    captured: dict[str, Any] = {}

    def update(w_, g_, s_, h_):
        new_w, new_state = u.update(w_, g_, {**s_, **rest}, h_, t)
        new_tensors, captured["rest"] = _split_state(new_state)
        return new_w, new_tensors

    if whole_step:
        return lambda w_, s_, h_: update(w_, grad(lambda p: u.train_loss(p, h_, t))(w_), s_, h_), captured
    return update, captured


def forward_hypergradient(
    train_loss: StepLoss,
    val_loss: Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor],
    optimizer: Optimizer,
    params: Mapping[str, Tensor],
    opt_state: dict[str, Any],
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    overrides: Callable[[dict[str, Tensor], int], dict[str, Any]] | None = None,
    on_step: Callable[[], None] | None = None,
    strategy: str = "hessian",
    chunk_size: int | None = None,
    tangents: Tangents | None = None,
) -> UnrolledResult:
    """``dL_V(w_T)/dλ`` by forward mode: one tangent per scalar hyperparameter, carried for ``steps`` steps.

    Same contract as :func:`hoexp.method.unrolled.unrolled_hypergradient` (without truncation).
    ``strategy``: ``"hessian"``, ``"vmap"`` or ``"loop"`` (see the module doc); they agree to rounding.
    If ``vmap`` cannot handle the problem (an operation without a batching rule that raises), the
    loop is used, with a warning.

    ``tangents``: the starting ``(ẇ, ṡ) = d(w_0, s_0)/dλ``, batched ``[H, ...]`` like the result's
    ``tangents`` (default zero: ``w_0`` taken as independent of ``λ``). Passing the previous call's
    result carries the derivative across calls (real-time HO, :class:`ForwardMethod` ``carry``);
    batched strategies only.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if tangents is not None and (strategy == "loop" or not tree.numel(hparams)):
        raise ValueError("carried tangents need a batched strategy (hessian or vmap) and hyperparameters")
    u = Unroll(train_loss, val_loss, optimizer, params, opt_state, hparams, steps, overrides, on_step)
    if strategy != "loop" and tree.numel(hparams):  # no hyperparameters: nothing to batch
        try:
            if strategy == "hessian":
                return _forward_hessian(u, tangents)
            return _forward_vectorized(u, chunk_size, tangents)
        except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the model's ops
            warnings.warn(
                f"forward mode: vmap over hyperparameter directions failed ({e}); "
                "falling back to one jvp per direction",
                RuntimeWarning,
                stacklevel=2,
            )
    return _forward_loop(u)


STRATEGIES = ("hessian", "vmap", "loop")


def _start(u: Unroll) -> tuple[Tree, Tensor, Tree, dict[str, Any], dict[str, Any]]:
    """Detached copies: ``(λ, the unit basis [H, H] of its flattened entries, w, optimizer tensors, the rest)``."""
    lam = tree.detached(u.hparams)
    lam_flat = tree.flatten(lam.values())
    basis = torch.eye(lam_flat.numel(), dtype=lam_flat.dtype, device=lam_flat.device)
    return lam, basis, tree.detached(u.params), *_split_state(detach_state(u.opt_state))


def _forward_loop(u: Unroll) -> UnrolledResult:
    """The reference: one ``jvp`` per hyperparameter direction, in a Python loop."""
    lam, basis, w, tensors, rest = _start(u)
    directions = [tree.unflatten(basis[i], lam) for i in range(len(basis))]
    tangents = [(_map(torch.zeros_like, w), _map(torch.zeros_like, tensors)) for _ in directions]
    for t in range(u.steps):
        step, captured = _update_fn(u, rest, t, whole_step=True)
        pushed = [jvp(step, (w, tensors, lam), (tw, ts, d)) for (tw, ts), d in zip(tangents, directions)]
        # The primal outputs are the same for every direction (one plain step's worth of work).
        (w, tensors), tangents = (pushed[-1][0] if pushed else step(w, tensors, lam)), [p[1] for p in pushed]
        rest = captured["rest"]
        u.stepped()
    hg = [jvp(u.val_loss, (w, lam), (tw, d))[1] for (tw, _), d in zip(tangents, directions)]
    return _result(u, w, tensors, rest, lam, torch.stack(hg) if hg else basis.new_zeros(0))


def _result(u: Unroll, w: Tree, tensors: Any, rest: Any, lam: Tree, hg: Tensor, tangents: Any = None) -> UnrolledResult:
    # Training loss and gradient norm at w_T on the last batch, for logging (one gradient).
    loss = gnorm = None
    if u.steps:
        wg = tree.detached(w, requires_grad=True)
        loss = u.train_loss(wg, lam, u.steps - 1)
        gnorm = grad_norm(torch.autograd.grad(loss, list(wg.values())))
    lv = u.val_loss(w, lam)
    hypergrad = {k: v.detach().clone() for k, v in tree.unflatten(hg, lam).items()}
    return UnrolledResult.of(hypergrad, w, {**detach_state(tensors), **rest}, lv, loss, gnorm, tangents)


def _batched_start(u: Unroll, tangents: Tangents | None) -> tuple[Any, ...]:
    """:func:`_start` and the batched starting tangents: ``(λ, H, directions [H, ...] (the unit basis, shaped like
    ``λ``), w, optimizer tensors, the rest of the state, ẇ, ṡ)`` (``ẇ = ṡ = 0`` unless ``tangents`` are given)."""
    lam, basis, w, tensors, rest = _start(u)
    n_h = len(basis)
    sizes = [v.numel() for v in lam.values()]
    directions = {k: d.reshape(n_h, *v.shape) for (k, v), d in zip(lam.items(), torch.split(basis, sizes, dim=1))}
    if tangents is None:
        tangents = _map(lambda v: torch.zeros(n_h, *v.shape, dtype=v.dtype, device=v.device), (w, tensors))
    return lam, n_h, directions, w, tensors, rest, *tangents


def _forward_vectorized(u: Unroll, chunk_size: int | None, tangents: Tangents | None) -> UnrolledResult:
    """All directions at once: the tangents are batched ``[H, ...]`` pytrees, one ``vmap``-ed ``jvp`` a step."""
    lam, n_h, directions, w, tensors, rest, tangent_w, tangent_s = _batched_start(u, tangents)
    for t in range(u.steps):
        step, captured = _update_fn(u, rest, t, whole_step=True)

        def push(tw, ts, d):
            return jvp(step, (w, tensors, lam), (tw, ts, d))

        # The primal outputs do not depend on the tangents: vmap returns them unbatched (out_dims None).
        # Chunks are split here (vmap's own chunk_size does not take out_dims=None); each chunk
        # recomputes the primal step.
        pieces = []
        for lo in range(0, n_h, chunk_size or n_h):
            sl = slice(lo, lo + (chunk_size or n_h))
            # torch's stub allows no None inside an out_dims tuple; vmap documents and supports it
            batched = vmap(push, out_dims=(None, 0))  # type: ignore[arg-type]
            pieces.append(batched(*(_map(lambda v: v[sl], x) for x in (tangent_w, tangent_s, directions))))
        (w, tensors), rest = pieces[0][0], captured["rest"]
        tangent_w, tangent_s = _cat([p[1][0] for p in pieces]), _cat([p[1][1] for p in pieces])
        u.stepped()
    hg = vmap(lambda tw, d: jvp(u.val_loss, (w, lam), (tw, d))[1], chunk_size=chunk_size)(tangent_w, directions)
    return _result(u, w, tensors, rest, lam, hg, (tangent_w, tangent_s))


def _forward_hessian(u: Unroll, tangents: Tangents | None) -> UnrolledResult:
    """Tangents of the gradient from reverse passes through the joint Hessian of ``L_T`` (module doc).

    Cost per step: one ``create_graph`` gradient of ``L_T`` in ``(w, λ)``, ``H`` backward passes
    through it (HVPs), and ``vmap(jvp(update))`` over the directions (elementwise).
    """
    lam, n_h, directions, w, tensors, rest, tangent_w, tangent_s = _batched_start(u, tangents)
    w_keys, lam_keys = list(w), list(lam)
    for t in range(u.steps):
        w_req, lam_req = tree.detached(w, requires_grad=True), tree.detached(lam, requires_grad=True)
        w_list = list(w_req.values())
        g_all = torch.autograd.grad(
            u.train_loss(w_req, lam_req, t), w_list + list(lam_req.values()), create_graph=True, allow_unused=True
        )
        g = {k: (x.detach() if x is not None else torch.zeros_like(w[k])) for k, x in zip(w_keys, g_all)}
        # Outputs that depend on w (the others contribute nothing to ġ), with their tangents as output gradients.
        out_tangents = [tangent_w[k] for k in w_keys] + [directions[k] for k in lam_keys]
        pieces = [(x, tx) for x, tx in zip(g_all, out_tangents) if x is not None and x.requires_grad]
        tangent_g = {k: torch.zeros_like(v) for k, v in tangent_w.items()}
        outs = [x for x, _ in pieces]
        for h in range(n_h if pieces else 0):  # one HVP of the joint Hessian per direction
            dg = torch.autograd.grad(
                outs, w_list, [tx[h] for _, tx in pieces], retain_graph=h < n_h - 1, allow_unused=True
            )
            for k, x in zip(w_keys, dg):
                if x is not None:
                    tangent_g[k][h] = x
        del g_all, pieces, outs, w_req, lam_req
        update, captured = _update_fn(u, rest, t)

        def push(tw, tg, ts, d):
            return jvp(update, (w, g, tensors, lam), (tw, tg, ts, d))

        # torch's stub allows no None inside an out_dims tuple; vmap documents and supports it
        (w, tensors), (tangent_w, tangent_s) = vmap(push, out_dims=(None, 0))(  # type: ignore[arg-type]
            tangent_w, tangent_g, tangent_s, directions
        )
        rest = captured["rest"]
        u.stepped()
    # dL_V/dλ_h = ⟨∇_w L_V, ẇ_h⟩ + ⟨∇_λ L_V, λ̇_h⟩: one gradient for all directions.
    w_req, lam_req = tree.detached(w, requires_grad=True), tree.detached(lam, requires_grad=True)
    ends = list(w_req.values()) + list(lam_req.values())
    gv = torch.autograd.grad(u.val_loss(w_req, lam_req), ends, allow_unused=True)
    hg = next(iter(directions.values())).new_zeros(n_h)
    for x, tx in zip(gv, list(tangent_w.values()) + list(directions.values())):
        if x is not None:
            hg = hg + (tx.reshape(n_h, -1) @ x.reshape(-1).to(tx.dtype))
    return _result(u, w, tensors, rest, lam, hg, (tangent_w, tangent_s))


@dataclass
class ForwardMethod:
    """``method=forward``: refuses more than ``max_hparams`` hyperparameters (checked when the run is built).

    With ``carry`` the tangents ``Z = d(w, s)/dλ`` are not reset between outer steps (real-time HO,
    RTHO: Franceschi et al. 2017): the hypergradient is the derivative of the current validation
    loss with respect to ``λ`` held constant since step 0, its effect over the whole run so far,
    instead of over the last ``inner_steps`` steps only (the short-horizon bias of Wu et al. 2018).
    ``λ`` moves, so ``Z`` mixes derivatives taken at past values (as in RTRL); ``decay`` ``γ ≤ 1``
    multiplies ``Z`` at every outer step to forget old ones. Same cost per step as without carry;
    memory ``O(P·H)``.
    """

    max_hparams: int = 64
    name: str = "forward"
    strategy: str = "hessian"
    carry: bool = False
    decay: float = 1.0
    tangents: Tangents | None = field(default=None, repr=False)

    extra_batches: ClassVar[int] = 0
    needs_stationary_point: ClassVar[bool] = False
    differentiates_steps: ClassVar[bool] = True
    needs_pathwise_hp: ClassVar[bool] = True  # its tangents carry ∂(step)/∂λ, a derivative of ∇_w L_T in λ
    refuses_data_parallel: ClassVar[str] = (
        "pushes tangents with torch.func.jvp/vmap, which cannot all-reduce inside the transform"
    )

    def check(self, ctx: CheckContext) -> None:
        """One tangent per hyperparameter: refuse more than ``max_hparams`` before training starts."""
        if ctx.n_hparams is not None and ctx.n_hparams > self.max_hparams:
            raise ConfigError(
                f"method={self.name} carries one tangent per hyperparameter and hp={ctx.family.name} has "
                f"{ctx.n_hparams:,} here, above method.max_hparams={self.max_hparams}; use a coarser granularity "
                "(e.g. hp.granularity=per_layer), a reverse method (unrolled, truncated) or an IFT method (neumann, "
                "cg), or raise method.max_hparams"
            )

    def __call__(self, st: OuterStep) -> OuterResult:
        start = None
        if self.carry and self.tangents is not None:
            start = self.tangents if self.decay == 1 else _map(lambda v: v * self.decay, self.tangents)
        res = path_result(forward_hypergradient, st, strategy=self.strategy, tangents=start)
        out = path_outputs(res, st)
        if self.carry:
            self.tangents = res.tangents
        if not self.carry or res.tangents is None:
            return out
        return out._replace(scalars={**out.scalars, "forward/tangent_norm": float(tree.norm(res.tangents[0]))})

    @property
    def carries(self) -> bool:
        return self.carry

    # CarriesState: the carried tangents are checkpointed with the run (empty without carry).
    def state_dict(self) -> dict[str, Any]:
        if self.tangents is None:
            return {}
        return {"tangent_w": self.tangents[0], "tangent_s": self.tangents[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tangents = (state["tangent_w"], state["tangent_s"]) if state else None


def forward(
    *,
    max_hparams: PositiveInt = 64,
    strategy: Literal["hessian", "vmap", "loop"] = "hessian",
    carry: bool = False,
    decay: Annotated[float, Range(gt=0, le=1)] = 1.0,
    name: str = "forward",
) -> ForwardMethod:
    """``method=forward``: one JVP tangent per hyperparameter (refused above ``max_hparams``); ``carry`` keeps the
    tangents across outer steps (RTHO), multiplied by ``decay`` ∈ (0, 1] at each."""
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if carry and strategy == "loop":
        raise ValueError("carry=true needs strategy=hessian or vmap (the loop strategy keeps no batched tangents)")
    return ForwardMethod(max_hparams, name, strategy=strategy, carry=carry, decay=decay)
