"""Standard dropout (``hp.dropout.relaxation=bernoulli``): ``nn.Dropout``'s masks bit for bit, every granularity
trained by ``method=none`` on the MLP and the LSTM, and the refusal of methods that differentiate through masks."""

import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import hoexp
from hoexp.cli import compose_spec
from hoexp.config.build import build, build_method
from hoexp.config.run import run_experiment
from hoexp.engine import RunIO
from hoexp.errors import ConfigError
from hoexp.hp.dropout import GRANULARITIES, Dropout, bernoulli_mask
from hoexp.method.implicit import NoHO
from hoexp.model.lstm import LSTMLanguageModel
from hoexp.model.mlp import MLP
from hoexp.optim import build_optimizer
from hoexp.task import LanguageModel
from hoexp.task.language_model import lm_data

TINY = ["model.width=8", "model.depth=2", "progress=false", "device=cpu", "optim/inner=momentum"]  # reversible needs it
BERNOULLI = ["hp=dropout", "hp.dropout.relaxation=bernoulli"]
REFUSAL = (
    r"cannot tune hp=dropout: relaxation=bernoulli has no pathwise derivative; tune it with method=pes or "
    r"method=stn \(whole-horizon / best-response\), or use relaxation=straight_through \(the same masks, a "
    r"surrogate derivative\) or concrete\|gaussian"
)


def _bernoulli(model, granularity="global", p=0.3, **kw):
    return Dropout(model.unit_shapes(), granularity, p, relaxation="bernoulli", max_value=0.99, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.6, 0.95])
def test_the_mlp_forward_equals_nn_dropout_bit_for_bit_under_the_same_seed(p, dtype):
    """hoexp draws each site's float64 uniforms in forward order from a seeded generator; nn.Dropout draws its
    Bernoulli(1 − p) keeps from the global generator in the same order and compares the same uniforms."""
    torch.manual_seed(1)
    model = MLP(30, 5, width=16, depth=2).to(dtype)
    fam = _bernoulli(model, p=p)
    raw = fam.init(dict(model.named_parameters()))
    rate = float(fam.view(raw)["dropout:input"])  # p rounded to the model's dtype: nn.Dropout gets the same rate
    x = torch.randn(64, 30, dtype=dtype)
    out = model(x, fam.masks(raw, fam.noise(model.dropout_sites(64), torch.Generator().manual_seed(7), x)))
    layers = model.layers
    reference = nn.Sequential(
        nn.Dropout(rate), layers[0], nn.ReLU(), nn.Dropout(rate), layers[1], nn.ReLU(), nn.Dropout(rate), layers[2]
    ).train()
    torch.manual_seed(7)
    assert torch.equal(out, reference(x))


def test_every_lstm_site_mask_equals_f_dropout_under_the_same_seed():
    """Per-layer rates, DropConnect included: each site's mask is ``F.dropout(ones, p_site)``'s, the sites drawn in
    the family's order (embedding, layer0, output, hh0, hh1), bit for bit."""
    model = LSTMLanguageModel(50, 6, 7, 2, tie_weights=False)
    fam = _bernoulli(model, "per_layer", 0.3)
    raw = fam.init(dict(model.named_parameters()))
    raw = {k: torch.full_like(v, math.log(p / (1 - p))) for (k, v), p in zip(raw.items(), (0.1, 0.3, 0.5, 0.05, 0.7))}
    shapes = model.dropout_sites(4)
    masks = fam.masks(raw, fam.noise(shapes, torch.Generator().manual_seed(3), model.embedding.weight))
    rates = fam.view(raw)
    torch.manual_seed(3)
    for site in fam.covered():
        want = F.dropout(torch.ones(shapes[site]), float(rates[f"dropout:{site}"]))
        assert masks[site].shape == shapes[site] and torch.equal(masks[site], want), site


