"""Multi-layer perceptron, used through ``torch.func.functional_call`` with explicit parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from hoexp.components import NonNegInt, PositiveInt

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
}


class MLP(nn.Module):
    """``in → width × depth → out``: ``depth`` hidden layers of ``width`` units and an activation.

    Parameter names are ``layers.{i}.weight`` / ``layers.{i}.bias`` (the output layer is last).
    Smooth activations (tanh, softplus, gelu) give Hessians without the kinks of ReLU.

    Dropout sites (multiplicative masks given to :meth:`forward`, e.g. by the dropout family):
    ``input`` ([B, in], on the inputs) and ``hidden{i}`` ([B, width], after hidden layer ``i``'s
    activation). No masks: no dropout (evaluation).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        width: int = 128,
        depth: int = 2,
        activation: str = "relu",
        bias: bool = True,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; valid: {', '.join(sorted(ACTIVATIONS))}")
        sizes = [in_features] + [width] * depth + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = ACTIVATIONS[activation]()
        self.in_features, self.width, self.depth = in_features, width, depth

    def unit_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-unit shape of every dropout site (without the batch dimension)."""
        return {"input": (self.in_features,), **{f"hidden{i}": (self.width,) for i in range(self.depth)}}

    def dropout_sites(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {k: (batch_size, *v) for k, v in self.unit_shapes().items()}

    def forward(self, x: Tensor, masks: Mapping[str, Tensor] | None = None) -> Tensor:
        return self.functional_forward({}, x, masks)

    def functional_forward(
        self, params: Mapping[str, Tensor], x: Tensor, masks: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """:meth:`forward` with the parameters ``params`` (by name; the module's own where absent): what
        ``functional_call(self, params, (x,))`` computes, as a pure function, without swapping the module's
        parameters in and out on every call (most of a small model's forward time)."""
        if masks and "input" in masks:
            x = x * masks["input"]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, nn.Linear)
            weight = params.get(f"layers.{i}.weight", layer.weight)
            bias = params.get(f"layers.{i}.bias", layer.bias) if layer.bias is not None else None
            x = F.linear(x, weight, bias)
            if i == last:
                return x
            x = self.activation(x)
            if masks and f"hidden{i}" in masks:
                x = x * masks[f"hidden{i}"]
        raise AssertionError("an MLP has an output layer")


def mlp(
    data: Any,
    *,
    width: PositiveInt = 128,
    depth: NonNegInt = 2,
    activation: Literal["relu", "tanh", "gelu", "elu", "softplus", "sigmoid"] = "relu",
    bias: bool = False,
    init: Literal["random", "zeros"] = "random",
) -> MLP:
    """``model=mlp``: an :class:`MLP` sized by ``data`` (``num_features`` inputs, ``num_classes`` outputs).
    ``init``: PyTorch's random initialization, or ``zeros`` (a linear model, ``depth=0``, started at ``w = 0``
    as benchopt's bilevel benchmark starts it)."""
    if not hasattr(data, "num_features"):
        raise ValueError(
            "the MLP needs feature inputs and class labels, and this dataset gives token streams (model=lstm fits text)"
        )
    if init == "zeros" and depth:
        raise ValueError(
            f"model.init=zeros leaves every hidden unit alike (and a ReLU MLP without gradient); use model.init=random "
            f"with model.depth={depth}, or model.depth=0 (a linear model)"
        )
    model = MLP(data.num_features, data.num_classes, width, depth, activation, bias)
    if init == "zeros":
        for p in model.parameters():
            nn.init.zeros_(p)
    return model
