"""Data-parallel HO runs: N processes (``torchrun``, or one SLURM task per GPU) compute what one process
computes on the concatenated batch.

Every rank draws the same global minibatch (the batch streams are seeded alike) and keeps its shard
(:func:`shard_batch`: ``1/N`` of the examples, with their dropout noise). The losses stay local,
``L^r(w, λ)`` on rank ``r``'s shard, and the global loss is their mean, ``L = (1/N) Σ_r L^r`` (equal
shards, mean losses). What makes every derivative global is :func:`sync`, applied to the weights and
hyperparameters where a loss reads them (``hoexp.engine.runtime.SyncedTask``, the task as methods see it): an autograd
node that is the identity forward and averages its gradient over the ranks backward,

    ∂L/∂w = (1/N) Σ_r ∂L^r/∂w        (one all-reduce of the gradient),

and whose backward is itself differentiable (an all-reduce node, :class:`_MeanAcrossRanks`). A gradient
taken with ``create_graph`` therefore carries the all-reduce in its graph, and differentiating it again
all-reduces again: a Hessian-vector product ``∂(g·v)/∂w`` becomes ``(1/N) Σ_r H^r v`` (one all-reduce
per product), the IFT's mixed term ``(∂g/∂λ)ᵀu`` becomes ``(1/N) Σ_r (∂g^r/∂λ)ᵀu``, a Gauss-Newton product
``(1/N) Σ_r J_rᵀ H_ℓ^r J_r v``, and reverse mode through unrolled steps sees the global step at every
step. This is explicit: PyTorch's DDP synchronizes gradients through hooks on ``.grad`` accumulation,
which a ``torch.autograd.grad`` call (let alone a double backward) never triggers (pytorch#63929).

The backward of the all-reduce node returns its cotangent unchanged: the exact vector-Jacobian product
of a mean over ranks is the mean of the ranks' cotangents, which equals the cotangent when it is the
same on every rank. It is, for every vector hoexp differentiates with: they are built from
all-reduced gradients (the validation gradient, the solver's iterates, unrolled cotangents). Each
Hessian-vector product therefore costs one all-reduce of the weights' size, as does each gradient.

Weights and hyperparameters stay bitwise identical on every rank: every rank applies the same update
to the same (all-reduced, hence identical) gradients. Rank 0 alone writes (logs, checkpoints,
summaries) and shows progress; it claims the run folder and broadcasts its path and the checkpoint it
resumes from. A rank that fails prints one line and leaves its message in the process group's store
for rank 0's ``summary.json``; the other ranks then see their next collective fail
(:class:`PeerLost`) and end quietly.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

from hoexp.errors import HoexpError
from hoexp.types import Batch, noise_of

# Which methods run data-parallel is declared by each method (refuses_data_parallel; hoexp.config.build.check_distributed).
STORE_KEY = "hoexp/ended"  # a rank that ends abnormally leaves "<status>\t<message>" here for rank 0
PROCESS_KEY = "hoexp/process"  # "<host> <pid>" of each rank (a rank killed without a word: dead_peers)
TIMEOUT_S = float(os.environ.get("HOEXP_DIST_TIMEOUT", "1800"))  # collectives (a slow rank is not a dead one)


class PeerLost(HoexpError):
    """A collective failed because another rank of the job ended. ``reported``: that rank printed why (rank 0
    then ends quietly too, with the reason in ``summary.json``)."""

    exit_code = 1

    def __init__(self, message: str, reported: bool = False):
        super().__init__(message)
        self.reported = reported


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> Context:
    """The job this process belongs to, from the environment (before or after the process group exists):
    ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or a multi-task SLURM / submitit job."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Context(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    job = _submitit_env() if env.get("SUBMITIT_EXECUTOR") else None  # a task of a submitit job (SLURM or local)
    if job is not None and job.num_tasks > 1:
        return Context(job.global_rank, job.num_tasks, job.local_rank)
    return Context()


def _submitit_env() -> Any:
    try:
        import submitit

        return submitit.JobEnvironment()
    except Exception:  # noqa: BLE001 - not inside a submitit job (or no submitit): not distributed
        return None


