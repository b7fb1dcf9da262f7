"""``hp.dropout.relaxation=straight_through``: ``nn.Dropout``'s masks in the forward pass (bit for bit), the moment-
matched Gaussian mask's derivative ``∂m/∂logit p = (m − 1)/2`` in the backward pass, so pathwise methods tune the
rates of the model users train."""

import io
import math

import pytest
import torch
from rich.console import Console

from hoexp.cli import compose_spec
from hoexp.config.run import run_experiment
from hoexp.hp.dropout import Dropout, bernoulli_mask, gaussian_mask, straight_through_mask
from hoexp.model.mlp import MLP

TINY = [
    "model.width=8",
    "model.depth=2",
    "progress=false",
    "device=cpu",
    "hp=dropout",
    "hp.dropout.init=0.3",
    "hp.dropout.granularity=per_layer",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_forward_is_the_bernoulli_mask_bit_for_bit_and_the_derivative_is_m_minus_one_over_two(p, dtype):
    u = torch.rand(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    raw = torch.tensor(math.log(p / (1 - p)), dtype=dtype, requires_grad=True)
    m = straight_through_mask(raw, u)
    hard = bernoulli_mask(raw.detach(), u)
    assert torch.equal(m.detach(), hard)  # nn.Dropout's mask (tests/test_bernoulli_dropout.py: hard == nn.Dropout)
    weights = torch.randn(5000, dtype=dtype, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((weights * m).sum(), raw)
    want = (weights * (hard - 1) / 2).sum()
    assert torch.allclose(grad, want, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    assert set(torch.unique(m.detach()).tolist()) <= {0.0, float(1 / (1 - torch.sigmoid(raw.detach())))}


def test_the_derivative_has_the_gaussian_relaxations_form_at_the_same_mask_value():
    """For a Gaussian mask ``m = 1 + e^{raw/2}ε``, ``∂m/∂raw = (m − 1)/2`` as well: the surrogate differentiates the
    drawn Bernoulli mask as if it were a Gaussian draw with the same mean and variance and the same value."""
    raw = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    g = gaussian_mask(raw, u)
    jac = torch.stack([torch.autograd.grad(gi, raw, retain_graph=True)[0] for gi in g])
    assert torch.allclose(jac, (g.detach() - 1) / 2)


def test_the_family_draws_float64_noise_and_is_pathwise():
    model = MLP(4, 3, width=5, depth=1)
    fam = Dropout(model.unit_shapes(), "per_layer", 0.3, relaxation="straight_through")
    assert fam.pathwise
    noise = fam.noise(model.dropout_sites(2), torch.Generator(), torch.zeros(()))
    assert all(v.dtype == torch.float64 for v in noise.values())
    raw = fam.init(dict(model.named_parameters()))
    same = Dropout(model.unit_shapes(), "per_layer", 0.3, relaxation="bernoulli")
    for site, m in fam.masks(raw, noise).items():
        assert torch.equal(m, same.masks(raw, noise)[site])


@pytest.mark.parametrize("method", ["t1t2", "neumann", "unrolled", "forward"])
def test_pathwise_methods_tune_standard_dropout_through_the_surrogate(method, tmp_path):
    """Where ``relaxation=bernoulli`` is refused (tests/test_bernoulli_dropout.py), the surrogate runs and moves the
    rates with a nonzero hypergradient."""
    spec, text = compose_spec(
        [*TINY, "hp.dropout.relaxation=straight_through", f"method={method}", "outer_steps=3", "inner_steps=3"]
    )
    summary = run_experiment(spec, tmp_path, config_text=text, console=Console(file=io.StringIO()))
    assert summary["status"] == "completed" and summary["method"] == method
    assert summary["hp_final"]["moved_fraction"] > 0 and summary["hp_final"]["mean"] != pytest.approx(0.3)
