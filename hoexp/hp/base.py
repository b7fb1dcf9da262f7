"""The hyperparameter-family protocol.

A family owns an unconstrained ``raw`` tensor dict (what the outer optimizer updates), a
constrained view of it (what users read in logs), and its effect on training: a penalty added to
the training loss, and (for families added later) model forward arguments or optimizer values.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Protocol

from torch import Tensor

Params = Mapping[str, Tensor]


class HyperFamily(Protocol):
    # Read-only members: frozen dataclass fields and properties (Composite) both provide them.
    @property
    def name(self) -> str: ...

    # False for families that change only the optimization path (learning rate, momentum):
    # they do not move w*, so implicit differentiation cannot tune them.
    @property
    def moves_optimum(self) -> bool: ...

    # Optional ``pathwise: bool`` (default true): whether the training loss is differentiable in ``raw`` in a
    # way that reflects the family's effect; false (hard dropout masks) refuses methods that need it
    # (``needs_pathwise_hp``, hoexp.config.build.check_pathwise).

    def init(self, params: Params) -> dict[str, Tensor]: ...

    def view(self, raw: Params) -> dict[str, Tensor]: ...

    def penalty(self, params: Params, raw: Params) -> Tensor | float: ...

    def clamp(self, raw: Params) -> dict[str, Tensor]: ...

    def optimizer_overrides(self, raw: Params, step: int) -> dict: ...  # {"lr": ...} for lr families; step = inner step


def select(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Parameter names matching any of the shell-style ``patterns`` (``*weight``, ``layers.0.*``)."""
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
