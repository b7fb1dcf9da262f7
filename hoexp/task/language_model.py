"""Language modelling (PTB + LSTM): BPTT windows as batches, perplexity metrics.

A batch is ``(input [T, B], target [T, B])`` (plus dropout noise): one BPTT window of the batchified
token stream. Each window starts from a zero LSTM state, so the training loss of a batch is a pure
function of ``(params, raw)`` like every other task's (carrying the state across windows would
make it depend on the previous parameters); evaluation carries the state through the whole stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import functional_call

from hoexp.model.lstm import lm_loss
from hoexp.task.base import BatchStream
from hoexp.task.classification import Classification
from hoexp.task.streams import VAL_SEED, BPTTStream, batchify, bptt_batch


@dataclass
class LMData:
    """Batchified streams: ``train`` [N, B] for training windows, ``val``/``test`` [N, B_eval] for evaluation,
    ``val_train_layout`` [N, B_val] for hypergradient windows on validation text."""

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

    def problem(self, model: Any, family: Any) -> LanguageModel:
        """The language-modelling task: next-token cross-entropy over ``bptt``-token windows."""
        return LanguageModel(model, family, data=self, bptt=self.bptt)

    def to(self, device) -> LMData:
        return LMData(
            self.train.to(device),
            self.val.to(device),
            self.test.to(device),
            self.val_train_layout.to(device),
            self.vocab_size,
            self.bptt,
            train_eval=None if self.train_eval is None else self.train_eval.to(device),
        )


def lm_data(splits, batch_size: int, eval_batch_size: int, bptt: int, *, val_batch_size: int = 0) -> LMData:
    """Batchified streams; hypergradient windows of validation text have ``val_batch_size`` streams
    (0: ``batch_size``). Training metrics are measured on the first ``len(val)`` training tokens
    (``train_eval``): a full pass over the training text at every evaluation would cost more than
    the training it reports on."""
    data = LMData(
        batchify(splits.train, batch_size),
        batchify(splits.val, eval_batch_size),
        batchify(splits.test, eval_batch_size),
        batchify(splits.val, val_batch_size or batch_size),
        splits.vocab_size,
        bptt,
    )
    data.train_eval = batchify(splits.train[: len(splits.val)], eval_batch_size)
    return data


@dataclass
class LanguageModel(Classification):
    """``L_T`` = mean next-token cross-entropy of a training window (dropout masks, penalty);
    ``L_V`` = the same on a validation window without dropout. ``bptt``: the window length."""

    bptt: int = 35
    batch_dim = 1  # windows are [T, B]

    def batch_size_of(self, x: Tensor) -> int:
        return x.shape[1]

    def logits(self, params: Mapping[str, Tensor], x: Tensor, masks: Mapping[str, Tensor] | None = None) -> Tensor:
        kwargs = {"masks": masks} if masks else {}
        return functional_call(self.model, dict(params), (x,), kwargs)[0]

    def output_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return lm_loss(logits, targets)

    def train_stream(self, seed: int) -> BatchStream:
        """Consecutive BPTT windows of the training text (with dropout noise when the family has dropout)."""
        return self.with_noise(BPTTStream(self.data.train, self.bptt), seed)

    def val_stream(self, seed: int, outer_objective: str = "val") -> BatchStream:
        """Random BPTT windows of validation text in the training layout (or of the training text with
        ``outer_objective="train"``)."""
        source = self.data.train if outer_objective == "train" else self.data.val_train_layout
        return BPTTStream(source, self.bptt, torch.Generator().manual_seed(seed + VAL_SEED))

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, Tensor], source: Any) -> tuple[Tensor, Tensor]:
        """Mean NLL per token and next-token accuracy over a whole batchified stream (state carried)."""
        state, count = None, 0
        nll: Tensor | float = 0.0
        correct: Tensor | float = 0.0
        for i in range(0, source.shape[0] - 1, self.bptt):
            inp, tgt = bptt_batch(source, i, self.bptt)
            logits, state = functional_call(self.model, dict(params), (inp,), {"state": state})
            nll = nll + lm_loss(logits, tgt) * tgt.numel()
            correct = correct + (logits.argmax(-1) == tgt).sum()
            count += tgt.numel()
        # tensors after the first window (a stream has at least one)
        return cast(Tensor, nll) / count, (cast(Tensor, correct) / count).to(torch.float32)

    def eval_splits(self) -> tuple[Any, Any, Any]:
        train = self.data.train if self.data.train_eval is None else self.data.train_eval
        return train, self.data.val, self.data.test

    def derived_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Perplexity ``exp(mean NLL per token)`` of every split (capped where exp overflows)."""
        return {f"{split}_ppl": math.exp(min(metrics[f"{split}_loss"], 700.0)) for split in ("train", "val", "test")}
