"""Iris loader, MLP, and the weight-decay family."""

import math

import pytest
import torch

from hoexp.dataset.iris import load_iris, read_iris
from hoexp.hp.weight_decay import WeightDecay
from hoexp.model.mlp import MLP


def test_iris_file_is_the_real_dataset():
    x, y = read_iris()
    assert x.shape == (150, 4) and torch.bincount(y).tolist() == [50, 50, 50]
    # Fisher's Iris: known column means (cm).
    assert x.mean(0).tolist() == pytest.approx([5.8433, 3.0573, 3.7580, 1.1993], abs=1e-3)


def test_iris_split_is_stratified_disjoint_seeded_and_standardized():
    d = load_iris(seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (60, 60, 30)
    for split, per_class in ((d.train, 20), (d.val, 20), (d.test, 10)):
        assert torch.bincount(split.y, minlength=3).tolist() == [per_class] * 3
    rows = torch.cat([d.train.x, d.val.x, d.test.x])
    assert len(torch.unique(rows, dim=0)) == len(torch.unique(read_iris()[0], dim=0))  # disjoint cover
    assert d.train.x.mean(0).abs().max() < 1e-5
    assert (d.train.x.std(0) - 1).abs().max() < 1e-5
    assert d.val.x.mean(0).abs().max() > 1e-3  # val is standardized with *training* statistics
    again, other = load_iris(seed=0), load_iris(seed=1)
    assert torch.equal(d.train.x, again.train.x)
    assert not torch.equal(d.train.x, other.train.x)
    small = load_iris(30, 30, 15, seed=3)
    assert torch.bincount(small.train.y).tolist() == [10, 10, 10]
    with pytest.raises(ValueError, match="at most"):
        load_iris(100, 40, 20)


def test_reference_mlp_has_17280_weights():
    model = MLP(4, 3, width=128, depth=2, bias=False)
    assert sum(p.numel() for p in model.parameters()) == 17_280
    assert [n for n, _ in model.named_parameters()] == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    with_bias = MLP(4, 3, width=8, depth=3, activation="tanh", bias=True)
    assert sum(p.numel() for p in with_bias.parameters()) == (4 * 8 + 8) + 2 * (8 * 8 + 8) + (8 * 3 + 3)
    assert with_bias(torch.randn(5, 4)).shape == (5, 3)


@pytest.fixture
def params():
    model = MLP(4, 3, width=5, depth=1, bias=True)
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("granularity,count", [("global", 1), ("per_layer", 2), ("per_weight", 4 * 5 + 5 * 3)])
def test_weight_decay_granularity_and_penalty(params, granularity, count):
    fam = WeightDecay(granularity, init_value=0.01)
    raw = fam.init(params)
    assert sum(v.numel() for v in raw.values()) == count
    assert all(torch.allclose(v, torch.full_like(v, 0.01)) for v in fam.view(raw).values())
    weights = [params["layers.0.weight"], params["layers.1.weight"]]  # biases are not decayed by default
    expected = 0.5 * 0.01 * sum(float((w**2).sum()) for w in weights)
    assert float(fam.penalty(params, raw)) == pytest.approx(expected, rel=1e-6)


def test_per_weight_decay_penalty_gradient(params):
    fam = WeightDecay("per_weight", include=("*",))
    raw = {k: torch.randn_like(v) for k, v in fam.init(params).items()}
    w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    (g,) = torch.autograd.grad(fam.penalty(w, raw), [w["layers.1.bias"]])
    assert torch.allclose(g, torch.exp(raw["weight_decay:layers.1.bias"]) * params["layers.1.bias"])


def test_weight_decay_clamp_and_errors(params):
    fam = WeightDecay("per_layer", init_value=1e-3, min_value=1e-4, max_value=1e-2)
    raw = {k: v + 100 for k, v in fam.init(params).items()}
    assert all(math.isclose(float(v), 1e-2, rel_tol=1e-5) for v in fam.view(fam.clamp(raw)).values())
    with pytest.raises(ValueError, match="match no parameter"):
        WeightDecay(include=("nothing*",)).init(params)
    with pytest.raises(ValueError, match="granularity"):
        WeightDecay("per_unit")


@pytest.mark.parametrize("depth,bias", [(0, False), (2, True)])
def test_mlp_functional_forward_is_functional_call(depth, bias):
    """``MLP.functional_forward(params, x, masks)`` (what Classification.logits calls) computes what
    ``functional_call`` does, bit for bit, dropout masks included; absent names fall back to the module's own."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = MLP(4, 3, width=5, depth=depth, activation="tanh", bias=bias)
    params = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    x = torch.randn(7, 4)
    masks = {k: torch.bernoulli(torch.full(s, 0.7)) for k, s in model.dropout_sites(7).items()}
    assert torch.equal(model.functional_forward(params, x), functional_call(model, params, (x,)))
    got = model.functional_forward(params, x, masks)
    assert torch.equal(got, functional_call(model, params, (x,), {"masks": masks}))
    first = "layers.0.weight"
    partial = {k: p for k, p in params.items() if k != first}
    assert torch.equal(model.functional_forward(partial, x), functional_call(model, partial, (x,)))
    assert not torch.equal(model.functional_forward(partial, x), model.functional_forward(params, x))
    assert torch.equal(model(x), functional_call(model, dict(model.named_parameters()), (x,)))
