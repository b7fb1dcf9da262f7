"""Multi-layer perceptron, used through ``torch.func.functional_call`` with explicit parameters."""

from __future__ import annotations

from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU, "softplus": nn.Softplus,
               "sigmoid": nn.Sigmoid}


class MLP(nn.Module):
    """``in → width × depth → out``: ``depth`` hidden layers of ``width`` units and an activation.

    Parameter names are ``layers.{i}.weight`` / ``layers.{i}.bias`` (the output layer is last).
    Smooth activations (tanh, softplus, gelu) give Hessians without the kinks of ReLU.
    """

    def __init__(self, in_features: int, out_features: int, width: int = 128, depth: int = 2,
                 activation: str = "relu", bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; valid: {', '.join(sorted(ACTIVATIONS))}")
        sizes = [in_features] + [width] * depth + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)
