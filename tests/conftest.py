"""Shared fixtures: the data root, seeding and one thread for every test, composing configs, tiny experiments."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Tests and CI read the small real datasets shipped beside the repository.
os.environ.setdefault("HOEXP_DATA", str(ROOT.parent / "shared" / "data"))

# A small, exact version of the default experiment (Iris, 4→8→3 MLP, float64) for tests that need a built run.
TINY = ["model.width=8", "model.depth=1", "dtype=float64", "progress=false", "device=cpu"]


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Every test starts from the same RNG state, on one CPU thread (runs pick their own: runner.thread_policy)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose():
    """``compose(*overrides, config_dir=None)`` → the checked Spec (the README's overrides, in-process)."""
    from hoexp.cli import compose_spec

    return lambda *overrides, config_dir=None: compose_spec(list(overrides), config_dir=config_dir)[0]


@pytest.fixture
def tiny_experiment():
    """``tiny_experiment(*overrides)`` → a built :class:`~hoexp.config.build.Experiment` of :data:`TINY` plus overrides."""
    from hoexp.cli import compose_spec
    from hoexp.config.build import build

    return lambda *overrides: build(compose_spec([*TINY, *overrides])[0])
