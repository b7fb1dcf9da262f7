"""hoexp: gradient-based hyperparameter optimization (hypergradients) experiments in PyTorch.

* :func:`hypergradient`: the implicit-differentiation hypergradient of two loss functions (a library call).
* :func:`run`: the whole bilevel loop (inner training, hypergradients, outer updates, evaluation, logging) on
  an :class:`Experiment` built in Python: a task (:class:`hoexp.task.Classification`, ``LanguageModel``, or
  your own satisfying :class:`hoexp.task.Task`), a method (any callable ``OuterStep → OuterResult`` with the
  capability attributes of :class:`hoexp.method.base.HyperMethod`), the inner and outer optimizers
  (:mod:`hoexp.optim`) and :class:`RunSettings`. The CLI runs the same engine on what a config builds.
"""

from hoexp.api import hypergradient
from hoexp.engine import RunIO, run
from hoexp.types import Experiment, RunSettings

__version__ = "0.1.0"
__all__ = ["Experiment", "RunIO", "RunSettings", "hypergradient", "run", "__version__"]