def test_the_mask_is_one_over_keep_where_u_is_below_one_minus_p_and_a_function_of_u_and_p():
    u = torch.tensor([0.0, 0.3, 0.69, 0.71, 0.99], dtype=torch.float64)
    raw = torch.tensor(math.log(0.3 / 0.7))  # p = 0.3, float32
    q = 1 - torch.sigmoid(raw)
    want = torch.tensor([1, 1, 1, 0, 0], dtype=torch.float32) / q
    assert torch.equal(bernoulli_mask(raw, u), want)
    assert torch.equal(bernoulli_mask(raw, u), bernoulli_mask(raw.clone(), u.clone()))
    # a higher rate drops a superset of the units (common random numbers across perturbed rates)
    assert torch.all((bernoulli_mask(raw + 0.5, u) > 0) <= (bernoulli_mask(raw, u) > 0))
    assert torch.equal(bernoulli_mask(torch.tensor(-math.inf), u), torch.ones(5))  # rate 0: no dropout
    # the keep test is F.dropout's, u < 1 − p in float64, even where u and 1 − p round to the same float32
    q64 = 1 - torch.sigmoid(raw).double()
    edge = torch.stack([torch.nextafter(q64, torch.tensor(0.0, dtype=torch.float64)), q64])
    assert edge.float()[0] == edge.float()[1] and torch.equal(
        bernoulli_mask(raw, edge) > 0, torch.tensor([True, False])
    )
    model = MLP(4, 3, depth=1)
    noise = _bernoulli(model).noise(model.dropout_sites(2), torch.Generator(), u.float())
    assert all(v.dtype == torch.float64 for v in noise.values())  # float32 noise would round u across 1 − p


def test_per_unit_masks_have_dropouts_mean_variance_and_rate():
    """Per-unit rates (which nn.Dropout cannot express): mean 1, variance p/(1 − p), fraction of zeros p per unit,
    within 5 standard errors over 200,000 draws."""
    model = MLP(4, 2, width=3, depth=0)
    fam = _bernoulli(model, "per_unit")
    rates = torch.tensor([0.05, 0.2, 0.5, 0.6])
    raw = {"dropout:input": torch.log(rates / (1 - rates))}
    n = 200_000
    m = fam.masks(raw, fam.noise({"input": (n, 4)}, torch.Generator().manual_seed(0), torch.zeros(())))["input"]
    p = fam.view(raw)["dropout:input"].double()
    zeros, mean, var = (m == 0).double().mean(0), m.double().mean(0), m.double().var(0)
    assert set(torch.unique(m[:, 2]).tolist()) == {0.0, 2.0}
    assert torch.all((zeros - p).abs() < 5 * torch.sqrt(p * (1 - p) / n))
    assert torch.all((mean - 1).abs() < 5 * torch.sqrt(p / (1 - p) / n))
    # the sample variance's standard error: √((μ4 − σ⁴)/n), m − 1 = (B − q)/q with B ~ Bernoulli(q = 1 − p), so
    # μ4 = pq(1 − 3pq)/q⁴ and σ² = p/q (0 at p = ½, where (m − 1)² = 1: then centring on the sample mean, O(σ²/n))
    q = 1 - p
    sd = torch.sqrt((p * q * (1 - 3 * p * q) / q**4 - (p / q) ** 2) / n)
    assert torch.all((var - p / q).abs() < 5 * sd + 5 * (p / q) / n)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_every_granularity_trains_the_mlp_with_method_none(granularity, tmp_path):
    spec, text = compose_spec(
        [
            *TINY,
            *BERNOULLI,
            f"hp.dropout.granularity={granularity}",
            "method=none",
            "outer_steps=2",
            "inner_steps=3",
            "eval_every=2",
            "hp.dropout.init=0.3",
        ]
    )
    summary = run_experiment(spec, tmp_path, config_text=text, console=Console(file=io.StringIO()))
    assert summary["status"] == "completed" and summary["method"] == "none"
    assert math.isfinite(summary["final"]["val_loss"]) and math.isfinite(summary["final"]["test_loss"])
    assert summary["hp_final"]["moved_fraction"] == 0 and summary["hp_final"]["mean"] == pytest.approx(0.3)
    units = {"global": 1, "per_layer": 3, "per_unit": 4 + 8 + 8, "layer_and_unit": 3 + 4 + 8 + 8}
    assert summary["num_hparams"] == units[granularity]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_every_granularity_trains_the_lstm_with_method_none_on_hard_masks(granularity):
    torch.manual_seed(0)
    text = torch.randint(0, 30, (1200,))
    splits = SimpleNamespace(train=text, val=text[:300], test=text[:200], vocab_size=30)
    model = LSTMLanguageModel(30, 6, 6, 2)
    fam = _bernoulli(model, granularity, 0.4)
    task = LanguageModel(model, fam, data=lm_data(splits, 4, 2, 5), bptt=5)
    raw = fam.init(dict(model.named_parameters()))
    batch = next(task.train_stream(0))
    rates = fam.view(raw)
    for site, m in task.masks(raw, batch).items():  # hard masks: 0 or 1/(1 − p)
        scale = (1 / (1 - rates[f"dropout:{site}"])).expand_as(m)
        assert torch.equal(m[m != 0], scale[m != 0]) and (m == 0).any(), site
    exp = hoexp.Experiment(
        task=task,
        method=NoHO(),
        inner_opt=build_optimizer("sgd", lr=0.5),
        outer_opt=build_optimizer("adam", lr=0.01),
        settings=hoexp.RunSettings(outer_steps=2, inner_steps=3, eval_every=2),
    )
    summary = hoexp.run(exp, RunIO(None, console=Console(file=io.StringIO())))
    assert summary["status"] == "completed" and math.isfinite(summary["final"]["val_loss"])
    assert summary["hp_final"]["moved_fraction"] == 0


