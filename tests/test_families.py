"""Dropout, learning-rate and momentum families; their composition."""

import math

import pytest
import torch

from hoexp.hp.composite import Composite
from hoexp.hp.dropout import Dropout, concrete_mask, gaussian_mask
from hoexp.hp.learning_rate import LearningRate, Momentum
from hoexp.hp.weight_decay import WeightDecay
from hoexp.model.mlp import MLP


def test_concrete_mask_rate_zero_is_the_identity():
    u = torch.rand(1000, dtype=torch.float64)
    m = concrete_mask(torch.tensor(-math.inf, dtype=torch.float64), u, 0.1)
    assert torch.equal(m, torch.ones_like(m))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_relaxed_mask_mean_matches_the_rate(p):
    g = torch.Generator().manual_seed(0)
    u = torch.rand(400_000, generator=g, dtype=torch.float64)
    raw = torch.tensor(math.log(p) - math.log1p(-p), dtype=torch.float64)
    m = concrete_mask(raw, u, temperature=0.1)
    z = m * (1 - p)  # the relaxed keep indicator
    assert float((z > 0.5).double().mean()) == pytest.approx(1 - p, abs=3e-3)  # exact in distribution
    assert float(1 - z.mean()) == pytest.approx(p, abs=0.01)  # relaxed mean ≈ the rate at τ = 0.1
    assert float(m.mean()) == pytest.approx(1.0, abs=0.015)  # inverted-dropout scaling


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_gaussian_mask_has_the_mean_and_variance_of_bernoulli_dropout_and_its_exact_derivative(p):
    g = torch.Generator().manual_seed(0)
    u = torch.rand(400_000, generator=g, dtype=torch.float64)
    raw = torch.tensor(math.log(p) - math.log1p(-p), dtype=torch.float64, requires_grad=True)
    m = gaussian_mask(raw, u)
    md = m.detach()
    assert float(md.mean()) == pytest.approx(1.0, abs=0.01)
    assert float(md.var()) == pytest.approx(p / (1 - p), rel=0.01)  # Var of z/q, z ~ Bernoulli(q)
    # dm/draw = ½√α·ε = (m − 1)/2 for every unit: smooth, not concentrated near a threshold
    (d,) = torch.autograd.grad(m.sum(), raw)
    assert float(d) == pytest.approx(float((md - 1).sum() / 2), rel=1e-10)
    ones = gaussian_mask(torch.tensor(-math.inf, dtype=torch.float64), u[:10])
    assert torch.equal(ones, torch.ones_like(ones))  # rate 0: no noise
    # float32 noise at the clamp's edge stays finite
    assert torch.isfinite(gaussian_mask(torch.tensor(0.0), torch.tensor([0.0, 1.0]))).all()


def test_layer_and_unit_rates_are_a_shared_layer_value_plus_scaled_unit_offsets():
    model = MLP(4, 3, width=6, depth=1)
    fam = Dropout(model.unit_shapes(), "layer_and_unit", 0.2, offset_scale=0.1, max_value=0.9)
    raw = fam.init(dict(model.named_parameters()))
    assert {k: tuple(v.shape) for k, v in raw.items()} == {
        "dropout:input": (),
        "dropout:input/unit": (4,),
        "dropout:hidden0": (),
        "dropout:hidden0/unit": (6,),
    }
    assert {k: tuple(v.shape) for k, v in fam.view(raw).items()} == {"dropout:input": (4,), "dropout:hidden0": (6,)}
    assert torch.allclose(fam.view(raw)["dropout:input"], torch.full((4,), 0.2))
    raw["dropout:input/unit"] = torch.tensor([1.0, -1.0, 0.0, 2.0])
    logit = math.log(0.2 / 0.8)
    want = torch.sigmoid(logit + 0.1 * raw["dropout:input/unit"])
    assert torch.allclose(fam.view(raw)["dropout:input"], want)
    # the layer value's hypergradient is the sum of its units' (through the same masks), an offset's 0.1×
    r = {k: v.clone().requires_grad_(True) for k, v in raw.items()}
    noise = fam.noise(model.dropout_sites(5), torch.Generator().manual_seed(0), torch.zeros(()))
    out = model(torch.randn(5, 4), fam.masks(r, noise)).square().sum()
    g = dict(zip(r, torch.autograd.grad(out, list(r.values())), strict=True))
    assert torch.allclose(g["dropout:input/unit"].sum() / 0.1, g["dropout:input"], rtol=1e-5)
    # the combined rate stays within [min, max]; an offset alone cannot run away
    big = fam.clamp({**raw, "dropout:input": torch.tensor(50.0), "dropout:input/unit": torch.full((4,), 1e6)})
    assert float(big["dropout:input"]) == pytest.approx(math.log(0.9 / 0.1))
    assert float(fam.view(big)["dropout:input"].max()) == pytest.approx(0.9)
    assert float(big["dropout:input/unit"].max()) < 1e3


