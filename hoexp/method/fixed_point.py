"""The fixed-point inner loop of reversible learning (:mod:`hoexp.method.reversible` has the method):
weights and velocities as int64 multiples of ``2^-R``, momenta as rationals ``γ = N/D``, the information
buffer that makes ``v ← γ v`` invertible, and :class:`FixedPointSteps`, the problem seen at fixed-point
weights by both passes.

With ``γ = N/D`` (``D = 2^k``, ``N = round(γ D)``), Maclaurin's trick makes ``v ← γ v`` invertible::

    forward  v ← γ v :  B ← B·D + (v mod D);  v ← (v div D)·N;  v ← v + (B mod N);  B ← B div N
    reverse  v ← v / γ:  B ← B·N + (v mod N);  v ← (v div N)·D;  v ← v + (B mod D);  B ← B div D

where ``B`` is one arbitrary-precision natural number per weight (the information buffer). Each
multiplication grows ``B`` by a factor ``D/N``: ``log2(1/γ)`` bits per weight per step. Precisely,
from ``B' + 1 ≤ (D/N)(B + 1) + 1`` and ``B_0 = 0``,

    bit_length(B_i) ≤ Σ_t log2(D/N_t) + log2(1/(1 − γ_max)) + 1,

so the per-weight constant over ``T·log2(1/γ)`` is ``log2(1/(1−γ)) + 1`` bits (4.32 at γ = 0.9).
The price of this order (push, then pop) is that the low ``log2 N`` bits of ``v`` are replaced by
buffer digits: ``|γ·v − v_new| < N ≤ 2^k`` units, i.e. ``< 2^(k−R)`` in value per multiplication.
(Multiplying first and dithering with a popped digit would err by < 1 unit but costs ``k`` more
bits per weight, since pops from the initially empty buffer return no information.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hoexp import tree

__all__ = [
    "FixedPointSteps",
    "InfoBuffer",
    "Schedule",
    "TrainLossFn",
    "check_range",
    "div_gamma",
    "fingerprint",
    "from_fixed",
    "mul_gamma",
    "rational_momenta",
    "rational_momentum",
    "to_fixed",
]

TrainLossFn = Callable[[dict[str, Tensor], dict[str, Tensor], int], Tensor]
Schedule = Callable[[dict[str, Tensor], int], tuple[Tensor, Tensor]]

_LIMIT = 2**62  # every fixed-point integer stays below this (int64 headroom for one addition)


class InfoBuffer:
    """One arbitrary-precision natural number per weight, used as a mixed-radix stack of digits.

    ``push(d, base)``: ``B ← B·base + d`` (``0 ≤ d < base``); ``pop(base)``: ``d = B mod base``,
    ``B ← B div base``. A pop after the matching push returns the digit and restores ``B``; popping
    a base-N digit after pushing a base-D one stores ``log2(D/N)`` net bits. Python ints in a numpy
    object array: each operation is O(P) big-integer operations on the host.
    """

    def __init__(self, n: int):
        self._b = np.zeros(n, dtype=object)  # Python int 0s

    def push(self, digits: Tensor, base: int | Tensor) -> None:
        self._b = self._b * _objects(base) + digits.detach().cpu().numpy().astype(object)

    def pop(self, base: int | Tensor, device: torch.device | str = "cpu") -> Tensor:
        base = _objects(base)
        digits = self._b % base
        self._b = self._b // base
        return torch.from_numpy(digits.astype(np.int64)).to(device)

    def bit_lengths(self) -> list[int]:
        """Each weight's number's bit length."""
        return [int(x).bit_length() for x in self._b]

    def bits_used(self) -> int:
        """Total size: the sum of the numbers' bit lengths."""
        return sum(self.bit_lengths())


def _objects(base: int | Tensor) -> Any:
    """A base for :class:`InfoBuffer`: an int, or one per weight as Python ints (an object array)."""
    return base.detach().cpu().numpy().astype(object) if isinstance(base, Tensor) else base


def check_range(x: Tensor, what: str, radix_bits: int) -> Tensor:
    """``x`` unchanged once every fixed-point integer in it is below ``2^62`` in magnitude (else an
    ``OverflowError`` naming ``what``)."""
    if x.numel() and int(x.abs().max()) >= _LIMIT:
        raise OverflowError(
            f"reversible learning: {what} left the fixed-point range |x| < 2^{62 - radix_bits}; "
            f"lower radix_bits (now {radix_bits}) or the learning rate"
        )
    return x


def to_fixed(x: Tensor, radix_bits: int) -> Tensor:
    """``round(x · 2^R)`` as int64 (exact for float64 ``x`` whose last mantissa bit is ≥ 2^-R)."""
    scaled = torch.round(x.detach().to(torch.float64) * 2.0**radix_bits)
    if scaled.numel() and not bool(torch.isfinite(scaled).all()):
        raise OverflowError("reversible learning: non-finite value (the inner loop diverged)")
    check_range(scaled, "a value", radix_bits)
    return scaled.to(torch.int64)


