"""Data hyper-cleaning in the package: the benchmark's corruption rule, ``dataset=arrays``, ``hp=example_weights``
(hypergradient against finite differences), the flagged-noise F1, and ``experiment=mnist_hyper_cleaning``."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from hoexp.components import BuildContext, DataContext
from hoexp.dataset.arrays import arrays
from hoexp.dataset.base import Split, Splits
from hoexp.dataset.cleaning import corrupt_labels, mnist_cleaning, standard_scale
from hoexp.errors import HoexpError
from hoexp.hp.composite import Composite
from hoexp.hp.example_weights import KEY, ExampleWeights, example_weights
from hoexp.hp.weight_decay import WeightDecay
from hoexp.method.curvature import GaussNewton, SplitLoss
from hoexp.method.ift import ift_hypergradient
from hoexp.method.solvers import Exact
from hoexp.task import Classification
from hoexp.task.weighted import ExampleWeighted

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- the benchmark's corruption rule
def benchmark_rule(y: np.ndarray, ratio: float, rng: np.random.RandomState) -> np.ndarray:
    """benchopt/benchmark_bilevel datasets/mnist.py, verbatim but for the names."""
    y_train = y.copy()
    corrupted = rng.rand(len(y_train)) < ratio
    y_train[corrupted] = rng.randint(0, 10, np.sum(corrupted))
    return y_train


@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.9])
def test_corruption_matches_the_benchmark(ratio):
    y = np.random.RandomState(1).randint(0, 10, 20_000).astype(np.uint8)
    ours = corrupt_labels(y, ratio, np.random.RandomState(32), 10)
    assert np.array_equal(ours, benchmark_rule(y, ratio, np.random.RandomState(32)))
    # redrawn with probability `ratio` over all ten classes: a tenth of the redrawn labels come out right
    assert abs((ours != y).mean() - 0.9 * ratio) < 0.015
    assert np.array_equal(np.bincount(ours[ours != y], minlength=10) > 0, np.ones(10, bool))


@pytest.mark.slow  # torchvision's import: ~5 s on a busy CPU
def test_mnist_cleaning_is_the_benchmarks_split_and_scaling():
    data = mnist_cleaning(DataContext(32, torch.float64), ratio=0.7)
    assert (len(data.train), len(data.val), len(data.test)) == (3500, 1500, 10_000)
    from hoexp.dataset.mnist import read_mnist
    from hoexp.dataset.root import data_root

    x, y = read_mnist(data_root(None), train=True)
    rng = np.random.RandomState(32)
    perm = rng.permutation(len(y))  # sklearn's train_test_split(test_size=1500, train_size=3500, random_state=rng)
    val, train = perm[:1500], perm[1500:5000]
    labels = benchmark_rule(y.numpy()[train], 0.7, rng)
    assert torch.equal(data.train.y, torch.from_numpy(labels).long())
    assert torch.equal(data.val.y, y[val])
    assert data.noisy is not None and torch.equal(data.noisy, data.train.y != y[train])
    assert abs(float(data.noisy.double().mean()) - 0.63) < 0.03
    xs = standard_scale(x[train].reshape(3500, -1), x[val].reshape(1500, -1))
    assert torch.allclose(data.train.x, xs[0]) and torch.allclose(data.val.x, xs[1])
    moving = data.train.x.std(0) > 0
    assert torch.allclose(data.train.x.mean(0), torch.zeros(784, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(
        data.train.x[:, moving].std(0, unbiased=False), torch.ones(int(moving.sum()), dtype=torch.float64)
    )


# ----------------------------------------------------------------------------------------------- dataset=arrays
def write(path: Path, **arrays_: np.ndarray) -> str:
    np.savez(path, **arrays_)
    return str(path)


def splits_arrays(rng: np.random.RandomState, d: int = 4) -> dict[str, np.ndarray]:
    return {
        f"{a}_{s}": (rng.randn(n, d) if a == "X" else rng.randint(0, 3, n))
        for s, n in (("train", 12), ("val", 6), ("test", 5))
        for a in ("X", "y")
    }


def test_arrays_round_trip(tmp_path):
    given = splits_arrays(np.random.RandomState(0))
    data = arrays(DataContext(0, torch.float64), path=write(tmp_path / "d.npz", **given))
    for s in ("train", "val", "test"):
        split = getattr(data, s)
        assert torch.equal(split.x, torch.from_numpy(given[f"X_{s}"]))
        assert torch.equal(split.y, torch.from_numpy(given[f"y_{s}"]).long())
    assert (data.num_features, data.num_indices, data.noisy) == (4, 12, None)
    assert data.num_classes == 1 + max(int(given[f"y_{s}"].max()) for s in ("train", "val", "test"))
    scaled = arrays(DataContext(0, torch.float64), path=str(tmp_path / "d.npz"), standardize=True)
    assert torch.allclose(scaled.train.x.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_arrays_index_column_and_noise(tmp_path):
    given = splits_arrays(np.random.RandomState(0))
    index = np.arange(12) // 2  # two rows per example: six weights
    noisy = np.array([True, False, False, True, False, False])
    data = arrays(DataContext(0), path=write(tmp_path / "d.npz", **given, index_train=index, noisy_train=noisy))
    assert data.train.y.shape == (12, 2) and torch.equal(data.train.labels, torch.from_numpy(given["y_train"]))
    assert data.num_indices == 6 and data.noisy is not None and data.noisy.tolist() == noisy.tolist()
    # the family sizes itself by the indices; a family that does not weigh examples trains on the labels alone
    model = nn.Linear(4, 3)
    family = example_weights(BuildContext(model, None, 1, data=data))  # type: ignore[arg-type]
    assert family.n == 6
    task = data.problem(model, WeightDecay("global"))
    assert type(task) is Classification and task.data.train.y.dim() == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("y_val"), "lacks y_val"),
        (lambda a: a.update(y_train=a["y_train"][:-1]), "y_train has shape (11,) but X_train has 12 rows"),
        (lambda a: a.update(X_test=a["X_test"][:, :3]), "X_test has shape (5, 3)"),
        (lambda a: a.update(y_val=a["y_val"] + 0.5), "must hold class labels"),
        (lambda a: a.update(index_train=np.arange(11)), "index_train has shape (11,)"),
        (lambda a: a.update(noisy_train=np.zeros(12)), "noisy_train has shape (12,) and dtype float64"),
    ],
)
def test_arrays_errors_name_the_fix(tmp_path, change, message):
    given = splits_arrays(np.random.RandomState(0))
    change(given)
    with pytest.raises(HoexpError) as e:
        arrays(DataContext(0), path=write(tmp_path / "d.npz", **given))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_arrays_missing_file_names_the_format(tmp_path):
    for path in ("", str(tmp_path / "nothing.npz")):
        with pytest.raises(HoexpError, match=r"is not a file; give an \.npz written by numpy\.savez"):
            arrays(DataContext(0), path=path)


# ------------------------------------------------------------------------------------------ hp=example_weights
def tiny_problem(
    n: int = 6, d: int = 3, classes: int = 3, drop: float = 0.0
) -> tuple[ExampleWeighted, dict, dict, tuple, tuple]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)
    xv, yv = torch.randn(8, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (8,), generator=g)
    data = Splits(Split(x, y), Split(xv, yv), Split(xv, yv), d, classes)
    model = nn.Linear(d, classes, bias=False).double()
    family = ExampleWeights(n, l2=0.3, drop=drop)
    task = data.problem(model, family)
    assert isinstance(task, ExampleWeighted)
    raw = {KEY: torch.randn(n, generator=g, dtype=torch.float64)}
    return (
        task,
        dict(model.named_parameters()),
        raw,
        (task.data.train.x, task.data.train.y),
        (task.data.val.x, task.data.val.y),
    )


def inner_optimum(task, params, raw, batch):
    """``w*(λ)`` by Newton's method (the weighted ridge-regularized softmax regression is strongly convex)."""
    ((name, w),) = params.items()
    f = lambda v: task.train_loss({name: v}, raw, batch)  # noqa: E731
    for _ in range(20):
        g = torch.func.grad(f)(w).reshape(-1)
        if g.norm() < 1e-14:
            break
        h = torch.func.hessian(f)(w).reshape(len(g), len(g))
        w = w.detach() - torch.linalg.solve(h, g).reshape(w.shape)
    return {name: w}


