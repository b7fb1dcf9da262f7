"""The bilevel problem: a model, its data losses, and a hyperparameter family's effect on training.

Losses are pure functions of explicit ``params`` / ``raw`` hyperparameter dicts
(``torch.func.functional_call``), so every hypergradient method can differentiate them freely.
A training batch is ``(x, y)`` or ``(x, y, noise)``: dropout noise is drawn once when the batch is
drawn (:class:`NoisyBatches`) and travels with it, so the training loss of a batch is a
deterministic function of ``(params, raw)`` — every HVP of a solve and every unrolled step sees
the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hoexp.dataset.base import Split
from hoexp.hp.base import HyperFamily

if TYPE_CHECKING:
    from hoexp.lm import LMProblem

Batch = tuple  # (x, y) or (x, y, noise: dict[str, Tensor])


class BatchStream(Iterator[Batch], Protocol):
    """An endless batch iterator whose position is checkpointed (``state_dict`` / ``load_state_dict``)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _DropoutModel(Protocol):
    def dropout_sites(self, batch_size: int) -> dict[str, tuple[int, ...]]: ...


class _DropoutFamily(Protocol):
    def noise(self, mask_shapes: Mapping[str, tuple[int, ...]], generator: torch.Generator, like: Tensor,
              ) -> dict[str, Tensor]: ...


