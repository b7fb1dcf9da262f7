"""SOBA/SABA's minibatch derivatives as one pure function through ``torch.compile`` (``method.compile=true``).

Each joint step of :mod:`hoexp.method.single_loop` takes ``[∇_w L_T | ∇²_ww L_T v | ∇²_λw L_T v]``, ``L_T``,
``[∇_w L_V | ∇_λ L_V]`` and ``L_V`` on two minibatches: ~150 small kernels eagerly (benchopt's hyper-cleaning
problem, a 784×10 linear model and minibatches of 64: 1.3 ms a step), one fused graph compiled (0.4 ms, after
~12 s of compiling once). :func:`derivatives_tensors` is the same math as ``train_flat`` / ``val_flat`` in
``torch.func``'s transforms (which dynamo traces; ``torch.autograd.grad`` it does not), so the two agree to
float32 rounding, not bit for bit.

One graph serves every minibatch: the batches travel as arguments with their example axis marked dynamic, so a
split's short last chunk (3,500 = 54·64 + 44) runs the same code (no recompile). The first call of each new pair
of minibatch sizes runs the compiled function once more, untimed by the caller: :class:`CompiledDerivatives`
returns the seconds that call took (compile, or a cache hit and one execution) so the run can keep them out of its
solver time and log them apart (``time/compile_s``), as benchopt keeps its JAX solvers' jit warm-up
(``run_once`` in ``set_objective``) out of its timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vjp

from hoexp import tree
from hoexp.errors import HoexpError
from hoexp.method.compiling import quiet_compile

Params = dict[str, Tensor]
TaskLoss = Callable[[Params, Params, tuple], Tensor]  # task.train_loss / task.val_loss: (w, λ, batch) → scalar


def derivatives_tensors(
    train_loss: TaskLoss, val_loss: TaskLoss, w: Params, lam: Params, v: Sequence[Tensor], batch: tuple, vbatch: tuple
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``([∇_w L_T | ∇²_ww L_T v | ∇²_λw L_T v], L_T, [∇_w L_V | ∇_λ L_V], L_V)``, flat, at ``(w, λ)``: ``vjp`` of
    ``grad_and_value`` with cotangent ``v`` (one double-backward pass) and ``grad_and_value`` of ``L_V`` in both
    arguments (one backward pass). Pure: no autograd state crosses the call."""

    def train_grad(w_: Params, lam_: Params) -> tuple[Params, Tensor]:
        return grad_and_value(lambda p: train_loss(p, lam_, batch))(w_)

    g, pullback, lt = vjp(train_grad, w, lam, has_aux=True)  # type: ignore[misc]
    hv, cv = pullback(dict(zip(w, v)))
    (aw, alam), lv = grad_and_value(lambda p, q: val_loss(p, q, vbatch), argnums=(0, 1))(w, lam)
    train = tree.flatten([*g.values(), *hv.values(), *(cv[k] for k in lam)])
    return train, lt.detach(), tree.flatten([*aw.values(), *(alam[k] for k in lam)]), lv.detach()


def own(batch: tuple) -> tuple:
    """``batch`` with its inputs and targets in storage of their own: a chunk is a view at an offset into the split,
    and dynamo specializes a view's storage offset 0 (the first chunk) apart from the others (a recompile). Copies
    one minibatch (64×784 floats: ~20 µs)."""
    return (batch[0].clone(), batch[1].clone(), *batch[2:]) if batch[0]._base is not None else batch


@dataclass
class CompiledDerivatives:
    """:func:`derivatives_tensors` for one task's losses through ``torch.compile`` (``backend``: inductor, or a
    test's counter), one graph for every minibatch size along ``batch_dim``. Calling it returns the derivatives and
    the seconds of this call's warm-up (0.0 once warm). A compile failure is one line naming the fix."""

    train_loss: TaskLoss
    val_loss: TaskLoss
    batch_dim: int = 0
    backend: str | Callable[..., Any] = "inductor"
    warm: set[tuple[int, int]] = field(default_factory=set, repr=False)  # minibatch sizes already called
    _fn: Callable[..., Any] | None = field(default=None, repr=False)

    def _pure(self, w: Params, lam: Params, v: list[Tensor], batch: tuple, vbatch: tuple) -> tuple[Tensor, ...]:
        return derivatives_tensors(self.train_loss, self.val_loss, w, lam, v, batch, vbatch)

    def _dynamic(self, batch: tuple) -> int:
        """Mark the example axis of ``batch``'s inputs and targets dynamic (sizes 0 and 1 stay specialized, as
        dynamo's own rule); its size."""
        n = int(batch[0].shape[self.batch_dim])
        if n > 1:
            for t in batch[:2]:
                torch._dynamo.mark_dynamic(t, self.batch_dim)
        return n

    def __call__(
        self, w: Params, lam: Params, v: list[Tensor], batch: tuple, vbatch: tuple
    ) -> tuple[tuple[Tensor, ...], float]:
        t0, warm_up, batch, vbatch = time.perf_counter(), 0.0, own(batch), own(vbatch)
        key = (self._dynamic(batch), self._dynamic(vbatch))  # the first call imports torch._dynamo's decorators
        if key not in self.warm:  # compiles (the first sizes) or checks the guards: kept out of the caller's clock
            try:
                if self._fn is None:  # torch.compile imports inductor (seconds): part of the warm-up
                    self._fn = torch.compile(self._pure, backend=self.backend)
                with quiet_compile():
                    self._fn(w, lam, v, batch, vbatch)
            except Exception as e:  # a missing C++ compiler, an operation dynamo cannot trace, ...
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise HoexpError(
                    f"method.compile=true: torch.compile failed ({type(e).__name__}: {msg[:200]}); "
                    "run with method.compile=false"
                ) from e
            warm_up = time.perf_counter() - t0
            self.warm.add(key)
        assert self._fn is not None
        return self._fn(w, lam, v, batch, vbatch), warm_up
