"""LSTM language model: cell loop vs nn.LSTM, weight tying, HVPs, forward mode, dropout masks."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hoexp import tree
from hoexp.method.ift import HessianOperator
from hoexp.model.lstm import LSTMLanguageModel, detach_state, lm_loss, perplexity

V, E, H, T, B = 7, 3, 3, 4, 2


def tiny(layers=2, tie=True, vocab=V, embed=E, hidden=H, seed=0):
    """A float64 model with O(1) embeddings (the default U(±0.1) makes every effect tiny)."""
    torch.manual_seed(seed)
    model = LSTMLanguageModel(vocab, embed, hidden, layers, tie_weights=tie).double()
    with torch.no_grad():
        model.embedding.weight.normal_()
    return model


def data(vocab=V, t=T, b=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (t, b), generator=g), torch.randint(vocab, (t, b), generator=g)


def random_masks(model, batch=B, seed=2):
    """Relaxed (continuous, non-binary) masks at every site, as a concrete-dropout family gives."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.5 + torch.rand(s, generator=g, dtype=torch.float64) for k, s in model.dropout_sites(batch).items()}


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_cell_loop_matches_nn_lstm(layers, with_state):
    model = tiny(layers, tie=False, embed=5, hidden=6)
    ref = nn.LSTM(5, 6, num_layers=layers).double()
    with torch.no_grad():
        for i, layer in enumerate(model.lstm):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{name}_l{i}").copy_(getattr(layer, name))
    tokens, _ = data(t=9, b=3)
    state = None
    h0 = c0 = torch.zeros(layers, 3, 6, dtype=torch.float64)
    if with_state:
        h0, c0 = torch.randn(layers, 3, 6, dtype=torch.float64), torch.randn(layers, 3, 6, dtype=torch.float64)
        state = [(h0[i], c0[i]) for i in range(layers)]
    with torch.no_grad():
        logits, new_state = model(tokens, state)
        ref_out, (h_n, c_n) = ref(model.embedding(tokens), (h0, c0))
        ref_logits = model.decoder(ref_out)
    assert logits.shape == (9, 3, V)
    assert (logits - ref_logits).abs().max() < 1e-10
    assert ref_out.abs().max() > 0.05  # the comparison is not vacuous
    for i, (h, c) in enumerate(new_state):
        assert (h - h_n[i]).abs().max() < 1e-10
        assert (c - c_n[i]).abs().max() < 1e-10


def test_layer_sizes_and_tying():
    model = LSTMLanguageModel(11, embed_dim=4, hidden=6, layers=3, tie_weights=True)
    assert model.hidden_sizes == [6, 6, 4]  # AWD-LSTM: the last layer's size is embed_dim when tied
    assert model.decoder.weight is model.embedding.weight
    names = [k for k, _ in model.named_parameters()]
    assert "decoder.weight" not in names and "embedding.weight" in names
    assert "lstm.2.weight_hh" in names and model.lstm[2].weight_ih.shape == (16, 6)
    untied = LSTMLanguageModel(11, embed_dim=4, hidden=6, layers=3, tie_weights=False)
    assert untied.hidden_sizes == [6, 6, 6] and untied.decoder.weight is not untied.embedding.weight
    assert "decoder.weight" in dict(untied.named_parameters())


