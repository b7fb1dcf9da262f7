"""hoexp: gradient-based hyperparameter optimization (hypergradients) experiments in PyTorch.

* :func:`hypergradient`: the IFT hypergradient of your own losses (a named solver or your own).
* :func:`run`: the whole bilevel loop (inner training, hypergradients, outer updates, evaluation, logging) on
  an :class:`Experiment` built in Python: a task (:class:`hoexp.task.Classification`, ``LanguageModel``, or
  your own satisfying :class:`hoexp.task.Task`), a method (any callable ``OuterStep → OuterResult`` with the
  capability attributes of :class:`hoexp.method.base.HyperMethod`), the inner and outer optimizers
  (:mod:`hoexp.optim`) and :class:`RunSettings`. The CLI runs the same engine on what a config builds.
* ``compose(overrides, config_dir=None)``: the checked config of ``hoexp run <overrides>`` (and its YAML);
  ``build(spec)``: its objects, an experiment :func:`run` takes.
"""

from typing import Any

from hoexp.api import hypergradient

# The function, bound after its submodule hoexp/build.py is imported: importing a submodule sets the package's
# attribute of that name to the module, so a lazy `hoexp.build` was the module once anything had imported it
# (hoexp.compose does): `hoexp.build(spec)` then raised "'module' object is not callable". A module already in
# sys.modules is not bound again, so from here on `hoexp.build` stays the function (`from hoexp.build import x`
# still reads the module).
from hoexp.build import build
from hoexp.engine import RunIO, run
from hoexp.types import Experiment, RunSettings

__version__ = "0.1.0"
__all__ = ["Experiment", "RunIO", "RunSettings", "build", "compose", "hypergradient", "run", "__version__"]


def __getattr__(name: str) -> Any:
    # compose imports Hydra: only when asked for.
    if name == "compose":
        from hoexp.config.compose import compose_spec

        return compose_spec
    raise AttributeError(f"module 'hoexp' has no attribute '{name}'")
