"""Config → checked components: with ``cli.py``, the only code that knows Hydra and OmegaConf.

* :mod:`hoexp.config.compose`: hoexp's and the users' config groups, one job's config, ``compose_spec``;
* :mod:`hoexp.config.explain`: a node against its factory's signature (one-line errors);
* :mod:`hoexp.config.spec`: the run's top-level keys and ``validate`` (a composed config → :class:`Spec`).
"""

from hoexp.config.explain import Component, component
from hoexp.config.spec import RunConfig, Spec, validate

__all__ = ["Component", "RunConfig", "Spec", "component", "validate"]
