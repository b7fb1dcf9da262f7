"""Config → checked components: the only package (with ``cli.py``) that knows Hydra and OmegaConf."""

from hoexp.config.explain import Component, component
from hoexp.config.spec import RunConfig, Spec, validate

__all__ = ["Component", "RunConfig", "Spec", "component", "validate"]