def test_global_dropout_is_one_rate_at_every_site_with_the_summed_hypergradient():
    model = MLP(4, 3, width=6, depth=1)
    per_site = Dropout(model.unit_shapes(), "per_layer", 0.3, relaxation="gaussian")
    fam = Dropout(model.unit_shapes(), "global", 0.3, relaxation="gaussian")
    raw = fam.init(dict(model.named_parameters()))
    assert {k: tuple(v.shape) for k, v in raw.items()} == {"dropout:global": ()}
    assert {k: float(v) for k, v in fam.view(raw).items()} == pytest.approx(
        {"dropout:input": 0.3, "dropout:hidden0": 0.3}
    )
    # the same masks as per_layer at equal rates, so its hypergradient is the sum of the sites'
    noise = fam.noise(model.dropout_sites(5), torch.Generator().manual_seed(0), torch.zeros(()))
    x = torch.randn(5, 4)
    g = torch.autograd.grad(
        model(x, fam.masks({k: v.requires_grad_() for k, v in raw.items()}, noise)).sum(), list(raw.values())
    )[0]
    r = {k: v.requires_grad_() for k, v in per_site.init(dict(model.named_parameters())).items()}
    gs = torch.autograd.grad(model(x, per_site.masks(r, noise)).sum(), list(r.values()))
    assert float(g) == pytest.approx(float(sum(gs)), rel=1e-5)
    assert float(fam.clamp({"dropout:global": torch.tensor(50.0)})["dropout:global"]) == pytest.approx(
        math.log(0.95 / 0.05)
    )
    with pytest.raises(ValueError, match="match no dropout site"):
        Dropout(model.unit_shapes(), "global", 0.3, include=("nope",)).init(dict(model.named_parameters()))


def test_layer_and_weight_decays_are_a_shared_layer_value_plus_scaled_weight_offsets():
    model = MLP(4, 3, width=6, depth=1, bias=False)
    params = dict(model.named_parameters())
    fam = WeightDecay("layer_and_weight", 1e-3, offset_scale=0.1, max_value=1.0)
    raw = fam.init(params)
    names = [n for n in params if n.endswith("weight")]
    assert set(raw) == {f"weight_decay:{n}" for n in names} | {f"weight_decay:{n}/weight" for n in names}
    n0 = names[0]
    raw[f"weight_decay:{n0}/weight"] = torch.randn_like(params[n0])
    lam = fam.view(raw)[f"weight_decay:{n0}"]
    assert lam.shape == params[n0].shape
    assert torch.allclose(lam, torch.exp(math.log(1e-3) + 0.1 * raw[f"weight_decay:{n0}/weight"]))
    r = {k: v.clone().requires_grad_(True) for k, v in raw.items()}
    g = dict(zip(r, torch.autograd.grad(fam.penalty(params, r), list(r.values())), strict=True))
    assert torch.allclose(g[f"weight_decay:{n0}/weight"].sum() / 0.1, g[f"weight_decay:{n0}"], rtol=1e-5)
    big = fam.clamp({**raw, f"weight_decay:{n0}": torch.tensor(9.0)})
    assert float(fam.view(big)[f"weight_decay:{n0}"].max()) == pytest.approx(1.0)


