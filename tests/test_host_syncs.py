"""No host-device synchronisation inside the inner loop or a solve (what would stall a GPU's queue).

Counted on CPU: every ``.item()``/``float()``/``bool()`` of a tensor dispatches
``aten._local_scalar_dense`` (seen by a ``TorchDispatchMode``), and ``Tensor.tolist`` is wrapped.
On a GPU each of these waits for all queued kernels; inside the loops they would cost a pipeline
drain per step or per Hessian-vector product. What an outer step may do is a fixed handful at its
end (logging), independent of the inner steps T and of the solver's iterations K.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hoexp import tree
from hoexp.cli import compose_spec
from hoexp.config.build import build, build_method
from hoexp.engine import start
from hoexp.method.base import outer_step, train_inner
from hoexp.method.ift import HessianOperator
from hoexp.method.solvers import ConjugateGradient, FixedPoint, Neumann


class HostSyncs(TorchDispatchMode):
    """Counts host reads of tensor values while active."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        original = torch.Tensor.tolist

        def tolist(t):
            self.count += 1
            return original(t)

        monkeypatch.setattr(torch.Tensor, "tolist", tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def setup(*overrides):
    spec = compose_spec(["progress=false", "threads=1", *overrides])[0]
    exp = build(spec)
    st = start(exp)
    return spec, exp, st.inner, st.raw, st.train, st.val


SMALL_MNIST = ["dataset=mnist", "model.width=16", "model.depth=1", "dataset.batch_size=32"]
CASES = {
    "iris wd nesterov": ["hp=weight_decay", "optim/inner=nesterov"],
    "iris wd adam": ["hp=weight_decay", "optim/inner=adam"],
    "iris lr schedule": ["hp=lr", "hp.lr.granularity=per_step", "optim/inner=momentum", "method=unrolled"],
    "iris dropout": ["hp=dropout"],
    "mnist minibatches": [*SMALL_MNIST, "hp=weight_decay", "optim/inner=adamw"],
    "ptb lstm dropout": [
        "experiment=ptb_lstm_dropout_gaussian",
        "model.embed_dim=8",
        "model.hidden=8",
        "dataset.bptt=4",
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_inner_training_steps_never_read_the_device(case, monkeypatch):
    spec, exp, state, raw, train, _ = setup(*CASES[case])
    train_inner(exp.problem, exp.inner_opt, state, raw, train, 2)  # warm-up (lazy init outside the count)
    with HostSyncs(monkeypatch) as syncs:
        new_state, loss, gnorm = train_inner(exp.problem, exp.inner_opt, state, raw, train, 10)
    assert syncs.count == 0
    assert new_state.step == state.step + 10 and torch.isfinite(loss) and torch.isfinite(gnorm)


def _operator(monkeypatch):
    spec, exp, state, raw, train, _ = setup("hp=weight_decay")
    w = tree.detached(state.params, requires_grad=True)
    loss = exp.problem.train_loss(w, raw, next(train))
    g = torch.autograd.grad(loss, list(w.values()), create_graph=True)
    op = HessianOperator(tree.flatten(g), list(w.values()))
    return op, torch.randn(op.n, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "solver, expected",
    [
        (Neumann(iterations=7, alpha=0.01, residual=False), 0),
        (Neumann(iterations=7, alpha=0.01, residual=True), 1),  # the residual, read once at the end
        (FixedPoint(iterations=7, alpha=0.01, residual=False), 0),
        (ConjugateGradient(iterations=12, tol=0.0, check_every=4), 3),  # after 4 and 8 iterations, and the result
    ],
)
def test_solver_loops_read_the_device_only_at_the_end(solver, expected, monkeypatch):
    op, b = _operator(monkeypatch)
    with HostSyncs(monkeypatch) as syncs:
        result = solver(op, b)
    assert torch.isfinite(result.x).all()
    # the deferred CG reads `active` every check_every iterations, then iterations/reason and the residual
    assert syncs.count <= expected + (1 if isinstance(solver, ConjugateGradient) else 0)
    if isinstance(solver, Neumann) and not solver.residual:
        assert syncs.count == 0


@pytest.mark.parametrize(
    "method", [["method=neumann"], ["method=cg", "method.tol=0"], ["method=fixed_point"], ["method=none"]]
)
def test_an_outer_step_reads_the_device_a_fixed_number_of_times(method, monkeypatch):
    """The count does not grow with the inner steps T or the solver's iterations K."""
    counts = {}
    for T, K in ((5, 3), (20, 3), (5, 12)):
        key = "method.terms" if method[0] == "method=neumann" else "method.iterations"
        extra = [] if method == ["method=none"] else [f"{key}={K}"]
        spec, exp, state, raw, train, val = setup(*SMALL_MNIST, "hp=weight_decay", *method, *extra)
        m = build_method(spec)
        outer_step(m, exp.problem, exp.inner_opt, state, raw, train, next(val), 2)  # warm-up
        if hasattr(m, "solver") and isinstance(m.solver, ConjugateGradient):
            m.solver = ConjugateGradient(iterations=K, tol=0.0, check_every=K + 1)  # the accelerator setting
        with HostSyncs(monkeypatch) as syncs:
            outer_step(m, exp.problem, exp.inner_opt, state, raw, train, next(val), T)
        counts[(T, K)] = syncs.count
    assert counts[(5, 3)] == counts[(20, 3)] == counts[(5, 12)], counts
    assert counts[(5, 3)] <= 4, counts  # logging at the end of the step: losses, norms, residual
