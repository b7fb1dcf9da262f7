"""The language-modelling problem (PTB + LSTM): BPTT windows as batches, perplexity metrics.

A batch is ``(input [T, B], target [T, B])`` (plus dropout noise): one BPTT window of the batchified
token stream. Each window starts from a zero LSTM state, so the training loss of a batch is a pure
function of ``(params, raw)`` like every other problem's (carrying the state across windows would
make it depend on the previous parameters); evaluation carries the state through the whole stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import functional_call

from hoexp.dataset.ptb import batchify, bptt_batch
from hoexp.model.lstm import lm_loss
from hoexp.problem import Batch, Problem


@dataclass
class LMData:
    """Batchified streams: ``train`` [N, B] for training windows, ``val``/``test`` [N, B_eval] for evaluation,
    ``val_train_layout`` [N, B] for hypergradient windows on validation text."""

    train: Tensor
    val: Tensor
    test: Tensor
    val_train_layout: Tensor
    vocab_size: int
    bptt: int
    task: str = "language_model"
    train_eval: Tensor | None = None  # the training tokens that training metrics are measured on
    batch_size: int = 0  # the streams are already batchified; kept for the data-layout interface
    val_batch_size: int = 0

    def problem(self, model: Any, family: Any) -> LMProblem:
        """The language-modelling problem: next-token cross-entropy over ``bptt``-token windows."""
        lm = LMProblem(model, family)
        lm.bptt = self.bptt
        return lm

    def to(self, device) -> LMData:
        return LMData(self.train.to(device), self.val.to(device), self.test.to(device),
                      self.val_train_layout.to(device), self.vocab_size, self.bptt,
                      train_eval=None if self.train_eval is None else self.train_eval.to(device))


def lm_data(splits, batch_size: int, eval_batch_size: int, bptt: int) -> LMData:
    """Batchified streams. Training metrics are measured on the first ``len(val)`` training tokens
    (``train_eval``): a full pass over the training text at every evaluation would cost more than
    the training it reports on."""
    data = LMData(batchify(splits.train, batch_size), batchify(splits.val, eval_batch_size),
                  batchify(splits.test, eval_batch_size), batchify(splits.val, batch_size),
                  splits.vocab_size, bptt)
    data.train_eval = batchify(splits.train[: len(splits.val)], eval_batch_size)
    return data


class LMProblem(Problem):
    """``L_T`` = mean next-token cross-entropy of a training window (dropout masks, penalty);
    ``L_V`` = the same on a validation window without dropout."""

    task = "language_model"
    batch_dim = 1  # windows are [T, B]
    bptt: int  # the window length (dataset.bptt), set on the instance by build

    def batch_size(self, x: Tensor) -> int:
        return x.shape[1]

    def logits(self, params: Mapping[str, Tensor], x: Tensor, masks: Mapping[str, Tensor] | None = None) -> Tensor:
        kwargs = {"masks": masks} if masks else {}
        return functional_call(self.model, dict(params), (x,), kwargs)[0]

    def output_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return lm_loss(logits, targets)

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, Tensor], source: Tensor) -> tuple[Tensor, Tensor]:
        """Mean NLL per token and next-token accuracy over a whole batchified stream (state carried)."""
        state, count = None, 0
        nll: Tensor | float = 0.0
        correct: Tensor | float = 0.0
        bptt = getattr(self, "bptt", 35)
        for i in range(0, source.shape[0] - 1, bptt):
            inp, tgt = bptt_batch(source, i, bptt)
            logits, state = functional_call(self.model, dict(params), (inp,), {"state": state})
            nll = nll + lm_loss(logits, tgt) * tgt.numel()
            correct = correct + (logits.argmax(-1) == tgt).sum()
            count += tgt.numel()
        # tensors after the first window (a stream has at least one)
        return cast(Tensor, nll) / count, (cast(Tensor, correct) / count).to(torch.float32)


class BPTTStream:
    """Consecutive BPTT windows of ``source`` [N, B], wrapping around at the end (an epoch).

    With a generator, windows start at seeded random offsets instead (validation windows for
    hypergradients). The position is the stream's whole state.
    """

    def __init__(self, source: Tensor, bptt: int, generator: torch.Generator | None = None):
        self.source, self.bptt, self.generator = source, bptt, generator
        self.pos = 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        n = self.source.shape[0] - 1
        if self.generator is not None:
            i = int(torch.randint(0, max(n - self.bptt, 1), (1,), generator=self.generator))
        else:
            if self.pos >= n - 1:
                self.pos = 0
            i = self.pos
            self.pos += self.bptt
        return bptt_batch(self.source, i, self.bptt)

    def state_dict(self) -> dict:
        return {"pos": self.pos, "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