@pytest.mark.parametrize("v_shape", [(), (3, 4), (1, 4)])
@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("bounds", [None, (-1.0, 0.5)])
def test_decay_penalty_has_autograds_derivatives_and_keeps_only_its_inputs(v_shape, offsets, bounds):
    """``decay_penalty`` (½ Σ exp(clamp(v + s·o)) w², derivatives written out) against the same expression left
    to autograd: first and second derivatives (gradcheck, gradgradcheck, bounds included), forward-over-reverse
    products, ``vmap``-batched HVPs and mixed products (method=exact's form), and the tensors a ``create_graph``
    gradient keeps (the reason it exists: only the inputs and scalars)."""
    from torch.func import grad, jvp, vjp, vmap

    from hoexp.hp.decay_penalty import decay_penalty

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    lo, hi = bounds or (-math.inf, math.inf)
    s = 0.7
    w = rand(3, 4).requires_grad_()
    v = (0.3 * rand(*v_shape)).requires_grad_()
    o = rand(3, 4).requires_grad_() if offsets else None
    args = (w, v) + ((o,) if offsets else ())

    def written(w, v, o=None):
        return decay_penalty(w, v, o, s, lo, hi)

    def by_autograd(w, v, o=None):
        x = v if o is None else v + s * o
        return 0.5 * (torch.exp(x.clamp(lo, hi)) * w.square()).sum()

    assert torch.allclose(written(*args), by_autograd(*args))
    assert torch.autograd.gradcheck(written, args) and torch.autograd.gradgradcheck(written, args)
    prim = tuple(a.detach() for a in args)
    tang = tuple(rand(*a.shape) for a in prim)
    assert torch.allclose(jvp(written, prim, tang)[1], jvp(by_autograd, prim, tang)[1])
    for i in range(len(prim)):  # forward over reverse, every input's gradient
        got = jvp(grad(written, argnums=i), prim, tang)[1]
        assert torch.allclose(got, jvp(grad(by_autograd, argnums=i), prim, tang)[1]), i
    cols = rand(5, 3, 4)

    def batched(fn):  # HVP columns and mixed products, as method=exact and ift_tensors form them
        hv = vjp(lambda w_: grad(fn)(w_, *prim[1:]), prim[0])[1]
        mixed = vjp(lambda *h: grad(fn)(prim[0], *h), *prim[1:])[1]
        return [vmap(lambda u: hv(u)[0])(cols), *vmap(mixed)(cols)]

    for a, b in zip(batched(written), batched(by_autograd), strict=True):
        assert torch.allclose(a, b)

    def saved_bytes(fn):
        kept: dict[int, int] = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.autograd.grad(fn(*args), [w], create_graph=True)
        return sum(kept.values())

    inputs = sum(a.nelement() for a in args) * 8
    assert saved_bytes(written) <= inputs + 64 < saved_bytes(by_autograd)


def test_dropout_relaxation_is_validated():
    with pytest.raises(ValueError, match="relaxation"):
        Dropout({"x": (3,)}, relaxation="hard")


def test_dropout_masks_are_reproducible_from_the_seed_and_differentiable():
    model = MLP(4, 3, width=6, depth=2)
    fam = Dropout(model.unit_shapes(), "per_unit", 0.3)
    raw = fam.init(dict(model.named_parameters()))
    assert {k: tuple(v.shape) for k, v in raw.items()} == {
        "dropout:input": (4,),
        "dropout:hidden0": (6,),
        "dropout:hidden1": (6,),
    }
    like = torch.zeros(())
    n1 = fam.noise(model.dropout_sites(5), torch.Generator().manual_seed(7), like)
    n2 = fam.noise(model.dropout_sites(5), torch.Generator().manual_seed(7), like)
    n3 = fam.noise(model.dropout_sites(5), torch.Generator().manual_seed(8), like)
    assert all(torch.equal(n1[k], n2[k]) for k in n1) and not torch.equal(n1["input"], n3["input"])
    r = {k: v.clone().requires_grad_(True) for k, v in raw.items()}
    masks = fam.masks(r, n1)
    assert masks["hidden0"].shape == (5, 6)
    out = model(torch.randn(5, 4), masks)
    g = torch.autograd.grad(out.sum(), list(r.values()))
    assert all(torch.isfinite(x).all() and x.abs().sum() > 0 for x in g)
    per_layer = Dropout(model.unit_shapes(), "per_layer", 0.3, include=("hidden*",))
    assert set(per_layer.init({"w": like})) == {"dropout:hidden0", "dropout:hidden1"}
    assert all(v.shape == () for v in per_layer.init({"w": like}).values())


