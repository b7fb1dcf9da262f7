"""Unrolled reverse-mode hypergradients: backpropagate through T differentiable inner steps.

``w_{t+1} = U(w_t, s_t, ∇_w L_T(w_t, λ; B_t), λ)`` for any :mod:`hoexp.optim` optimizer ``U``;
the hypergradient is ``d L_V(w_T, λ)/dλ`` through the whole trajectory (Maclaurin et al. 2015;
Franceschi et al. 2017 "Reverse-HG"). Truncated to the last ``k`` steps it is Shaban et al. 2019:
the first ``T − k`` steps run without a graph and ``w_{T−k}`` is treated as a constant.

Cost: ``~2k`` gradients of ``L_T`` on top of the ``T`` training steps (each differentiable step keeps
its ``create_graph`` gradient); memory ``O(k·P)``.

Gradient checkpointing (``checkpoint_every = c``): the steps run once without a graph, keeping only
the weights and optimizer state at every ``c``-th differentiable step; the backward pass then goes
segment by segment from the last, re-running each segment's ``c`` steps with their graph from its
stored start and back-propagating the adjoint ``(dL_V/dw, dL_V/ds)`` through it alone. Memory
``O((k/c + c)·P)`` instead of ``O(k·P)`` (least near ``c = √k``), time one more pass of plain
steps; the hypergradient is the stored-trajectory one up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from hoexp import tree
from hoexp.components import NonNegInt, PositiveInt
from hoexp.method.base import scalars
from hoexp.optim import Optimizer
from hoexp.tree import Tree
from hoexp.types import InnerState, OuterResult, OuterStep

StepLoss = Callable[[dict[str, Tensor], dict[str, Tensor], int], Tensor]


def detach_state(state: Any) -> Any:
    """An optimizer state (nested dicts of tensors and numbers) with every tensor detached."""
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    return state


@dataclass
class UnrolledResult:
    hypergrad: dict[str, Tensor]
    params: dict[str, Tensor]  # w_T, detached
    opt_state: dict[str, Any]  # s_T, detached
    val_loss: float
    last_train_loss: float | None
    last_grad_norm: float | None
    tangents: Any = None  # forward mode: (ẇ, ṡ) batched over the directions, for carrying them on

    @staticmethod
    def of(
        hg: Tree, w: Tree, state: Any, lv: Tensor, loss: Tensor | None, gnorm: Tensor | None, tangents: Any = None
    ) -> UnrolledResult:
        """Detached copies of the end of a path: ``λ``'s hypergradient, ``w_T``, ``s_T``, ``L_V(w_T)``,
        the last training loss and gradient norm (``None`` without steps)."""
        return UnrolledResult(
            {k: g.detach() for k, g in hg.items()},
            tree.detached(w),
            detach_state(state),
            float(lv.detach()),
            None if loss is None else float(loss.detach()),
            None if gnorm is None else float(gnorm),
            tangents,
        )


def grad_norm(grads: Iterable[Tensor]) -> Tensor:
    """``‖∇_w L_T‖`` over all the tensors of a gradient (detached)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))


@dataclass(frozen=True)
class Unroll:
    """The arguments of a path that reverse and forward mode share (see :func:`unrolled_hypergradient`)."""

    train_loss: StepLoss
    val_loss: Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]
    optimizer: Optimizer
    params: Mapping[str, Tensor]
    opt_state: dict[str, Any]
    hparams: Mapping[str, Tensor]
    steps: int
    overrides: Callable[[dict[str, Tensor], int], dict[str, Any]] | None = None
    on_step: Callable[[], None] | None = None

    def update(self, w: dict[str, Tensor], grads: Any, state: Any, lam: dict[str, Tensor], t: int) -> Any:
        """Step ``t``'s optimizer update ``(w', s')``; ``grads``: a dict, or the tensors in ``w``'s order."""
        kwargs = self.overrides(lam, t) if self.overrides is not None else {}
        grads = grads if isinstance(grads, Mapping) else dict(zip(w.keys(), grads))
        return self.optimizer.update(w, grads, state, **kwargs)

    def stepped(self) -> None:
        if self.on_step is not None:
            self.on_step()


