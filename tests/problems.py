"""Small bilevel problems with exact answers, shared by the hypergradient tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Ridge:
    """Per-weight ridge regression: ``L_T = ½‖Xw − y‖²/n + ½ Σ exp(r_i) w_i²``, ``L_V = ½‖X_v w − y_v‖²/m``.

    ``w*(r) = (XᵀX/n + diag(e^r))⁻¹ Xᵀy/n`` in closed form, so differentiating the solve gives
    the exact hypergradient.
    """

    X: Tensor
    y: Tensor
    Xv: Tensor
    yv: Tensor
    raw: Tensor

    @staticmethod
    def make(n=40, m=30, d=8, seed=0, dtype=torch.float64) -> Ridge:
        g = torch.Generator().manual_seed(seed)
        w_true = torch.randn(d, generator=g, dtype=dtype)
        X = torch.randn(n, d, generator=g, dtype=dtype)
        Xv = torch.randn(m, d, generator=g, dtype=dtype)
        y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=dtype)
        yv = Xv @ w_true + 0.5 * torch.randn(m, generator=g, dtype=dtype)
        raw = torch.log(torch.rand(d, generator=g, dtype=dtype) * 0.5 + 0.05)
        return Ridge(X, y, Xv, yv, raw)

    def train_loss(self, params, hparams):
        w = params["w"]
        r = self.X @ w - self.y
        return 0.5 * (r @ r) / len(self.y) + 0.5 * (torch.exp(hparams["log_decay"]) * w**2).sum()

    def val_loss(self, params, hparams):
        r = self.Xv @ params["w"] - self.yv
        return 0.5 * (r @ r) / len(self.yv)

    def w_star(self, raw: Tensor) -> Tensor:
        n = len(self.y)
        A = self.X.T @ self.X / n + torch.diag(torch.exp(raw))
        return torch.linalg.solve(A, self.X.T @ self.y / n)

    def exact_hypergradient(self) -> Tensor:
        raw = self.raw.detach().clone().requires_grad_(True)
        loss = self.val_loss({"w": self.w_star(raw)}, {"log_decay": raw})
        (g,) = torch.autograd.grad(loss, raw)
        return g

    def hessian(self) -> Tensor:
        return self.X.T @ self.X / len(self.y) + torch.diag(torch.exp(self.raw))


def rel_err(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1))[0])
