"""Several hyperparameter families tuned at once (``hp=[weight_decay,dropout]``).

Raw keys are prefixed by each family's name, so the families' dicts never collide; penalties add,
masks and optimizer overrides merge (two families overriding the same optimizer value is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from hoexp.hp.base import HyperFamily, Params


@dataclass(frozen=True)
class Composite:
    families: tuple[HyperFamily, ...]

    def __post_init__(self):
        keys = [k for f in self.families for k in _override_keys(f)]
        if len(keys) != len(set(keys)):
            raise ValueError(f"two hp families override the same optimizer value ({', '.join(keys)})")
        if len(self._weighing()) > 1:
            raise ValueError("two hp families weigh the training examples; keep one of them")

    def _weighing(self) -> list[HyperFamily]:
        return [f for f in self.families if getattr(f, "weighs_examples", False)]

    @property
    def weighs_examples(self) -> bool:
        """Whether one of the families weighs each training example (the task then reads :meth:`example_weights`)."""
        return bool(self._weighing())

    def example_weights(self, raw: Params, index: Tensor) -> Tensor:
        return self._weighing()[0].example_weights(raw, index)  # type: ignore[attr-defined]

    def loss_mask(self, losses: Tensor) -> Tensor:
        return self._weighing()[0].loss_mask(losses)  # type: ignore[attr-defined]

    @property
    def name(self) -> str:
        return "+".join(f.name for f in self.families)

    @property
    def moves_optimum(self) -> bool:
        return all(f.moves_optimum for f in self.families)

    def init(self, params: Params) -> dict[str, Tensor]:
        return {k: v for f in self.families for k, v in f.init(params).items()}

    def view(self, raw: Params) -> dict[str, Tensor]:
        return {k: v for f in self.families for k, v in f.view(raw).items()}

    def clamp(self, raw: Params) -> dict[str, Tensor]:
        out = dict(raw)
        for f in self.families:
            out = f.clamp(out)
        return out

    def penalty(self, params: Params, raw: Params):
        return sum((f.penalty(params, raw) for f in self.families), 0.0)

    def optimizer_overrides(self, raw: Params, step: int) -> dict:
        return {k: v for f in self.families for k, v in f.optimizer_overrides(raw, step).items()}

    def noise(self, mask_shapes, generator, like) -> dict[str, Tensor]:
        return {
            k: v for f in self.families if hasattr(f, "noise") for k, v in f.noise(mask_shapes, generator, like).items()
        }

    def masks(self, raw: Params, noise: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for f in self.families if hasattr(f, "masks") for k, v in f.masks(raw, noise).items()}


def _override_keys(family: HyperFamily) -> list[str]:
    """The optimizer values a family overrides, as it declares them (``sets``: none by default)."""
    return sorted(getattr(family, "sets", ()))
