"""hoexp: gradient-based hyperparameter optimization (hypergradients) experiments in PyTorch.

* :func:`hypergradient`: the IFT hypergradient of your own losses (named solver or your own);
* ``compose(overrides, config_dir=None)``: the checked config of ``hoexp run <overrides>`` (and its YAML);
* ``build(spec)``: its objects (data, model, family, method, optimizers, problem).
"""

from typing import Any

from hoexp.api import hypergradient

__version__ = "0.1.0"
__all__ = ["build", "compose", "hypergradient", "__version__"]


def __getattr__(name: str) -> Any:
    # compose and build import Hydra / OmegaConf and the data loaders: only when asked for.
    if name == "compose":
        from hoexp.config.compose import compose_spec

        return compose_spec
    if name == "build":
        from hoexp.build import build

        return build
    raise AttributeError(f"module 'hoexp' has no attribute '{name}'")