PATHWISE_METHODS = [
    "neumann",
    "cg",
    "cg_gn",
    "fixed_point",
    "exact",
    "t1t2",
    "fd",
    "unrolled",
    "truncated",
    "forward",
    "reversible",
]


@pytest.mark.parametrize("method", PATHWISE_METHODS)
def test_methods_that_differentiate_the_training_loss_in_the_rates_refuse_bernoulli_when_composed(method):
    """Refused by the checks every ``hoexp run`` (and each job of a sweep, and ``hoexp compare``) makes before
    anything runs, the dropout factory's ``relaxation`` read without building the model."""
    with pytest.raises(ConfigError, match=f"^method=\\S+ {REFUSAL}$"):  # cg_gn is method=cg with a curvature
        compose_spec([*TINY, *BERNOULLI, f"method={method}"])


def _method_class(path):
    import importlib

    import yaml

    from hoexp.config.build import declared_type

    module, _, name = yaml.safe_load(path.read_text())["_target_"].rpartition(".")
    target = getattr(importlib.import_module(module), name)
    return target if isinstance(target, type) else declared_type(target)


def test_the_refusal_reads_every_family_and_the_declared_capabilities():
    from pathlib import Path

    from hoexp.config.build import check_pathwise

    methods = {p.stem: _method_class(p) for p in (Path(hoexp.__file__).parent / "conf" / "method").glob("*.yaml")}
    assert all("needs_pathwise_hp" in vars(cls) for cls in methods.values()), "every built-in method declares it"
    assert all(methods[m].needs_pathwise_hp for m in PATHWISE_METHODS) and not methods["none"].needs_pathwise_hp
    with pytest.raises(ConfigError, match=f"^method=t1t2 {REFUSAL}$"):  # a second family does not hide it
        compose_spec([*TINY, "hp=[weight_decay,dropout]", "hp.dropout.relaxation=bernoulli", "method=t1t2"])
    exp = build(compose_spec([*TINY, *BERNOULLI, "method=none"])[0])  # method=none trains it
    t1t2 = build_method(compose_spec(["method=t1t2"])[0])
    with pytest.raises(ConfigError, match=f"^method=t1t2 {REFUSAL}$"):  # the built family, as build() checks it
        check_pathwise("t1t2", t1t2, [exp.problem.family])
    fam = _bernoulli(MLP(4, 3, depth=1))
    assert fam.pathwise is False and Dropout({"x": (3,)}, relaxation="gaussian").pathwise is True
    check_pathwise("t1t2", t1t2, [Dropout({"x": (3,)})])  # concrete masks: fine

    class LossesOnly:  # a method that needs no pathwise derivative (an evolution-strategies estimator, say)
        needs_pathwise_hp = False

    class Undeclared:  # a user's method that does not say: taken to differentiate
        pass

    check_pathwise("es", LossesOnly(), [fam])
    with pytest.raises(ConfigError, match=f"method=mine {REFUSAL}"):
        check_pathwise("mine", Undeclared(), [fam])
    check_pathwise("mine", Undeclared(), [Dropout])  # before a run the class only: checked when the run builds