def unrolled_hypergradient(
    train_loss: StepLoss,
    val_loss: Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor],
    optimizer: Optimizer,
    params: Mapping[str, Tensor],
    opt_state: dict[str, Any],
    hparams: Mapping[str, Tensor],
    steps: int,
    *,
    truncate: int | None = None,
    overrides: Callable[[dict[str, Tensor], int], dict[str, Any]] | None = None,
    on_step: Callable[[], None] | None = None,
    checkpoint_every: int = 0,
) -> UnrolledResult:
    """``dL_V(w_T)/dλ`` by reverse mode through ``steps`` optimizer steps from ``params``.

    ``train_loss(w, λ, t)`` is the training loss of step ``t`` (its minibatch), ``val_loss(w, λ)``
    the outer objective at ``w_T``. ``overrides(λ, t)`` returns step ``t``'s optimizer keyword overrides
    (e.g. ``{"lr": ...}``) so that learning-rate hyperparameters are differentiated too.
    ``truncate=k`` differentiates only the last ``k`` steps. ``checkpoint_every=c > 0`` keeps only every
    ``c``-th step's weights and optimizer state and re-runs the segments in the backward pass (see the
    module doc).
    """
    u = Unroll(train_loss, val_loss, optimizer, params, opt_state, hparams, steps, overrides, on_step)
    first = 0 if truncate is None else max(steps - truncate, 0)
    if checkpoint_every > 0:
        return _checkpointed(u, first, checkpoint_every)
    lam, lam_const = tree.detached(hparams, requires_grad=True), tree.detached(hparams)
    w, state = tree.detached(params), detach_state(opt_state)
    loss = gnorm = None
    for t in range(steps):
        differentiable = t >= first
        h = lam if differentiable else lam_const
        if t <= first:  # the graph starts at step `first` (w a constant leaf)
            w = tree.detached(w, requires_grad=True)
        loss = train_loss(w, h, t)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=differentiable)
        if differentiable:
            w, state = u.update(w, grads, state, h, t)
        else:
            with torch.no_grad():
                w, state = u.update(tree.detached(w), grads, state, h, t)
        gnorm = grad_norm(grads)
        u.stepped()
    lv = val_loss(w, lam)
    grads_lam = torch.autograd.grad(lv, list(lam.values()), allow_unused=True)
    return UnrolledResult.of(
        dict(zip(lam.keys(), tree.fill_none(grads_lam, list(lam.values())))), w, state, lv, loss, gnorm
    )


def _state_leaves(state: Any) -> list[Tensor]:
    """The tensors of an optimizer state (nested dicts), in a fixed order."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _state_leaves(v)]
    return []


def _with_leaves(state: Any, leaves: Iterator[Tensor]) -> Any:
    """``state`` with its tensors replaced, in :func:`_state_leaves`'s order, by ``leaves``."""
    if isinstance(state, Tensor):
        return next(leaves)
    if isinstance(state, dict):
        return {k: _with_leaves(v, leaves) for k, v in state.items()}
    return state


def _checkpointed(u: Unroll, first: int, every: int) -> UnrolledResult:
    """:func:`unrolled_hypergradient` from step ``first`` on, with gradient checkpointing every ``every`` steps."""
    lam, lam_const = tree.detached(u.hparams, requires_grad=True), tree.detached(u.hparams)
    w, state = tree.detached(u.params), detach_state(u.opt_state)
    starts: dict[int, tuple[dict[str, Tensor], Any]] = {}
    loss = gnorm = None
    for t in range(u.steps):  # forward: plain steps, keeping the segments' starts
        if t >= first and (t - first) % every == 0:
            starts[t] = (w, state)
        wr = tree.detached(w, requires_grad=True)
        loss = u.train_loss(wr, lam_const, t)
        grads = torch.autograd.grad(loss, list(wr.values()))
        with torch.no_grad():
            w, state = u.update(w, grads, state, lam_const, t)
        gnorm = grad_norm(grads)
        u.stepped()
    w_end = tree.detached(w, requires_grad=True)
    lv = u.val_loss(w_end, lam)
    lam_list = list(lam.values())
    ends = list(w_end.values()) + lam_list
    out = tree.fill_none(torch.autograd.grad(lv, ends, allow_unused=True), ends)
    adj_w: list[Tensor | None] = list(out[: len(w_end)])
    hg = out[len(w_end) :]
    adj_s: list[Tensor | None] = [None] * len(_state_leaves(state))
    for t0 in sorted(starts, reverse=True):  # backward: segment by segment, from the last
        w0 = tree.detached(starts[t0][0], requires_grad=True)
        s_leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in _state_leaves(starts[t0][1])]
        ws, s = w0, _with_leaves(starts[t0][1], iter(s_leaves))
        for t in range(t0, min(t0 + every, u.steps)):
            ws, s = u.update(
                ws, torch.autograd.grad(u.train_loss(ws, lam, t), list(ws.values()), create_graph=True), s, lam, t
            )
        outs = list(ws.values()) + _state_leaves(s)
        pairs = [(o, a) for o, a in zip(outs, adj_w + adj_s) if a is not None and o.requires_grad]
        inputs = list(w0.values()) + s_leaves + lam_list
        differentiable = [x for x in inputs if x.requires_grad]
        got = iter(
            torch.autograd.grad([o for o, _ in pairs], differentiable, [a for _, a in pairs], allow_unused=True)
            if pairs
            else [None] * len(differentiable)
        )
        grads_in = [next(got) if x.requires_grad else None for x in inputs]
        adj_w = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads_in[: len(w0)], w0.values())]
        adj_s = grads_in[len(w0) : len(w0) + len(s_leaves)]
        hg = [h if g is None else h + g for h, g in zip(hg, grads_in[len(w0) + len(s_leaves) :])]
    return UnrolledResult.of(dict(zip(lam.keys(), hg)), w, state, lv, loss, gnorm)