def test_example_weights_hypergradient_matches_finite_differences():
    """IFT with an exact solve, with the Hessian and with the Gauss-Newton split (``[logits | weights]`` outputs:
    equal to the Hessian for a linear model), against central differences of ``L_V(w*(λ))``."""
    task, params, raw, train, val = tiny_problem()
    w = inner_optimum(task, params, raw, train)

    def outer(lam: torch.Tensor) -> float:
        r = {KEY: lam}
        return float(task.val_loss(inner_optimum(task, w, r, train), r, val))

    eps, fd = 1e-5, torch.zeros_like(raw[KEY])
    for i in range(len(fd)):
        e = torch.zeros_like(fd)
        e[i] = eps
        fd[i] = (outer(raw[KEY] + e) - outer(raw[KEY] - e)) / (2 * eps)
    assert fd.abs().max() > 1e-3  # the weights matter
    val_loss = lambda p, r: task.val_loss(p, r, val)  # noqa: E731
    hg, _ = ift_hypergradient(lambda p, r: task.train_loss(p, r, train), val_loss, w, raw, Exact())
    assert torch.allclose(hg[KEY], fd, rtol=1e-5, atol=1e-8)
    split = SplitLoss(*task.train_parts(train))
    hg_gn, _ = ift_hypergradient(split, val_loss, w, raw, Exact(), curvature=GaussNewton())
    assert torch.allclose(hg_gn[KEY], fd, rtol=1e-5, atol=1e-8)


