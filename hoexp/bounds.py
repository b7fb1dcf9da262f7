"""What an option's annotation declares about its values: :class:`Range` and the usual aliases
(``terms: NonNegInt = 5``, ``Annotated[float, Range(gt=0, le=1)]``), checked before anything runs
(:mod:`hoexp.config.explain`). Re-exported by :mod:`hoexp.components`; a module of its own so that the
optimizers can declare bounds without importing the contexts (which name the optimizer)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated


@dataclass(frozen=True)
class Range:
    """An allowed interval for a numeric option: ``Annotated[float, Range(gt=0)]``."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def violation(self, value: float) -> str | None:
        """``None`` when ``value`` is finite and inside, else what it must be (``"must be > 0"``)."""
        bounds = [(">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le)]
        want = " and ".join(f"{op} {b:g}" for op, b in bounds if b is not None)
        ok = math.isfinite(value) and all(
            b is None or {">": value > b, ">=": value >= b, "<": value < b, "<=": value <= b}[op] for op, b in bounds
        )
        return None if ok else f"must be {want}"


PositiveInt = Annotated[int, Range(gt=0)]
NonNegInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Probability = Annotated[float, Range(ge=0, lt=1)]  # momentum, betas
