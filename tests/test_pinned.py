"""Pinned numbers of short Iris runs (torchtune-style regression): refactors must not change results.

float64, one thread, seed 0, 3 outer × 10 inner steps of the default experiment (a 4→128→128→3 MLP,
per-weight decay, Nesterov inner steps, Adam outer steps). The values were recorded at commit d2b2587;
if a change moves them on purpose, say why in its commit message and record the new values here.
"""

import io

import pytest
from rich.console import Console

from hoexp.cli import compose_spec
from hoexp.config.run import run_experiment
from hoexp.engine.metrics import MemoryLogger

# overrides → (final validation loss, final mean hyperparameter, hypergradient norms at outer steps 1-3)
PINNED = {
    "": (
        0.44679148197281787,
        0.000995945262803806,
        (3.1640880906434627e-06, 2.0190859626213736e-06, 1.585368062572621e-06),
    ),
    "method=cg": (
        0.44676046752627324,
        0.00100834375249939,
        (0.00013294865042495535, 9.24393125605871e-05, 0.00039748144154859113),
    ),
    "method=unrolled": (
        0.44676506540529554,
        0.001004058656870769,
        (2.4136525935146946e-05, 1.4155766422415342e-05, 1.1648068662728202e-05),
    ),
    "hp=dropout method=t1t2": (
        0.4581558223796163,
        0.1995092207502398,
        (0.00021258836812701142, 9.842395907364222e-05, 5.218893033443609e-05),
    ),
    "method=forward hp.weight_decay.granularity=per_layer": (
        0.4468094972477742,
        0.0007480083740184384,
        (0.00016653253475099343, 0.00011749534620335094, 6.762572466875753e-05),
    ),
}


@pytest.mark.parametrize("overrides", list(PINNED))
def test_short_iris_run_matches_pinned_numbers(tmp_path, overrides):
    spec, text = compose_spec(
        ["outer_steps=3", "inner_steps=10", "progress=false", "dtype=float64", "seed=0", *overrides.split()]
    )
    mem = MemoryLogger()
    summary = run_experiment(spec, tmp_path, config_text=text, console=Console(file=io.StringIO()), loggers=[mem])
    val, hp_mean, norms = PINNED[overrides]
    # float64 on one thread is deterministic; the tolerance only allows for other CPUs' summation order.
    assert summary["final"]["val_loss"] == pytest.approx(val, rel=1e-7)
    assert summary["hp_final"]["mean"] == pytest.approx(hp_mean, rel=1e-7)
    assert [v for _, v in mem.series("hypergrad/norm")] == pytest.approx(list(norms), rel=1e-6)
