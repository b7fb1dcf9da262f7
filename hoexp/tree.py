"""Helpers for ``dict[str, Tensor]`` trees (parameters, hyperparameters, gradients).

Solvers work on one flat vector (fused arithmetic, no Python loop per tensor); these helpers
move between the dict view users and models see and that flat view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

Tree = dict[str, Tensor]


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one host sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors into one 1-D vector (differentiable; one copy)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Tree:
    """Split a flat vector into views shaped like ``like`` (no copy)."""
    sizes = [t.numel() for t in like.values()]
    pieces = torch.split(vector, sizes)
    return {k: p.view(t.shape) for (k, t), p in zip(like.items(), pieces)}


def fill_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    """Replace ``None`` gradients (inputs unused by the output) with zeros."""
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def detached(tree: Mapping[str, Tensor], requires_grad: bool = False) -> Tree:
    """Fresh leaves that share storage with ``tree`` but none of its graph."""
    return {k: v.detach().requires_grad_(requires_grad) for k, v in tree.items()}


def numel(tree: Mapping[str, Tensor]) -> int:
    return sum(t.numel() for t in tree.values())


def norm(tree: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm of all entries together (a 0-d tensor; no host sync)."""
    if not tree:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tree.values()]))
