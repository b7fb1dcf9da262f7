"""hoexp: gradient-based hyperparameter optimization (hypergradients) experiments in PyTorch."""

from hoexp.api import hypergradient

__version__ = "0.1.0"
__all__ = ["hypergradient", "__version__"]
