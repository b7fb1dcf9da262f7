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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hoexp.api import hypergradient
    from hoexp.engine import RunIO, run
    from hoexp.types import Experiment, RunSettings

__version__ = "0.1.0"
__all__ = ["Experiment", "RunIO", "RunSettings", "build", "compose", "hypergradient", "run", "__version__"]
# Loaded on first use: `import hoexp` (and so the command line's start) does not import torch, so the
# command installs its signal handlers before the seconds that take (a Ctrl-C then is one line).
_LAZY = {
    "hypergradient": "hoexp.api",
    "RunIO": "hoexp.engine",
    "run": "hoexp.engine",
    "Experiment": "hoexp.types",
    "RunSettings": "hoexp.types",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    # compose and build import Hydra / OmegaConf and the data loaders: only when asked for.
    if name == "compose":
        from hoexp.config.compose import compose_spec

        return compose_spec
    if name == "build":
        from hoexp.config.build import build

        return build
    raise AttributeError(f"module 'hoexp' has no attribute '{name}'")
