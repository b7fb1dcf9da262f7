"""LSTM language model (the AWD-LSTM / Lorraine et al. PTB setup) with explicit dropout masks.

The recurrence is an explicit cell loop rather than ``nn.LSTM``: ``nn.LSTM`` has no forward-mode
AD on CPU and cuDNN RNNs have no double backward, while hypergradients need both (and per-unit
dropout / DropConnect need access to the cell anyway). Every op here is plain autograd, so the
model works with ``torch.func.functional_call``, ``create_graph=True`` and ``torch.func.jvp``.

Dropout is not sampled here: ``forward`` takes multiplicative masks (already scaled, possibly
relaxed and requiring grad) from a hyperparameter family, so every evaluation inside one
hypergradient sees the same function. No masks means no dropout (evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hoexp.components import PositiveInt

State = list[tuple[Tensor, Tensor]]


class LSTMLayer(nn.Module):
    """Parameters of one LSTM layer, laid out exactly as one layer of ``nn.LSTM``.

    ``weight_ih [4H, I]``, ``weight_hh [4H, H]``, ``bias_ih [4H]``, ``bias_hh [4H]``; gate rows in
    the order input, forget, cell (g), output. Initialized like ``nn.LSTM``: ``U(−1/√H, 1/√H)``.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, h: Tensor, c: Tensor, hh_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Run the layer over ``x [T, B, I]`` from ``(h, c)``; returns ``(outputs [T, B, H], h_T, c_T)``.

            gates_t = x_t W_ihᵀ + b_ih + h_{t−1} (W_hh ⊙ M_hh)ᵀ + b_hh,   (i, f, g, o) = chunks
            c_t = σ(f) c_{t−1} + σ(i) tanh(g),   h_t = σ(o) tanh(c_t)

        The input projection for all ``T`` steps is one ``[T·B, I] × [I, 4H]`` matmul; the loop does
        only the recurrent ``[B, H] × [H, 4H]`` matmul and the elementwise gate math.
        Cost: ``O(T·B·4H·(I + H))`` flops; the graph stores ``O(T·B·H)`` activations.
        """
        w_hh = self.weight_hh if hh_mask is None else self.weight_hh * hh_mask
        w_hh_t = w_hh.t()
        xproj = F.linear(x, self.weight_ih, self.bias_ih + self.bias_hh)  # [T, B, 4H]
        outputs = []
        for t in range(x.shape[0]):
            gates = torch.addmm(xproj[t], h, w_hh_t)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs), h, c


class LSTMLanguageModel(nn.Module):
    """``tokens [T, B] → Embedding(V, E) → layers × LSTM → Linear(H_last, V) → logits [T, B, V]``.

    Hidden sizes: ``H_l = hidden`` for every layer except the last; the last layer has
    ``H_last = embed_dim`` when ``tie_weights`` (as AWD-LSTM does, so the decoder can share the
    ``[V, E]`` embedding matrix), else ``hidden``. With ``embed_dim == hidden`` (the PTB setup,
    650/650) all layers have the same size either way.

    Parameter names: ``embedding.weight``, ``lstm.{l}.{weight_ih,weight_hh,bias_ih,bias_hh}``,
    ``decoder.bias`` and, untied only, ``decoder.weight`` (tied, ``decoder.weight`` *is*
    ``embedding.weight``: ``named_parameters()`` lists it once and ``functional_call`` replaces both).

    Dropout sites (``masks`` keys; each optional, multiplicative, already scaled):

    - ``"embedding"`` ``[B, E]``: on the embedding outputs, the same at every time step (variational);
    - ``"layer{l}"`` ``[B, H_l]``, ``l < layers − 1``: on layer ``l``'s output feeding layer ``l + 1``;
    - ``"output"`` ``[B, H_last]``: on the last layer's output before the decoder;
    - ``"hh{l}"`` ``[4H_l, H_l]``: DropConnect, ``W_hh ⊙ mask`` for the whole sequence.

    Any mask shape that broadcasts to the site's shape (e.g. ``[E]``, shared over the batch) is accepted.
    Cost of a forward pass: ``O(T·B·(Σ_l 4H_l(I_l + H_l) + H_last·V))``; the decoder dominates for large V.
    """

    def __init__(
        self, vocab_size: int, embed_dim: int = 650, hidden: int = 650, layers: int = 2, tie_weights: bool = True
    ):
        super().__init__()
        if min(vocab_size, embed_dim, hidden, layers) < 1:
            raise ValueError(
                f"vocab_size, embed_dim, hidden and layers must be positive; got "
                f"{vocab_size}, {embed_dim}, {hidden}, {layers}"
            )
        self.vocab_size, self.embed_dim, self.tie_weights = vocab_size, embed_dim, tie_weights
        last = embed_dim if tie_weights else hidden
        self.hidden_sizes = [hidden] * (layers - 1) + [last]
        inputs = [embed_dim] + self.hidden_sizes[:-1]
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.ModuleList(LSTMLayer(i, h) for i, h in zip(inputs, self.hidden_sizes))
        self.decoder = nn.Linear(last, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # AWD-LSTM's init
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    @property
    def layers(self) -> int:
        return len(self.lstm)

    def unit_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-unit shape of every dropout site (no batch dim): how many rates a per-unit family needs."""
        shapes: dict[str, tuple[int, ...]] = {"embedding": (self.embed_dim,)}
        for i, h in enumerate(self.hidden_sizes[:-1]):
            shapes[f"layer{i}"] = (h,)
        shapes["output"] = (self.hidden_sizes[-1],)
        for i, h in enumerate(self.hidden_sizes):
            shapes[f"hh{i}"] = (4 * h, h)
        return shapes

    def dropout_sites(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Full mask shape of every site for a batch: ``[B, units]`` for activations, ``[4H, H]`` for ``hh{l}``."""
        return {k: s if k.startswith("hh") else (batch_size, *s) for k, s in self.unit_shapes().items()}

    def init_state(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> State:
        """Zero ``(h, c)`` per layer, each ``[B, H_l]``."""
        dtype = dtype or self.embedding.weight.dtype
        device = device or self.embedding.weight.device
        return [
            (
                torch.zeros(batch_size, h, dtype=dtype, device=device),
                torch.zeros(batch_size, h, dtype=dtype, device=device),
            )
            for h in self.hidden_sizes
        ]

    def _check_masks(self, masks: Mapping[str, Tensor], batch_size: int) -> None:
        sites = self.dropout_sites(batch_size)
        unknown = sorted(set(masks) - set(sites))
        if unknown:
            raise ValueError(f"unknown dropout site(s) {unknown}; valid: {', '.join(sites)}")
        for k, m in masks.items():
            try:
                ok = torch.broadcast_shapes(tuple(m.shape), sites[k]) == sites[k]
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"mask '{k}' has shape {tuple(m.shape)}; expected {sites[k]} (or a shape that broadcasts to it)"
                )

    def forward(
        self,
        tokens: Tensor,
        state: Sequence[tuple[Tensor, Tensor]] | None = None,
        masks: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, State]:
        """``tokens [T, B]`` (int64) → ``(logits [T, B, V], [(h_T, c_T) per layer])``.

        ``state``: ``(h, c)`` per layer, each ``[B, H_l]`` (None: zeros). ``masks``: see the class doc.
        The returned state carries the graph; use :func:`detach_state` for truncated BPTT.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [T, B]; got shape {tuple(tokens.shape)}")
        batch = tokens.shape[1]
        masks = masks or {}
        self._check_masks(masks, batch)
        if state is None:
            state = self.init_state(batch)
        elif len(state) != self.layers:
            raise ValueError(f"state has {len(state)} layers; the model has {self.layers}")
        x = self.embedding(tokens)
        if "embedding" in masks:
            x = x * masks["embedding"]
        new_state: State = []
        for i, layer in enumerate(self.lstm):
            h, c = state[i]
            x, h, c = layer(x, h, c, masks.get(f"hh{i}"))
            new_state.append((h, c))
            site = f"layer{i}" if i < self.layers - 1 else "output"
            if site in masks:
                x = x * masks[site]
        return self.decoder(x), new_state


def detach_state(state: Sequence[tuple[Tensor, Tensor]] | None) -> State | None:
    """Cut the graph between segments (truncated BPTT): ``(h, c)`` values kept, history dropped."""
    if state is None:
        return None
    return [(h.detach(), c.detach()) for h, c in state]


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats per token) over all ``T·B`` tokens: ``logits [T, B, V]``, ``targets [T, B]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def perplexity(mean_nll: Tensor | float) -> Tensor | float:
    """``exp(mean NLL per token)``; a tensor in gives a tensor out."""
    return torch.exp(mean_nll) if isinstance(mean_nll, Tensor) else math.exp(mean_nll)


def lstm(
    data: Any,
    *,
    embed_dim: PositiveInt = 200,
    hidden: PositiveInt = 200,
    layers: PositiveInt = 2,
    tie_weights: bool = True,
) -> LSTMLanguageModel:
    """``model=lstm``: an :class:`LSTMLanguageModel` over ``data.vocab_size`` tokens."""
    if not hasattr(data, "vocab_size"):
        raise ValueError(
            "the LSTM language model needs a token stream with a vocabulary, and this dataset gives "
            "feature vectors (model=mlp fits them)"
        )
    return LSTMLanguageModel(data.vocab_size, embed_dim, hidden, layers, tie_weights)