def test_tied_gradient_flows_to_one_parameter():
    model = tiny(1)
    tokens, targets = data()
    logits, _ = model(tokens)
    lm_loss(logits, targets).backward()
    grad = model.embedding.weight.grad
    assert model.decoder.weight.grad is grad
    # The shared gradient has both parts: rows of tokens never seen as input still get decoder gradient.
    unseen = sorted(set(range(V)) - set(tokens.flatten().tolist()))
    assert unseen and grad[unseen].abs().sum() > 0
    # With functional_call, replacing embedding.weight replaces the decoder weight too.
    params = params_of(model)
    params["embedding.weight"] = torch.zeros_like(params["embedding.weight"])
    out, _ = functional_call(model, params, (tokens,))
    assert torch.allclose(out, params["decoder.bias"].expand_as(out))


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("with_masks", [False, True])
def test_hvp_matches_dense_hessian(layers, with_masks):
    model = tiny(layers)
    tokens, targets = data()
    masks = random_masks(model) if with_masks else None
    params = params_of(model)
    state = [(0.3 * h.normal_(), 0.3 * c.normal_()) for h, c in model.init_state(B)]

    def flat_loss(flat):
        logits, _ = functional_call(model, tree.unflatten(flat, params), (tokens,), {"state": state, "masks": masks})
        return lm_loss(logits, targets)

    flat = tree.flatten(params.values())
    dense = torch.func.hessian(flat_loss)(flat)
    leaves = [p.requires_grad_() for p in params.values()]
    logits, _ = functional_call(model, params, (tokens,), {"state": state, "masks": masks})
    grads = torch.autograd.grad(lm_loss(logits, targets), leaves, create_graph=True)
    op = HessianOperator(tree.flatten(grads), leaves)
    for seed in range(2):
        v = torch.randn(flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        expected = dense @ v
        assert (op.matvec(v) - expected).norm() / expected.norm() < 1e-8
    assert torch.allclose(dense, dense.T, atol=1e-12)


@pytest.mark.parametrize("site", ["output", "hh0", "embedding", "layer0"])
def test_jvp_wrt_mask_matches_finite_difference(site):
    model = tiny(2)
    tokens, targets = data()
    params = params_of(model)
    masks = random_masks(model)
    direction = torch.randn(masks[site].shape, dtype=torch.float64)

    def loss_of(m):
        logits, _ = functional_call(model, params, (tokens,), {"masks": {**masks, site: m}})
        return lm_loss(logits, targets)

    _, tangent = torch.func.jvp(loss_of, (masks[site],), (direction,))
    eps = 1e-6
    fd = (loss_of(masks[site] + eps * direction) - loss_of(masks[site] - eps * direction)) / (2 * eps)
    assert abs(tangent) > 1e-4
    assert abs(tangent - fd) < 1e-9 + 1e-7 * abs(fd)  # FD round-off is ~1e-10


def test_all_ones_masks_equal_no_masks():
    model = tiny(2)
    tokens, _ = data()
    ones = {k: torch.ones(s, dtype=torch.float64) for k, s in model.dropout_sites(B).items()}
    plain, plain_state = model(tokens)
    masked, masked_state = model(tokens, masks=ones)
    assert torch.equal(plain, masked)
    assert all(torch.equal(a, b) for s1, s2 in zip(plain_state, masked_state) for a, b in zip(s1, s2))
    different, _ = model(tokens, masks=random_masks(model))
    assert not torch.allclose(plain, different)


def test_output_mask_zero_removes_the_unit():
    model = tiny(2, tie=False)
    tokens, _ = data()
    seen = []
    model.decoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    mask = torch.ones(B, H, dtype=torch.float64)
    mask[0, 1] = 0.0
    unmasked, _ = model(tokens)
    masked, _ = model(tokens, masks={"output": mask})
    assert (seen[1][:, 0, 1] == 0).all() and torch.equal(seen[1], seen[0] * mask)
    assert not torch.allclose(masked[:, 0], unmasked[:, 0]) and torch.equal(masked[:, 1], unmasked[:, 1])
    # The logits of batch element 0 do not depend on that unit's hidden values (nor its decoder column).
    grad = torch.autograd.grad(masked[:, 0].sum(), model.decoder.weight)[0]
    assert (grad[:, 1] == 0).all() and (grad[:, 0] != 0).all()


def test_activation_mask_zero_equals_zeroed_weights():
    model = tiny(2, tie=False)
    tokens, _ = data()
    emb_mask, layer_mask = torch.ones(B, E, dtype=torch.float64), torch.ones(B, H, dtype=torch.float64)
    emb_mask[:, 2] = 0.0
    layer_mask[:, 0] = 0.0
    masked, _ = model(tokens, masks={"embedding": emb_mask, "layer0": layer_mask})
    params = params_of(model)
    params["embedding.weight"][:, 2] = 0.0  # embedding unit 2 removed
    params["lstm.1.weight_ih"][:, 0] = 0.0  # layer-0 unit 0 no longer feeds layer 1
    zeroed, _ = functional_call(model, params, (tokens,))
    assert torch.allclose(masked, zeroed, atol=1e-14)
    assert not torch.allclose(masked, model(tokens)[0])


def test_dropconnect_mask_acts_on_w_hh():
    model = tiny(2)
    tokens, _ = data()
    masks = {f"hh{i}": (torch.rand(s, dtype=torch.float64) > 0.4).double() for i, s in enumerate([(4 * H, H)] * 2)}
    masked, masked_state = model(tokens, masks=masks)
    params = params_of(model)
    for i in range(2):
        params[f"lstm.{i}.weight_hh"] *= masks[f"hh{i}"]
    zeroed, zeroed_state = functional_call(model, params, (tokens,))
    assert torch.allclose(masked, zeroed, atol=1e-14)
    assert torch.allclose(masked_state[1][1], zeroed_state[1][1], atol=1e-14)
    assert not torch.allclose(masked, model(tokens)[0])


def test_sites_and_unit_shapes_are_accepted_by_forward():
    model = LSTMLanguageModel(13, embed_dim=4, hidden=5, layers=3, tie_weights=True).double()
    assert model.unit_shapes() == {
        "embedding": (4,),
        "layer0": (5,),
        "layer1": (5,),
        "output": (4,),
        "hh0": (20, 5),
        "hh1": (20, 5),
        "hh2": (16, 4),
    }
    sites = model.dropout_sites(6)
    assert sites["embedding"] == (6, 4) and sites["layer1"] == (6, 5) and sites["hh2"] == (16, 4)
    tokens = torch.randint(13, (3, 6))
    full = {k: torch.rand(s, dtype=torch.float64) for k, s in sites.items()}
    logits, state = model(tokens, masks=full)
    assert logits.shape == (3, 6, 13) and [h.shape for h, _ in state] == [(6, 5), (6, 5), (6, 4)]
    shared = {k: torch.rand(s, dtype=torch.float64) for k, s in model.unit_shapes().items()}
    model(tokens, masks=shared)  # per-unit masks shared over the batch broadcast
    with pytest.raises(ValueError, match="unknown dropout site"):
        model(tokens, masks={"layer2": torch.ones(6, 4)})
    with pytest.raises(ValueError, match="mask 'output'"):
        model(tokens, masks={"output": torch.ones(6, 5)})


def test_helpers_and_truncated_bptt():
    model = tiny(2)
    tokens, targets = data(t=8)
    logits, state = model(tokens)
    loss = lm_loss(logits, targets)
    manual = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).mean()
    assert torch.allclose(loss, manual)
    assert torch.allclose(perplexity(loss), loss.exp()) and perplexity(0.0) == 1.0
    detached = detach_state(state)
    assert detach_state(None) is None
    assert all(not h.requires_grad and torch.equal(h, s[0]) for (h, _), s in zip(detached, state))
    # Two segments with the carried state equal one long run in value.
    first, mid = model(tokens[:4])
    second, _ = model(tokens[4:], detach_state(mid))
    assert torch.allclose(torch.cat([first, second]), logits, atol=1e-14)
    with pytest.raises(ValueError, match="layers"):
        model(tokens, state[:1])
