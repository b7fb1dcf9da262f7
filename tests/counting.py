"""Counting composes, validations and component builds (``hoexp run`` and ``hoexp compare`` make each once per job)."""

from __future__ import annotations

from collections import Counter

# The components a default job builds: each once.
BUILT = ("optim.inner", "optim.outer", "hp.weight_decay", "method", "dataset", "model")


def count_composes_and_builds(monkeypatch) -> Counter[str]:
    """From now on (``monkeypatch``'s scope): ``compose`` and ``validate`` calls, and ``build <key>`` per component."""
    import hoexp.cli
    import hoexp.config
    import hoexp.config.compose as composing
    from hoexp.config.explain import Component

    counts: Counter[str] = Counter()

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return call

    compose = composing.compose
    monkeypatch.setattr(composing, "compose", counted("compose", compose))
    monkeypatch.setattr(hoexp.cli, "_compose", counted("compose", compose), raising=False)
    monkeypatch.setattr(hoexp.config, "validate", counted("validate", hoexp.config.validate))
    build = Component.build

    def counted_build(self, *runtime):
        counts[f"build {self.key}"] += 1
        return build(self, *runtime)

    monkeypatch.setattr(Component, "build", counted_build)
    return counts