def test_weighted_loss_is_the_weighted_mean_and_minibatches_read_their_own_weights():
    task, params, raw, train, _ = tiny_problem()
    x, y = train
    ce = torch.nn.functional.cross_entropy(task.logits(params, x), y[:, 0], reduction="none")
    ridge = 0.5 * 0.3 * (params["weight"] ** 2).sum()
    assert torch.allclose(task.train_loss(params, raw, train), (torch.sigmoid(raw[KEY]) * ce).mean() + ridge)
    rows = torch.tensor([4, 1])
    sub = (x[rows], y[rows])
    assert torch.allclose(task.train_loss(params, raw, sub), (torch.sigmoid(raw[KEY][rows]) * ce[rows]).mean() + ridge)
    # with another family beside it, the weights still apply and the penalties add
    both = Composite((task.family, WeightDecay("global", 0.1)))
    raw2 = {**raw, **both.families[1].init(params)}
    task2 = task.data.problem(task.model, both)
    assert torch.allclose(
        task2.train_loss(params, raw2, train),
        task.train_loss(params, raw, train) + 0.05 * (params["weight"] ** 2).sum(),
    )


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_train_loss_is_train_parts_loss_with_its_derivatives(drop):
    """``train_loss`` (no weights column) and ``output_loss(outputs(w, λ)) + penalty`` of ``train_parts`` (the
    column a Gauss-Newton product needs) are one function: value, gradient and the mixed term ``∂²L/∂λ∂w v``."""
    task, params, raw, train, _ = tiny_problem(drop=drop)
    outputs, output_loss, penalty = task.train_parts(train)
    v = {"weight": torch.randn(params["weight"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}

    def mixed(loss):  # ∂/∂λ ⟨∇_w L, v⟩
        return torch.func.grad(lambda lam: (torch.func.grad(loss)(params, lam)["weight"] * v["weight"]).sum())(raw)[KEY]

    def direct(p, lam):
        return task.train_loss(p, lam, train)

    def parts(p, lam):
        return output_loss(outputs(p, lam)) + penalty(p, lam)

    assert torch.allclose(direct(params, raw), parts(params, raw), rtol=1e-14, atol=0)
    gd, gp = torch.func.grad(direct)(params, raw)["weight"], torch.func.grad(parts)(params, raw)["weight"]
    assert torch.allclose(gd, gp, rtol=1e-13, atol=1e-15)
    assert torch.allclose(mixed(direct), mixed(parts), rtol=1e-12, atol=1e-15) and mixed(direct).abs().max() > 1e-3


def test_flagged_f1():
    task, params, raw, _, _ = tiny_problem()
    task.data.noisy = torch.tensor([True, True, False, False, False, True])
    lam = {KEY: torch.tensor([-1.0, 2.0, -3.0, 1.0, 1.0, -0.5], dtype=torch.float64)}  # flags 0, 2, 5
    m = task.hp_metrics(lam)
    p, r = 2 / 3, 2 / 3  # flagged {0,2,5} ∩ noisy {0,1,5} = {0,5}
    assert math.isclose(float(m["flagged_precision"]), p) and math.isclose(float(m["flagged_recall"]), r)
    assert math.isclose(float(m["flagged_f1"]), 2 * p * r / (p + r))


# ------------------------------------------------------------------------ the searchable proxy: hp.example_weights.drop
def test_drop_masks_the_largest_losses_of_the_batch():
    losses = torch.tensor([0.3, 2.0, 0.1, 5.0, 1.0])
    assert ExampleWeights(5, drop=0.4).loss_mask(losses).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]  # ⌊0.4·5⌋ = 2
    assert ExampleWeights(5, drop=0.59).loss_mask(losses).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]  # ⌊2.95⌋ = 2
    assert ExampleWeights(5, drop=0.6).loss_mask(losses).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert ExampleWeights(5, drop=0.19).loss_mask(losses).tolist() == [1.0] * 5  # ⌊0.95⌋ = 0: nothing dropped
    assert ExampleWeights(5).loss_mask(losses).tolist() == [1.0] * 5
    both = Composite((ExampleWeights(5, drop=0.2), WeightDecay("global", 0.1)))  # the composite asks its weigher
    assert both.loss_mask(losses).tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_drop_weighs_zero_the_batchs_highest_losses_and_holds_the_mask_constant():
    """``L_T = mean_i σ(λ_i)·1[i kept]·CE_i + ridge`` over the whole batch, on the full split and on a minibatch
    (whose own largest losses drop); the gradient in ``w`` is that of the same sum with the mask fixed."""
    task, params, raw, train, _ = tiny_problem(drop=0.5)
    x, y = train
    ridge = lambda p: 0.5 * 0.3 * (p["weight"] ** 2).sum()  # noqa: E731
    ce = lambda p, rows: torch.nn.functional.cross_entropy(task.logits(p, x[rows]), y[rows, 0], reduction="none")  # noqa: E731
    for rows in (torch.arange(6), torch.tensor([4, 1, 0, 2])):
        losses = ce(params, rows)
        keep = losses < losses.sort().values[len(rows) - len(rows) // 2]  # all but the ⌊b/2⌋ largest
        assert int(keep.sum()) == len(rows) - len(rows) // 2

        def fixed(p, keep=keep, rows=rows):
            return (torch.sigmoid(raw[KEY][rows]) * keep * ce(p, rows)).mean() + ridge(p)

        batch = (x[rows], y[rows])
        assert torch.allclose(task.train_loss(params, raw, batch), fixed(params))
        g = torch.func.grad(lambda p: task.train_loss(p, raw, batch))(params)
        assert torch.allclose(g["weight"], torch.func.grad(fixed)(params)["weight"])
    full = tiny_problem()[0].train_loss(params, raw, train)
    assert task.train_loss(params, raw, train) < full  # three of six losses left out


def test_drop_is_a_method_none_option_and_refuses_one(compose):
    spec = compose("experiment=mnist_hyper_cleaning", "method=none", "hp.example_weights.drop=0.6")
    assert spec.method.name == "none"
    with pytest.raises(HoexpError, match="drop"):
        compose("experiment=mnist_hyper_cleaning", "method=none", "hp.example_weights.drop=1")


# --------------------------------------------------------------------------------- experiment=mnist_hyper_cleaning
def test_preset_composes_and_model_mlp_overrides(compose):
    spec = compose("experiment=mnist_hyper_cleaning")
    assert spec.model.name == "linear" and spec.dataset.name == "mnist_cleaning"
    mlp = compose("experiment=mnist_hyper_cleaning", "model=mlp")
    assert mlp.model.name == "mlp"


def run_preset(tmp_path: Path, *overrides: str) -> dict:
    from hoexp.cli import compose_spec
    from hoexp.config.run import run_experiment

    spec, text = compose_spec(["experiment=mnist_hyper_cleaning", "progress=false", *overrides])
    return run_experiment(spec, tmp_path, config_text=text, console=Console(file=io.StringIO()))


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_preset_runs_at_other_ratios_without_retuning(tmp_path, ratio):
    """1,000 SABA steps of the preset, only the ratio changed (eager: compiling gives the same numbers,
    tests/test_single_loop.py): every weight starts flagged (σ(−2) < ½), so precision starts at the noisy fraction
    (0.9·ratio); at the end the flags are well above it, and the model learned from the ~10-55% clean labels."""
    overrides = ("method.compile=false", "outer_steps=1000", "eval_every=1000", "max_time=null")
    summary = run_preset(tmp_path, f"dataset.ratio={ratio}", *overrides)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    final, noisy = summary["final"], 0.9 * ratio
    assert summary["status"] == "completed" and summary["final"]["step"] == 1000
    assert math.isclose(first["precision/flagged"], noisy, abs_tol=0.03) and first["recall/flagged"] == 1.0
    assert final["flagged_precision"] > noisy + 0.05 and final["flagged_f1"] > first["f1/flagged"]
    assert final["test_error"] < 0.25


@pytest.mark.slow
def test_cg_under_the_preset_keeps_its_double_loop(tmp_path):
    """method=cg under the preset: its own steps (experiment_method/mnist_hyper_cleaning/cg.yaml), 4 hypergradients
    of 50 full-batch steps each raise the flagged precision well above the noisy fraction (0.63)."""
    summary = run_preset(tmp_path, "method=cg", "outer_steps=4", "eval_every=4")
    assert summary["method"] == "cg" and summary["inner_steps"] == 50 and summary["hypergradients"] == 4
    assert summary["final"]["flagged_precision"] > 0.63 + 0.1


@pytest.mark.slow
def test_preset_end_to_end_from_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "hoexp", "run", "experiment=mnist_hyper_cleaning", "outer_steps=2"]  # compiled SABA
    out = tmp_path / "run"
    r = subprocess.run([*cmd, "progress=false", f"hydra.run.dir={out}"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {"test_error", "flagged_f1"} <= set(summary["final"]) and summary["num_hparams"] == 3500
    assert summary["method"] == "saba" and summary["compile_time_s"] > 0  # the preset's compiled SABA