def path_result(hypergradient_fn: Callable[..., UnrolledResult], st: OuterStep, **options: Any) -> UnrolledResult:
    """``hypergradient_fn`` over the outer step's ``inner_steps`` training batches (unrolled, truncated, forward).

    The engine drew the batches once, so every pass over the path sees the same ones.
    """
    batches, problem, val_batch = st.train, st.task, st.val
    return hypergradient_fn(
        lambda w, h, t: problem.train_loss(w, h, batches[t]),
        lambda w, h: problem.val_loss(w, h, val_batch),
        st.inner_opt,
        st.inner.params,
        st.inner.opt_state,
        st.raw,
        len(batches),
        overrides=problem.family.optimizer_overrides,
        on_step=st.on_step,
        **options,
    )


def path_outputs(res: UnrolledResult, st: OuterStep) -> OuterResult:
    """A path result as an outer step's result (the new inner state after ``inner_steps`` steps)."""
    return OuterResult(
        res.hypergrad,
        InnerState(res.params, res.opt_state, st.inner.step + len(st.train)),
        scalars(
            **{
                "inner/grad_norm": res.last_grad_norm,
                "inner/loss": res.last_train_loss,
                "hypergrad/norm": tree.norm(res.hypergrad),
            }
        ),
    )


@dataclass
class UnrolledMethod:
    """``method=unrolled`` (all inner steps differentiated) and ``method=truncated`` (last ``k``)."""

    truncate: int | None = None
    name: str = "unrolled"
    checkpoint_every: int = 0  # > 0: gradient checkpointing, a stored start every this many steps

    extra_batches: ClassVar[int] = 0
    needs_stationary_point: ClassVar[bool] = False  # it differentiates the path, so it tunes lr and momentum too
    differentiates_steps: ClassVar[bool] = True  # its steps are differentiated: no compile=true, no mixed precision
    needs_pathwise_hp: ClassVar[bool] = True  # backpropagation through the steps differentiates ∇_w L_T in λ
    refuses_data_parallel: ClassVar[str] = ""

    def __call__(self, st: OuterStep) -> OuterResult:
        res = path_result(unrolled_hypergradient, st, truncate=self.truncate, checkpoint_every=self.checkpoint_every)
        return path_outputs(res, st)


def unrolled(*, checkpoint_every: NonNegInt = 0, name: str = "unrolled") -> UnrolledMethod:
    """``method=unrolled``: reverse mode through all ``inner_steps`` steps (memory ``O(inner_steps·P)``;
    ``checkpoint_every`` > 0 keeps every c-th step and recomputes segments)."""
    return UnrolledMethod(None, name, checkpoint_every=checkpoint_every)


def truncated(*, k: PositiveInt = 10, checkpoint_every: NonNegInt = 0, name: str = "truncated") -> UnrolledMethod:
    """``method=truncated``: reverse mode through the last ``k`` of the ``inner_steps`` steps (Shaban et al. 2019)."""
    return UnrolledMethod(k, name, checkpoint_every=checkpoint_every)
