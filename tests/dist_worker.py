"""Helpers for the data-parallel tests: one outer step of a method on this process's shards.

Imported by ``tests/test_distributed.py`` in the test process (one process: the reference on the whole
batch) and by the ranks it spawns (``torch.multiprocessing.spawn``, gloo, a file store).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

BASE = [
    "model.width=5",
    "model.depth=1",
    "model.activation=tanh",
    "dtype=float64",
    "progress=false",
    "optim/inner=momentum",
    "optim.inner.lr=0.2",
    "hp=[weight_decay,dropout]",
    "hp.weight_decay.init=0.05",
    "hp.dropout.relaxation=gaussian",
    "hp.dropout.init=0.1",
]
CASES = {
    "neumann": ["method=neumann", "method.terms=4", "method.alpha=0.1"],
    "cg": ["method=cg", "method.iterations=6"],
    "fd": ["method=fd", "method.alpha=0.1"],
    "fd_terms": ["method=fd", "method.alpha=0.1", "method.terms=2"],
    "cg_gn": ["method=cg_gn"],
    "unrolled": ["method=unrolled"],
    "pes": ["method=pes", "method.vectorize=false", "method.particles=4", "method.sigma=0.3", "method.spread=false"],
}
# ES particles spread over the ranks (each rank trains its share on whole batches; all gathered)
SPREAD = {
    "pes_vmap": ["method=pes", "method.particles=4", "method.sigma=0.3"],
    "nres_loop": [
        "method=pes",
        "method.variant=nres",
        "method.particles=4",
        "method.sigma=0.3",
        "method.vectorize=false",
    ],
}


def outer_step(name: str, sync: bool = True) -> dict[str, torch.Tensor]:
    """The hypergradient (and weights after the step) of one outer step of 3 inner steps; in a data-parallel
    process on its shards of every batch (``sync=False``: without averaging derivatives over the ranks)."""
    from hoexp.cli import compose_spec
    from hoexp.config.build import build, build_method
    from hoexp.engine import distributed
    from hoexp.method.base import InnerState
    from hoexp.method.base import outer_step as method_step
    from hoexp.task.streams import FullBatch

    spec = compose_spec([*BASE, *CASES[name]])[0]
    ctx = distributed.current()
    exp = build(spec, ctx)
    task = exp.runtime.task(exp.problem) if sync else exp.problem  # synced: derivatives averaged over the ranks
    params = {k: v.detach().clone() for k, v in exp.model.named_parameters()}
    raw = exp.problem.family.init(params)
    stream = exp.problem.with_noise(FullBatch(exp.data.train), 0)
    val = (exp.data.val.x, exp.data.val.y)
    if ctx.active:
        stream = distributed.ShardedStream(stream, 0, exp.problem.model, ctx)
        val = distributed.shard_batch(val, 0, exp.problem.model, ctx)
    hg, state, _ = method_step(
        build_method(spec), task, exp.inner_opt, InnerState(params, exp.inner_opt.init(params)), raw, stream, val, 3
    )
    return {**{f"hg/{k}": v for k, v in hg.items()}, **{f"w/{k}": v for k, v in state.params.items()}}


def spread_steps(name: str) -> dict:
    """Two outer steps (3 inner steps each, the particles carried) of an ES method whose particles are spread over
    this process's ranks (one process: all of them): the hypergradients, the central and the particles' weights,
    and how many particles this rank trained."""
    from hoexp.cli import compose_spec
    from hoexp.config.build import build
    from hoexp.engine import distributed
    from hoexp.method import es
    from hoexp.method.base import InnerState
    from hoexp.method.base import outer_step as method_step
    from hoexp.task.streams import FullBatch

    spec = compose_spec([*BASE, *SPREAD[name]])[0]
    exp = build(spec, distributed.current())
    assert exp.runtime.spread and not exp.runtime.data_parallel
    trained: list[int] = []
    for fn in ("vmapped_training", "looped_training"):
        real = getattr(es, fn)

        def counted(*args, real=real, **kwargs):
            trained.append(next(iter(args[5].values())).shape[0])  # raws: [particles on this rank, ...]
            return real(*args, **kwargs)

        setattr(es, fn, counted)
    params = {k: v.detach().clone() for k, v in exp.model.named_parameters()}
    raw = exp.problem.family.init(params)
    stream = exp.problem.with_noise(FullBatch(exp.data.train), 0)
    val, inner = (exp.data.val.x, exp.data.val.y), InnerState(params, exp.inner_opt.init(params))
    task, ranks, out = exp.runtime.task(exp.problem), exp.runtime.ranks(), {}
    for step in (1, 2):
        hg, inner, _ = method_step(exp.method, task, exp.inner_opt, inner, raw, stream, val, 3, ranks=ranks)
        out |= {f"hg{step}/{k}": v for k, v in hg.items()}
    out |= {f"w/{k}": v for k, v in inner.params.items()}
    out |= {f"particles/{k}": v for k, v in exp.method.state_dict()["params"].items()}
    return {**out, "trained": torch.tensor(trained)}


def spread_worker(rank: int, world: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        torch.save({n: spread_steps(n) for n in SPREAD}, f"{folder}/spread{rank}.pt")
    finally:
        dist.destroy_process_group()


def worker(rank: int, world: int, folder: str, names: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        out = {n: outer_step(n) for n in names}
        out["unsynced"] = outer_step(names[0], sync=False)
        torch.save(out, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def budget_worker(rank: int, world: int, folder: str) -> None:
    """Each rank's own solver time (rank 0 under the budget, rank 1 over it): what budget_spent decides on each."""
    from hoexp.engine.budget import budget_spent
    from hoexp.engine.distributed import Context
    from hoexp.types import RunSettings

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        s, ctx = RunSettings(outer_steps=10, inner_steps=1, max_time=1.0), Context(rank, world, rank)
        decided = [budget_spent(s, solver_s, 3, ctx) for solver_s in ((0.5, 2.0)[rank], 0.5)]
        torch.save(decided, f"{folder}/budget{rank}.pt")
    finally:
        dist.destroy_process_group()