def test_mlp_with_unit_masks_is_the_plain_mlp_and_a_zero_mask_drops_a_unit():
    torch.manual_seed(0)
    model = MLP(4, 3, width=6, depth=1)
    x = torch.randn(5, 4)
    ones = {k: torch.ones(v) for k, v in model.dropout_sites(5).items()}
    assert torch.equal(model(x, ones), model(x))
    drop = dict(ones)
    drop["hidden0"] = drop["hidden0"].clone()
    drop["hidden0"][:, 2] = 0
    w = model.layers[1].weight.detach().clone()
    w[:, 2] = 0
    h = torch.relu(model.layers[0](x))
    assert torch.allclose(model(x, drop), h @ w.T + model.layers[1].bias, atol=1e-6)


def test_learning_rate_overrides():
    names = ("a.weight", "a.bias", "b.weight")
    params = {n: torch.zeros(2) for n in names}
    g = LearningRate(names, "global", 0.1)
    raw = g.init(params)
    assert float(g.optimizer_overrides(raw, 0)["lr"]) == pytest.approx(0.1)
    pl = LearningRate(names, "per_layer", 0.1, include=("*weight",), fill=0.5)
    raw = pl.init(params)
    lrs = pl.optimizer_overrides(raw, 3)["lr"]
    assert set(lrs) == set(names) and lrs["a.bias"] == 0.5 and float(lrs["b.weight"]) == pytest.approx(0.1)
    ps = LearningRate(names, "per_step", 0.1, steps=4)
    raw = {k: torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])) for k in ps.init(params)}
    assert [float(ps.optimizer_overrides(raw, t)["lr"]["a.weight"]) for t in (0, 2, 3, 9)] == pytest.approx(
        [0.1, 0.3, 0.4, 0.4]
    )
    mom = Momentum(names, 0.9, include=("a.*",), fill=0.5)
    mus = mom.optimizer_overrides(mom.init(params), 0)["momentum"]
    assert float(mus["a.weight"]) == pytest.approx(0.9) and mus["b.weight"] == 0.5


def test_composite_merges_families():
    model = MLP(4, 3, width=6, depth=1, bias=False)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = tuple(params)
    fam = Composite(
        (
            WeightDecay("per_layer", 0.01),
            Dropout(model.unit_shapes(), "per_layer", 0.2),
            LearningRate(names, "global", 0.05),
        )
    )
    raw = fam.init(params)
    assert sorted(raw) == sorted(
        ["weight_decay:layers.0.weight", "weight_decay:layers.1.weight", "dropout:input", "dropout:hidden0", "lr"]
    )
    assert not fam.moves_optimum and fam.name == "weight_decay+dropout+lr"
    expected = 0.5 * 0.01 * sum(float((p**2).sum()) for p in params.values())
    assert float(fam.penalty(params, raw)) == pytest.approx(expected, rel=1e-5)
    assert float(fam.optimizer_overrides(raw, 0)["lr"]) == pytest.approx(0.05)
    clamped = fam.clamp({k: v + 50 for k, v in raw.items()})
    assert float(torch.sigmoid(clamped["dropout:input"])) == pytest.approx(0.95)
    assert float(torch.exp(clamped["weight_decay:layers.0.weight"])) == pytest.approx(10.0, rel=1e-5)
    with pytest.raises(ValueError, match="same optimizer value"):
        Composite((LearningRate(names), LearningRate(names)))