def from_fixed(x: Tensor, radix_bits: int) -> Tensor:
    """The float64 view ``x · 2^-R`` (exact while ``|x| < 2^53``)."""
    return x.to(torch.float64) * 2.0**-radix_bits


def rational_momentum(gamma: float, momentum_bits: int = 16) -> tuple[int, int]:
    """``γ ≈ N/D`` with ``D = 2^k``, ``N = round(γ D)``; requires ``0 < N ≤ D`` (γ = 0 is irreversible)."""
    d = 2**momentum_bits
    n = round(float(gamma) * d)
    if not 0 < n <= d:
        raise ValueError(
            f"reversible learning needs momentum in (0, 1] (γ = 0 forgets v and cannot be reversed); got {gamma}"
        )
    return n, d


def rational_momenta(gamma: Tensor, momentum_bits: int = 16) -> tuple[Tensor, int]:
    """:func:`rational_momentum` of each entry: ``(N as int64, D)``."""
    d = 2**momentum_bits
    n = torch.round(gamma.detach().to(torch.float64) * d).to(torch.int64)
    if n.numel() and not bool(((n > 0) & (n <= d)).all()):
        raise ValueError(
            "reversible learning needs momentum in (0, 1] (γ = 0 forgets v and cannot be reversed); "
            f"got values in [{float(gamma.min())}, {float(gamma.max())}]"
        )
    return n, d


def mul_gamma(v: Tensor, n: int | Tensor, d: int, k: int, buf: InfoBuffer) -> Tensor:
    """``v ← (N/D)·v`` exactly invertibly; ``D = 2^k``."""
    buf.push(v & (d - 1), d)  # v mod D (non-negative for two's complement)
    q = v >> k  # floor(v / D)
    return q * n + buf.pop(n, v.device)


def div_gamma(v: Tensor, n: int | Tensor, d: int, radix_bits: int, buf: InfoBuffer) -> Tensor:
    """The exact inverse of :func:`mul_gamma`."""
    buf.push(torch.remainder(v, n), n)
    q = torch.div(v, n, rounding_mode="floor")
    check_range(q.to(torch.float64) * d, "the velocity (reverse division by γ)", radix_bits)
    return q * d + buf.pop(d, v.device)


def fingerprint(x: Tensor) -> tuple[int, int]:
    """Two overflow-free sums of an int64 tensor; any change in one element changes one of them."""
    return int((x & 0xFFFFFFFF).sum()), int((x >> 32).sum())


@dataclass
class FixedPointSteps:
    """What the forward and the reverse pass share, computed the same way in both: step ``t``'s rates,
    the float view of fixed-point weights, and ``∇_w L_T`` there."""

    train_loss: TrainLossFn
    like: dict[str, Tensor]  # names, shapes and dtypes of the parameters
    raw_leaves: dict[str, Tensor]  # λ as leaves that require grad
    radix_bits: int  # R
    momentum_bits: int  # k
    device: torch.device
    schedule: Schedule | None
    alphas: Tensor | None  # α_t without a schedule
    rationals: list[tuple[int, int]] | None  # γ_t = N_t/D without a schedule

    @property
    def num_params(self) -> int:
        return tree.numel(self.like)

    def at(self, t: int, graph: bool = False) -> tuple[Any, Any, Any, Any, tuple[Tensor, Tensor] | None]:
        """Step ``t``'s ``(α, N, γ = N/D, 1 − γ, (α, γ) with their graph to raw or None)``: floats and
        ints, or per-weight tensors under a schedule (computed the same way forward and in reverse)."""
        if self.schedule is None:
            assert self.alphas is not None and self.rationals is not None
            n, d = self.rationals[t]
            return float(self.alphas[t]), n, n / d, (d - n) / d, None
        P = self.num_params
        with torch.set_grad_enabled(graph):
            a, g = (
                torch.as_tensor(x, dtype=torch.float64, device=self.device).expand(P)
                for x in self.schedule(self.raw_leaves, t)
            )
        nt, dt = rational_momenta(g, self.momentum_bits)
        gamma = nt.to(torch.float64) / dt  # exact: N < 2^31, D a power of two
        return a.detach(), nt, gamma, 1.0 - gamma, ((a, g) if graph else None)

    def params(self, w_flat: Tensor) -> dict[str, Tensor]:
        """The parameters (their own dtypes) of a flat float64 vector."""
        return {name: p.to(self.like[name].dtype) for name, p in tree.unflatten(w_flat, self.like).items()}

    def view(self, w_int: Tensor) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.params(from_fixed(w_int, self.radix_bits)).items()}

    def grad_at(self, w_int: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """(w leaf, L_T, ∇_w L_T with graph) at the float view of ``w_int``; the same code both ways."""
        w_leaf = from_fixed(w_int, self.radix_bits).requires_grad_(True)
        loss = self.train_loss(self.params(w_leaf), self.raw_leaves, t)
        (g,) = torch.autograd.grad(loss, w_leaf, create_graph=True, allow_unused=True)
        return w_leaf, loss, (torch.zeros_like(w_leaf) if g is None else g)