@dataclass
class Problem:
    """``L_T(w, λ) = CE(f_w(x_train), y_train) + penalty_λ(w)`` and ``L_V(w) = CE(f_w(x_val), y_val)``.

    The validation loss is the plain data loss: a penalty in ``L_V`` would reward larger decays for
    their own sake (one of the bugs of the reference write-up's code).
    """

    model: nn.Module
    family: HyperFamily
    compile: bool = False  # run.compile: plain training steps through torch.compile (hoexp.method.base)
    compiled: dict = field(default_factory=dict, repr=False)  # inner optimizer → its compiled step
    # Data-parallel runs (hoexp.distributed.sync): (params, raw) → the same values through a node that
    # averages their gradients over the ranks; applied where a data loss reads them. None: one process.
    sync: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], tuple[dict, dict]] | None = field(
        default=None, repr=False)
    # Inner training steps in mixed precision (hoexp.precision.Precision: autocast, fp16 loss scaling); None:
    # the run's dtype. Only plain training steps use it (step_loss), never a hypergradient's derivatives.
    precision: Any = field(default=None, repr=False)
    task = "classification"
    batch_dim = 0  # the examples' dimension of a batch's inputs and targets (data-parallel shards split it)

    def synced(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: Batch | None = None,
               ) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor]]:
        """``(params, raw)`` as the data loss of ``batch`` should read them: through ``sync`` in a data-parallel
        run (``raw`` only where the batch's masks read it; ``batch`` None: never)."""
        if self.sync is None:
            return params, raw
        reads_raw = batch is not None and len(batch) >= 3 and hasattr(self.family, "masks")
        w, r = self.sync(params, raw if reads_raw else {})
        return w, (r if reads_raw else raw)

    def batch_size(self, x: Tensor) -> int:
        """Examples in a batch's input (the dimension dropout masks are drawn over)."""
        return x.shape[0]

    def logits(self, params: Mapping[str, Tensor], x: Tensor, masks: Mapping[str, Tensor] | None = None) -> Tensor:
        if masks:
            return functional_call(self.model, dict(params), (x,), {"masks": masks})
        return functional_call(self.model, dict(params), (x,))

    def output_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The data loss of the model's outputs (mean cross-entropy: convex in the logits)."""
        return F.cross_entropy(logits, targets)

    def data_loss(self, params: Mapping[str, Tensor], batch: Batch,
                  masks: Mapping[str, Tensor] | None = None) -> Tensor:
        return self.output_loss(self.logits(params, batch[0], masks), batch[1])

    def masks(self, raw: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor] | None:
        """The family's dropout masks for this batch's noise (None without noise or dropout)."""
        if len(batch) < 3 or not hasattr(self.family, "masks"):
            return None
        return self.family.masks(raw, batch[2])

    def train_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: Batch) -> Tensor:
        w, r = self.synced(params, raw, batch)  # the penalty is the same on every rank: its gradient needs no mean
        return self.data_loss(w, batch, self.masks(r, batch)) + self.family.penalty(params, raw)

    def step_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """The training loss of a plain training step: :meth:`train_loss`, under autocast with ``precision``."""
        if self.precision is None:
            return self.train_loss(params, raw, batch)
        with self.precision.autocast():
            return self.train_loss(params, raw, batch).float()

    def train_parts(self, batch: Batch) -> tuple[Callable, Callable, Callable]:
        """``train_loss(·, ·, batch)`` split as ``(outputs(w, raw), output_loss(z), penalty(w, raw))``:
        ``L_T = output_loss(outputs(w, raw)) + penalty(w, raw)`` (a Gauss-Newton curvature needs the
        outputs; ``hoexp.method.curvature.SplitLoss``)."""
        def outputs(w: Mapping[str, Tensor], raw: Mapping[str, Tensor]) -> Tensor:
            w, raw = self.synced(w, raw, batch)
            return self.logits(w, batch[0], self.masks(raw, batch))

        return outputs, lambda z: self.output_loss(z, batch[1]), self.family.penalty

    def val_loss(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], batch: Batch) -> Tensor:
        return self.data_loss(self.synced(params, raw)[0], batch)  # L_V reads no hyperparameter

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, Tensor], split: Any) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy and accuracy on a whole split (0-d tensors; no host sync).

        ``split``: a :class:`Split` here; a subclass evaluates its own data (``LMProblem``: a token stream)."""
        logits = self.logits(params, split.x)
        loss = F.cross_entropy(logits, split.y)
        acc = (logits.argmax(-1) == split.y).to(logits.dtype).mean()
        return loss, acc


class FullBatch:
    """The whole split as every batch (the full-batch setting of the Iris experiment)."""

    def __init__(self, split: Split):
        self.batch = (split.x, split.y)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoisyBatches:
    """Adds fresh dropout noise to every batch of ``batches`` (from a seeded CPU generator)."""

    def __init__(self, batches: BatchStream, problem: Problem, generator: torch.Generator):
        self.batches, self.problem, self.generator = batches, problem, generator

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        x, y = next(self.batches)[:2]
        # Wrapped only around problems whose family has dropout (see training_batches), on a model with sites.
        model, family = cast(_DropoutModel, self.problem.model), cast(_DropoutFamily, self.problem.family)
        shapes = model.dropout_sites(self.problem.batch_size(x))
        return (x, y, family.noise(shapes, self.generator, x if x.is_floating_point()
                                   else next(self.problem.model.parameters())))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches.load_state_dict(state["batches"])


def training_batches(problem: Problem, split, seed: int, batch_size: int = 0) -> BatchStream:
    """The training stream of a run: full batches (``batch_size`` 0), seeded minibatches, or BPTT
    windows (language models), with fresh dropout noise when the family has dropout."""
    if problem.task == "language_model":
        from hoexp.lm import BPTTStream

        batches: BatchStream = BPTTStream(split, cast("LMProblem", problem).bptt)  # the language_model task's
    elif batch_size and batch_size < len(split):
        batches = Minibatches(split, batch_size, torch.Generator().manual_seed(seed + 7919))
    else:
        batches = FullBatch(split)
    if hasattr(problem.family, "masks"):
        batches = NoisyBatches(batches, problem, torch.Generator().manual_seed(seed + 1_000_003))
    return batches


def validation_batches(problem: Problem, split, seed: int, batch_size: int = 0) -> BatchStream:
    """The batches hypergradients are evaluated on: the whole split, seeded minibatches of it, or
    random BPTT windows of validation text (language models)."""
    generator = torch.Generator().manual_seed(seed + 104_729)
    if problem.task == "language_model":
        from hoexp.lm import BPTTStream

        return BPTTStream(split, cast("LMProblem", problem).bptt, generator)
    if 0 < batch_size < len(split):
        return Minibatches(split, batch_size, generator)
    return FullBatch(split)


class Minibatches:
    """An endless stream of minibatches of ``split``: a fresh seeded permutation every epoch.

    The generator is the stream's whole state, so a stream (and a resumed run) is reproducible.
    """

    def __init__(self, split: Split, batch_size: int, generator: torch.Generator):
        self.split, self.batch_size, self.generator = split, batch_size, generator
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.pos + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.split), generator=self.generator)
            self.pos = 0
        # non_blocking: a blocking host→device copy would wait for every queued kernel (a sync per step)
        idx = self.order[self.pos:self.pos + self.batch_size].to(self.split.x.device, non_blocking=True)
        self.pos += self.batch_size
        return (self.split.x[idx], self.split.y[idx])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos = state["order"].clone(), int(state["pos"])