def current() -> Context:
    """This process's rank and the job's size (world size 1 without an initialized process group)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), launched().local_rank)
    return Context()


def init(device: str) -> Context:
    """Join the job's process group (once): NCCL for CUDA runs, gloo on CPU. ``device``: ``run.device``.

    Under a multi-task SLURM / submitit job without torchrun, submitit's helper exports ``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` first."""
    ctx = launched()
    if not ctx.active or (dist.is_available() and dist.is_initialized()):
        return current() if ctx.active else ctx
    if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise HoexpError(f"device={device} but CUDA is not available on rank {ctx.rank}")
        torch.cuda.set_device(ctx.local_rank % torch.cuda.device_count())
    try:
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        # device_id: NCCL binds the communicator to this rank's GPU at once (gloo, on the CPU: None, its default)
        device_id = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, device_id=device_id)
    except Exception as e:  # noqa: BLE001 - a rendezvous that fails (port taken, a rank missing)
        raise HoexpError(
            f"rank {ctx.rank} of {ctx.world_size} could not join the process group "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    _store_set(f"{PROCESS_KEY}/{ctx.rank}", f"{socket.gethostname()} {os.getpid()}")  # for dead_peers()
    return current()


def device_for(name: str, ctx: Context) -> str:
    """``run.device`` for this rank: ``cuda`` / ``auto`` with CUDA → this rank's GPU (``cuda:<local rank>``)."""
    if ctx.active and (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        return f"cuda:{ctx.local_rank % max(torch.cuda.device_count(), 1)}"
    return name


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _collective(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a collective; a failure (another rank ended: a closed connection, a timeout) is :class:`PeerLost`."""
    try:
        return fn(*args, **kwargs)
    except PeerLost:
        raise
    except Exception as e:  # noqa: BLE001 - gloo / NCCL errors have several types (RuntimeError, DistError, ...)
        raise PeerLost(f"another rank of the job ended ({type(e).__name__}: {_first_line(e)})") from None


# ------------------------------------------------------------------------------ autograd plumbing
class _MeanAcrossRanks(Function):
    """``x ↦ (1/N) Σ_r x_r`` (all-reduce). Backward: the cotangent unchanged, which is the exact VJP for a
    cotangent that is the same on every rank (see the module doc)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = x.detach().clone()
        _collective(dist.all_reduce, y)
        return y.div_(dist.get_world_size())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def mean_across_ranks(x: Tensor) -> Tensor:
    """The mean of ``x`` over the ranks (differentiable; the identity in a one-process run)."""
    if not current().active:
        return x
    out: Tensor = _MeanAcrossRanks.apply(x)
    return out


class _SyncGrad(Function):
    """Identity forward; backward averages the gradients of all inputs over the ranks (one all-reduce
    per dtype), differentiably."""

    @staticmethod
    def forward(ctx: Any, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        needed = [i for i, need in enumerate(ctx.needs_input_grad) if need]
        out: list[Tensor | None] = [None] * len(grads)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in needed:
            by_dtype.setdefault(grads[i].dtype, []).append(i)
        for idx in by_dtype.values():
            flat = _MeanAcrossRanks.apply(torch.cat([grads[i].reshape(-1) for i in idx]))
            for i, piece in zip(idx, torch.split(flat, [grads[i].numel() for i in idx])):
                out[i] = piece.view_as(grads[i])
        return tuple(out)


def sync(params: Mapping[str, Tensor], raw: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, raw)`` through one :class:`_SyncGrad` node: derivatives of a loss of the result are the
    mean over the ranks of the ranks' derivatives. Without autograd (``torch.no_grad``, nothing that
    requires a gradient) or in a one-process run the inputs come back as they are."""
    tensors = [*params.values(), *raw.values()]
    if not current().active or not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return dict(params), dict(raw)
    outs = _SyncGrad.apply(*tensors)
    return dict(zip(params, outs[: len(params)])), dict(zip(raw, outs[len(params) :]))


# ------------------------------------------------------------------------------ a method's own work
@dataclass
class Gatherer:
    """:class:`hoexp.types.Ranks` over the process group: a method that spreads its work over the ranks (ES
    particles) gathers what each computed. ``gather``: one all-gather (a lost peer is :class:`PeerLost`)."""

    ctx: Context

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def size(self) -> int:
        return self.ctx.world_size

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's ``x`` concatenated along dimension 0, in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        _collective(dist.all_gather, parts, x.contiguous())
        return torch.cat(parts)


# ----------------------------------------------------------------------------------- batch shards
def shard_batch(batch: tuple, batch_dim: int, model: Any, ctx: Context) -> tuple:
    """Rank ``ctx.rank``'s shard of a global batch ``(x, y[, noise])``: ``1/N`` of its examples along
    ``batch_dim``, with their dropout noise (sites whose mask shape grows with the batch are split; a
    DropConnect mask, shared by the batch, is kept whole). The global batch size must be a multiple of N."""
    x, y = batch[0], batch[1]
    size = x.shape[batch_dim]
    if size % ctx.world_size:
        raise HoexpError(
            f"a batch of {size} examples cannot be split evenly over {ctx.world_size} processes; "
            f"use a batch size (dataset.batch_size, dataset.val_batch_size, or the split size for "
            f"full batches) that is a multiple of {ctx.world_size}"
        )
    n = size // ctx.world_size
    start = ctx.rank * n
    x_shard, y_shard = x.narrow(batch_dim, start, n), y.narrow(batch_dim, start, n)
    global_noise = noise_of(batch)
    if global_noise is None:
        return Batch(x_shard, y_shard)
    grown, base = model.dropout_sites(size + 1), model.dropout_sites(size)
    noise = {}
    for site, u in global_noise.items():
        dims = [d for d, (a, b) in enumerate(zip(base[site], grown[site])) if a != b]
        noise[site] = u.narrow(dims[0], start, n) if dims else u
    return Batch(x_shard, y_shard, noise)


class ShardedStream:
    """A batch stream whose batches are this rank's shards of the global stream's (its state: the global
    stream's, the same on every rank)."""

    def __init__(self, stream: Any, batch_dim: int, model: Any, ctx: Context):
        self.stream, self.batch_dim, self.model, self.ctx = stream, batch_dim, model, ctx

    def __iter__(self) -> ShardedStream:
        return self

    def __next__(self) -> tuple:
        return shard_batch(next(self.stream), self.batch_dim, self.model, self.ctx)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


# ---------------------------------------------------------------------------------- coordination
def broadcast(obj: Any, ctx: Context) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; tensors come back on the CPU)."""
    if not ctx.active:
        return obj
    box = [obj if ctx.is_main else None]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    _collective(dist.broadcast_object_list, box, src=0, device=device)
    return box[0]


def mean_floats(values: list[float], ctx: Context) -> list[float]:
    """The mean over the ranks of a few host numbers (one small all-reduce)."""
    if not ctx.active or not values:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _collective(dist.all_reduce, t)
    return (t / ctx.world_size).tolist()


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no process group / store: nothing to tell
        return None


def _store_set(key: str, value: str) -> None:
    store = _store()
    if store is not None:
        with contextlib.suppress(Exception):  # best effort: the store's host may be gone
            store.set(key, value)


def tell_ended(status: str, message: str) -> None:
    """Leave ``status`` and ``message`` (one line) for rank 0, which records them in ``summary.json``; and that
    this rank ended knowingly (:func:`dead_peers`)."""
    _store_set(STORE_KEY, f"{status}\t{message}")
    _store_set(f"{STORE_KEY}/{launched().rank}", status)


def dead_peers(ctx: Context) -> list[tuple[int, int]]:
    """``(rank, pid)`` of the other ranks on this host whose process is gone without a word (killed: ``kill -9``,
    out of memory). The launcher then stops the others with SIGTERM, which is not why the job ended.
    Ranks on other hosts cannot be seen from here (never listed)."""
    store, host = _store(), socket.gethostname()
    dead: list[tuple[int, int]] = []
    if store is None:
        return []
    for rank in range(ctx.world_size):
        if rank == ctx.rank:
            continue
        try:
            if store.check([f"{STORE_KEY}/{rank}"]) or not store.check([f"{PROCESS_KEY}/{rank}"]):
                continue
            where, _, pid = store.get(f"{PROCESS_KEY}/{rank}").decode().partition(" ")
        except Exception:  # noqa: BLE001 - the store is gone: nothing to tell
            return dead
        if where == host and not _alive(int(pid)):
            dead.append((rank, int(pid)))
    return dead


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (Linux: a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[:1] != ["Z"]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def why_ended(wait_s: float = 3.0, stop: Any = None) -> tuple[str, str] | None:
    """``(status, message)`` that another rank left (waiting up to ``wait_s``, or until ``stop()``), or None."""
    store = _store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    try:
        while not store.check([STORE_KEY]):  # polled: a timed-out store.wait logs a warning of its own
            if time.monotonic() > deadline or (stop is not None and stop()):
                return None
            time.sleep(0.05)
        status, _, message = store.get(STORE_KEY).decode().partition("\t")
        return status, message
    except Exception:  # noqa: BLE001 - the store is gone (its host ended)
        return None


def finish(ctx: Context) -> None:
    """Leave the process group (at the end of a run)."""
    if ctx.active and dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer already gone
            dist.destroy_process_group()


def quiet_failure(e: BaseException) -> bool:
    """Whether this rank should end without printing ``e``: ranks other than 0 stay quiet for what rank 0
    reports too (configuration errors, divergence, signals, a lost peer); their own failures print."""
    from hoexp.errors import ConfigError

    ctx = launched()
    if not ctx.active:
        return False
    if isinstance(e, PeerLost) and e.reported:
        return True
    if ctx.is_main:
        return False
    return isinstance(e, PeerLost | ConfigError | KeyboardInterrupt) or type(e).__name__ in ("Diverged", "Preempted")


def prefix() -> str:
    """``rank R of N: `` for a message printed by a rank other than 0."""
    ctx = launched()
    return f"rank {ctx.rank} of {ctx.world_size}: " if ctx.active and not ctx.is_main else ""
