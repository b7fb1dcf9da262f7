"""What a component factory receives and declares.

Every option of a config group (``conf/<group>/<option>.yaml``) names its code with ``_target_``: a
factory whose keyword arguments are the YAML keys. Defaults are written once, in the signature, and
the annotations are the schema, checked before anything runs (:mod:`hoexp.config.explain`):

* ``int``, ``float``, ``bool``, ``str``, ``list[...]``, ``X | None`` and ``Literal[...]`` (choices);
* ranges with the aliases below, e.g. ``terms: NonNegInt = 5`` or
  ``Annotated[float, Range(gt=0, le=1)]``.

Groups whose objects need run-time values say ``_partial_: true``; the factory then receives one
positional argument, built by hoexp:

=============  ==============================  ====================================================
group          runtime argument                 the factory returns
=============  ==============================  ====================================================
``dataset``    :class:`DataContext`             data with ``.problem(model, family)`` (e.g. Splits)
``model``      the loaded data                  an ``nn.Module``
``hp``         :class:`BuildContext`            a hyperparameter family (``hoexp.hp.base.HyperFamily``)
``method``     :class:`BuildContext`            a hypergradient method (``hoexp.method.base``)
``optim/*``    (none: not partial)              an :class:`~hoexp.optim.Optimizer`
=============  ==============================  ====================================================

Checks that involve several keys belong in the factory (a ``ValueError`` there becomes a one-line
error naming the option).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hoexp.bounds import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Probability, Range

__all__ = [
    "BuildContext",
    "CheckContext",
    "DataContext",
    "NonNegFloat",
    "NonNegInt",
    "PositiveFloat",
    "PositiveInt",
    "Probability",
    "Range",
]

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hoexp.optim import Optimizer


@dataclass(frozen=True)
class DataContext:
    """What a ``dataset`` factory receives: the run's seed (for seeded splits) and floating dtype."""

    seed: int = 0
    # torch is imported when a context is made, not with the config checks (the command line starts without it)
    dtype: torch.dtype = field(default_factory=lambda: __import__("torch").float32)


@dataclass(frozen=True)
class CheckContext:
    """What a method's optional ``check(ctx)`` sees: raise a ``ValueError`` (or ConfigError) to refuse a run.

    It is called twice: before a run (or every job of a sweep) starts, with the inner optimizer only, and
    when the run is built, with its family and sizes too (``None`` until then)."""

    inner_opt: Optimizer
    family: Any = None
    n_params: int | None = None
    n_hparams: int | None = None


@dataclass(frozen=True)
class BuildContext:
    """What ``hp`` and ``method`` factories receive.

    ``model``: the built model (its parameters name what a family can cover; a dropout family reads
    ``model.unit_shapes()``). ``inner_opt``: the inner optimizer; ``inner_opt.defaults`` are its configured
    values (``lr``, ``momentum``, ...). ``data``: what the dataset factory returned (a per-example family
    reads its size). ``families``: the families built so far (a method sees all).
    """

    model: nn.Module
    inner_opt: Optimizer
    inner_steps: int
    seed: int = 0
    data: Any = None
    families: tuple[Any, ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.model.named_parameters())
