"""Tests for hoexp.optim: parity with torch.optim, purity, overrides, differentiability."""

from __future__ import annotations

import copy

import pytest
import torch

from hoexp.optim import OPTIMIZERS, build_optimizer, safe_sqrt

SHAPES = {"w1": (6, 4), "b1": (6,), "w2": (3, 6)}


def make_params(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=dtype) * 0.7 for k, s in SHAPES.items()}


def make_data(dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 4, generator=gen, dtype=dtype)
    y = torch.randn(10, 3, generator=gen, dtype=dtype)
    return x, y


def mlp_loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = data
    h = torch.tanh(x @ params["w1"].T + params["b1"])
    return ((h @ params["w2"].T - y) ** 2).mean()


def grads_of(params, data, create_graph=False):
    names = list(params)
    gs = torch.autograd.grad(mlp_loss(params, data), [params[k] for k in names], create_graph=create_graph)
    return dict(zip(names, gs))


# (registry name, our kwargs, torch class, torch kwargs)
CASES = [
    ("sgd", dict(lr=0.1), torch.optim.SGD, dict(lr=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.05), torch.optim.SGD, dict(lr=0.1, weight_decay=0.05)),
    ("sgd", dict(lr=0.1, momentum=0.9), torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (
        "sgd",
        dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.02),
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.02),
    ),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True), torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (
        "sgd",
        dict(lr=0.05, momentum=0.5, weight_decay=0.1, nesterov=True),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.5, weight_decay=0.1, nesterov=True),
    ),
    ("momentum", dict(lr=0.1), torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (
        "nesterov",
        dict(lr=0.1, weight_decay=0.01),
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    ("adam", dict(lr=0.05), torch.optim.Adam, dict(lr=0.05)),
    ("adam", dict(lr=0.05, weight_decay=0.1), torch.optim.Adam, dict(lr=0.05, weight_decay=0.1)),
    ("adam", dict(lr=0.05, amsgrad=True), torch.optim.Adam, dict(lr=0.05, amsgrad=True)),
    (
        "adam",
        dict(lr=0.03, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.05, amsgrad=True),
        torch.optim.Adam,
        dict(lr=0.03, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.05, amsgrad=True),
    ),
    ("adamw", dict(lr=0.05), torch.optim.AdamW, dict(lr=0.05)),
    (
        "adamw",
        dict(lr=0.05, weight_decay=0.3, amsgrad=True),
        torch.optim.AdamW,
        dict(lr=0.05, weight_decay=0.3, amsgrad=True),
    ),
    ("adamw", dict(lr=0.05, weight_decay=0.0), torch.optim.AdamW, dict(lr=0.05, weight_decay=0.0)),
    ("rmsprop", dict(), torch.optim.RMSprop, dict()),
    ("rmsprop", dict(lr=0.01, centered=True), torch.optim.RMSprop, dict(lr=0.01, centered=True)),
    ("rmsprop", dict(lr=0.01, momentum=0.9), torch.optim.RMSprop, dict(lr=0.01, momentum=0.9)),
    (
        "rmsprop",
        dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True),
        torch.optim.RMSprop,
        dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True),
    ),
    ("adagrad", dict(lr=0.1), torch.optim.Adagrad, dict(lr=0.1)),
    (
        "adagrad",
        dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.2, eps=1e-6),
        torch.optim.Adagrad,
        dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.2, eps=1e-6),
    ),
]


def _case_id(case):
    name, kw = case[0], case[1]
    return name + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_parity_with_torch_optim(case, dtype, tol):
    name, kw, torch_cls, torch_kw = case
    steps = 12
    data = make_data(dtype)
    init = make_params(dtype)

    ref = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    ref_opt = torch_cls(list(ref.values()), foreach=False, **torch_kw)

    opt = build_optimizer(name, **kw)
    assert opt.name == name
    params = {k: v.clone() for k, v in init.items()}
    state = opt.init(params)

    for t in range(steps):
        ref_opt.zero_grad()
        mlp_loss(ref, data).backward()
        ref_opt.step()

        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        params, state = opt.update(params, grads_of(params, data), state)
        assert state["step"] == t + 1 and isinstance(state["step"], int)
        for k in params:
            diff = (params[k] - ref[k].detach()).abs().max().item()
            assert diff <= tol, f"step {t}, param {k}: max abs diff {diff}"

    # optimizer buffers (named like torch's) match too; they can be O(10), so relative to scale
    for k, p in ref.items():
        for buf_name, buf in state.items():
            if buf_name == "step":
                continue
            ref_buf = ref_opt.state[p][buf_name]
            scale = max(1.0, ref_buf.abs().max().item())
            assert (buf[k] - ref_buf).abs().max().item() <= tol * scale, buf_name
    # the trajectory actually went somewhere (test is not vacuous)
    moved = max((params[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-2


def test_amsgrad_case_exercises_max():
    dtype = torch.float64
    data = make_data(dtype)
    opt = build_optimizer("adam", lr=0.05, amsgrad=True)
    params = make_params(dtype)
    state = opt.init(params)
    for _ in range(12):
        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        params, state = opt.update(params, grads_of(params, data), state)
    gap = max((state["max_exp_avg_sq"][k] - state["exp_avg_sq"][k]).max().item() for k in params)
    assert gap > 0


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_update_is_pure(case):
    name, kw = case[0], case[1]
    opt = build_optimizer(name, **kw)
    dtype = torch.float64
    data = make_data(dtype)
    params = make_params(dtype)
    state = opt.init(params)
    for _ in range(2):  # second step has non-trivial buffers
        p_req = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        grads = {k: g.detach() for k, g in grads_of(p_req, data).items()}
        params_c, grads_c, state_c = copy.deepcopy((params, grads, state))
        new_params, new_state = opt.update(params, grads, state)
        for k in params:
            assert torch.equal(params[k], params_c[k])
            assert torch.equal(grads[k], grads_c[k])
            assert not torch.equal(new_params[k], params[k])
        assert state["step"] == state_c["step"]
        assert new_state["step"] == state["step"] + 1
        for buf_name, buf in state.items():
            if buf_name != "step":
                assert buf is not new_state[buf_name]
                for k in params:
                    assert torch.equal(buf[k], state_c[buf_name][k])
        assert new_params is not params and new_state is not state
        params, state = {k: v.detach() for k, v in new_params.items()}, new_state


def _run(opt, params, grads_seq, **overrides):
    state = opt.init(params)
    for g in grads_seq:
        params, state = opt.update(params, g, state, **overrides)
    return params


def _grads_seq(dtype=torch.float64, n=3):
    out = []
    for s in range(n):
        gen = torch.Generator().manual_seed(100 + s)
        out.append({k: torch.randn(sh, generator=gen, dtype=dtype) for k, sh in SHAPES.items()})
    return out


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lr_override_forms_agree(name):
    lr = 0.037
    params = make_params(torch.float64)
    gseq = _grads_seq()
    expected = _run(build_optimizer(name, lr=lr), params, gseq)
    other = build_optimizer(name, lr=0.5)
    for override in (
        lr,
        torch.tensor(lr, dtype=torch.float64),
        {k: torch.tensor(lr, dtype=torch.float64) for k in params},
    ):
        got = _run(other, params, gseq, lr=override)
        for k in params:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-14)
    # the override actually changes something relative to the configured lr
    default = _run(other, params, gseq)
    assert max((default[k] - expected[k]).abs().max().item() for k in params) > 1e-3


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_per_parameter_lr_dict(name):
    lrs = {"w1": 0.1, "b1": 0.0, "w2": 0.03}
    params = make_params(torch.float64)
    gseq = _grads_seq()
    got = _run(build_optimizer(name, lr=0.5), params, gseq, lr=lrs)
    for k, lr in lrs.items():
        ref = _run(build_optimizer(name, lr=lr), params, gseq)
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-14)
    torch.testing.assert_close(got["b1"], params["b1"], rtol=0, atol=0)


def test_per_element_lr_and_missing_key():
    params = make_params(torch.float64)
    grads = _grads_seq(n=1)[0]
    opt = build_optimizer("sgd", lr=1.0)
    lr_w1 = torch.rand(SHAPES["w1"], dtype=torch.float64)
    lr_w2_rows = torch.rand(SHAPES["w2"][0], 1, dtype=torch.float64)  # per-row, broadcast
    new, _ = opt.update(params, grads, opt.init(params), lr={"w1": lr_w1, "b1": 0.2, "w2": lr_w2_rows})
    torch.testing.assert_close(new["w1"], params["w1"] - lr_w1 * grads["w1"], rtol=0, atol=1e-15)
    torch.testing.assert_close(new["b1"], params["b1"] - 0.2 * grads["b1"], rtol=0, atol=1e-15)
    torch.testing.assert_close(new["w2"], params["w2"] - lr_w2_rows * grads["w2"], rtol=0, atol=1e-15)
    with pytest.raises(KeyError, match="b1"):
        opt.update(params, grads, opt.init(params), lr={"w1": 0.1, "w2": 0.1})


@pytest.mark.parametrize(
    "name,kw,override",
    [
        ("sgd", dict(lr=0.1, momentum=0.9), dict(momentum=0.6)),
        ("sgd", dict(lr=0.1, momentum=0.9), dict(weight_decay=0.2, dampening=0.1)),
        ("nesterov", dict(lr=0.1), dict(momentum=0.6, weight_decay=0.2)),
        ("adam", dict(lr=0.01), dict(weight_decay=0.2, beta1=0.7, beta2=0.9, eps=1e-3)),
        ("adamw", dict(lr=0.01), dict(weight_decay=0.3)),
        ("rmsprop", dict(momentum=0.9), dict(momentum=0.4, weight_decay=0.1, alpha=0.8, eps=1e-3)),
        ("adagrad", dict(), dict(weight_decay=0.1, lr_decay=0.2, eps=1e-3)),
    ],
)
def test_other_overrides_match_factory(name, kw, override):
    params = make_params(torch.float64)
    gseq = _grads_seq()
    factory_kw = dict(kw)
    for key, val in override.items():
        if key in ("beta1", "beta2"):
            betas = list(factory_kw.get("betas", (0.9, 0.999)))
            betas[0 if key == "beta1" else 1] = val
            factory_kw["betas"] = tuple(betas)
        else:
            factory_kw[key] = val
    expected = _run(build_optimizer(name, **factory_kw), params, gseq)
    tensor_override = {k: torch.tensor(v, dtype=torch.float64) for k, v in override.items()}
    got = _run(build_optimizer(name, **kw), params, gseq, **tensor_override)
    plain = _run(build_optimizer(name, **kw), params, gseq)
    for k in params:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-13)
    assert max((plain[k] - expected[k]).abs().max().item() for k in params) > 1e-4


def test_momentum_override_without_buffer_raises():
    params = make_params(torch.float64)
    grads = _grads_seq(n=1)[0]
    for opt in (build_optimizer("sgd", lr=0.1), build_optimizer("rmsprop")):
        with pytest.raises(ValueError, match="momentum"):
            opt.update(params, grads, opt.init(params), momentum=0.5)


def test_sgd_argument_validation():
    with pytest.raises(ValueError, match="Nesterov"):
        build_optimizer("sgd", lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov"):
        build_optimizer("sgd", lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError):
        build_optimizer("adam", lr=-1.0)
    with pytest.raises(ValueError):
        build_optimizer("adam", betas=(1.0, 0.999))


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError) as info:
        build_optimizer("lion", lr=0.1)
    msg = str(info.value)
    assert "unknown optimizer 'lion'" in msg
    assert "valid: adagrad, adam, adamw, momentum, nesterov, rmsprop, sgd, sign_sgd" in msg
    assert set(OPTIMIZERS) == {"sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "sign_sgd"}


# ---------------------------------------------------------------- differentiability


def _unrolled_val_loss(opt, lr, params0, steps=3, override="lr"):
    train, val = make_data(torch.float64, seed=1), make_data(torch.float64, seed=2)
    params, state = params0, opt.init(params0)
    for _ in range(steps):
        grads = grads_of(params, train, create_graph=True)
        params, state = opt.update(params, grads, state, **{override: lr})
    return mlp_loss(params, val)


@pytest.mark.parametrize(
    "name,kw,override,value",
    [
        ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True), "lr", 0.3),
        ("adam", dict(lr=0.1), "lr", 0.05),
        ("adam", dict(lr=0.05, weight_decay=0.1), "weight_decay", 0.2),
        ("rmsprop", dict(lr=0.01, centered=True, momentum=0.5), "lr", 0.02),
        ("adagrad", dict(lr=0.1), "lr", 0.2),
    ],
)
def test_unrolled_hypergradient_matches_finite_difference(name, kw, override, value):
    opt = build_optimizer(name, **kw)
    params0 = {k: v.requires_grad_(True) for k, v in make_params(torch.float64).items()}
    hp = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    loss = _unrolled_val_loss(opt, hp, params0, override=override)
    g_hp, *g_p = torch.autograd.grad(loss, [hp, *params0.values()])

    h = 1e-6
    with torch.enable_grad():
        fp = _unrolled_val_loss(opt, value + h, params0, override=override).item()
        fm = _unrolled_val_loss(opt, value - h, params0, override=override).item()
    fd = (fp - fm) / (2 * h)
    assert abs(fd) > 1e-4
    assert abs(g_hp.item() - fd) / abs(fd) < 1e-6

    # gradient w.r.t. the initial parameters: directional derivative vs finite difference
    gen = torch.Generator().manual_seed(7)
    direction = {k: torch.randn(SHAPES[k], generator=gen, dtype=torch.float64) for k in SHAPES}
    dd = sum((g * direction[k]).sum() for g, k in zip(g_p, params0)).item()

    def shifted(eps):
        p = {k: (v.detach() + eps * direction[k]).requires_grad_(True) for k, v in params0.items()}
        return _unrolled_val_loss(opt, value, p, override=override).item()

    fd_p = (shifted(h) - shifted(-h)) / (2 * h)
    assert abs(fd_p) > 1e-4
    assert abs(dd - fd_p) / abs(fd_p) < 1e-6


def test_safe_sqrt_values_and_derivatives():
    x = torch.tensor([0.0, 4.0, 2.25, 1e-30], dtype=torch.float64, requires_grad=True)
    y = safe_sqrt(x)
    assert torch.equal(y, torch.sqrt(x.detach()))
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx[1:3], torch.tensor([0.25, 1 / 3], dtype=torch.float64))
    assert gx[0].item() == 0.0
    # plain sqrt would be inf here (the failure mode safe_sqrt exists for)
    (g_plain,) = torch.autograd.grad(torch.sqrt(x).sum(), x)
    assert torch.isinf(g_plain[0])


def _dead_unit_val_loss(opt, lr, w1, w2, steps=2):
    """Unrolled training of a ReLU net whose hidden unit 0 is dead: its incoming
    weights get an exactly-zero gradient (through a matmul backward, which
    propagates NaN, unlike relu's own masked backward)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, generator=gen, dtype=torch.float64)  # positive inputs
    y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    xv = torch.rand(8, 3, generator=gen, dtype=torch.float64)

    def loss(p, inp):
        return ((torch.relu(inp @ p["w1"].T) @ p["w2"].T - y) ** 2).mean()

    params, state = {"w1": w1, "w2": w2}, opt.init({"w1": w1, "w2": w2})
    for _ in range(steps):
        gw1, gw2 = torch.autograd.grad(loss(params, x), [params["w1"], params["w2"]], create_graph=True)
        params, state = opt.update(params, {"w1": gw1, "w2": gw2}, state, lr=lr)
    return loss(params, xv), gw1


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop", "adagrad"])
def test_exact_zero_gradients_give_finite_hypergradients(name):
    opt = build_optimizer(name, weight_decay=0.0)
    gen = torch.Generator().manual_seed(4)
    w1 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w1[0] = -1.0  # unit 0: negative pre-activation for every positive input -> dead
    w1.requires_grad_(True)
    w2 = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    lr0 = 0.01
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    val, last_gw1 = _dead_unit_val_loss(opt, lr, w1, w2)
    assert torch.equal(last_gw1[0], torch.zeros(3, dtype=torch.float64))  # really exact zeros
    dlr, dw1, dw2 = torch.autograd.grad(val, [lr, w1, w2])
    assert torch.isfinite(dlr) and torch.isfinite(dw1).all() and torch.isfinite(dw2).all()
    # the dead unit stays dead, so the validation loss does not depend on its weights
    assert torch.equal(dw1[0], torch.zeros(3, dtype=torch.float64))
    h = 1e-6
    with torch.enable_grad():
        fd = (_dead_unit_val_loss(opt, lr0 + h, w1, w2)[0] - _dead_unit_val_loss(opt, lr0 - h, w1, w2)[0]).item() / (
            2 * h
        )
    assert abs(fd) > 1e-4
    assert abs(dlr.item() - fd) / abs(fd) < 1e-6


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_zero_gradient_derivative_analytic(name):
    # loss 0.5 * sum(c * w^2) -> g = c * w, exactly 0 where c == 0. One step with bias
    # correction: p' = w - lr * g / (|g| + eps)  =>  dp'/dw = 1 - lr * c * eps / (|g| + eps)^2
    eps, lr = 1e-3, 0.1
    c = torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    w = torch.tensor([-1.0, 0.5, 0.3, -2.0], dtype=torch.float64, requires_grad=True)
    opt = build_optimizer(name, lr=lr, eps=eps, weight_decay=0.0)
    (g,) = torch.autograd.grad((0.5 * c * w**2).sum(), w, create_graph=True)
    new, _ = opt.update({"w": w}, {"w": g}, opt.init({"w": w}))
    (dw,) = torch.autograd.grad(new["w"].sum(), w)
    gv = (c * w).detach()
    expected = 1 - lr * c * eps / (gv.abs() + eps) ** 2
    torch.testing.assert_close(dw, expected, rtol=1e-12, atol=1e-12)


def _state_after(opt, params, gseq):
    state = opt.init(params)
    for g in gseq[:-1]:
        params, state = opt.update(params, g, state)
    return params, state


@pytest.mark.parametrize(
    "name,kw,override,value",
    [
        ("sgd", dict(lr=0.1, momentum=0.9), "lr", 0.2),
        ("adam", dict(lr=0.01, amsgrad=True), "lr", 0.02),
        ("adam", dict(lr=0.01), "weight_decay", 0.5),  # nonlinear in the hyperparameter
        ("sgd", dict(lr=0.1, momentum=0.9), "momentum", 0.7),
    ],
)
def test_jvp_single_update_matches_finite_difference(name, kw, override, value):
    opt = build_optimizer(name, **kw)
    gseq = _grads_seq(n=3)
    params, state = _state_after(opt, make_params(torch.float64), gseq)

    def f(hp):
        return opt.update(params, gseq[-1], state, **{override: hp})[0]

    primal, tangent = torch.func.jvp(
        f, (torch.tensor(value, dtype=torch.float64),), (torch.tensor(1.0, dtype=torch.float64),)
    )
    h = 1e-6
    fp, fm = f(value + h), f(value - h)
    for k in params:
        torch.testing.assert_close(primal[k], f(value)[k], rtol=0, atol=1e-15)
        fd = (fp[k] - fm[k]) / (2 * h)
        assert fd.abs().max() > 1e-3
        torch.testing.assert_close(tangent[k], fd, rtol=1e-6, atol=1e-9)


def test_jvp_through_unrolled_adam_with_functorch_grad():
    # forward-mode hypergradient: jvp over 3 steps whose inner gradients come from torch.func.grad
    opt = build_optimizer("adam", lr=0.05)
    train, val = make_data(torch.float64, seed=1), make_data(torch.float64, seed=2)
    params0 = make_params(torch.float64)

    def val_loss(lr):
        params, state = params0, opt.init(params0)
        for _ in range(3):
            grads = torch.func.grad(mlp_loss)(params, train)
            params, state = opt.update(params, grads, state, lr=lr)
        return mlp_loss(params, val)

    lr0 = 0.05
    _, tangent = torch.func.jvp(
        val_loss, (torch.tensor(lr0, dtype=torch.float64),), (torch.tensor(1.0, dtype=torch.float64),)
    )
    h = 1e-6
    fd = (
        val_loss(torch.tensor(lr0 + h, dtype=torch.float64)) - val_loss(torch.tensor(lr0 - h, dtype=torch.float64))
    ) / (2 * h)
    assert abs(fd.item()) > 1e-4
    assert abs(tangent.item() - fd.item()) / abs(fd.item()) < 1e-6


def test_vmap_over_learning_rates():
    opt = build_optimizer("adam", lr=0.01, weight_decay=0.1)
    gseq = _grads_seq(n=2)
    params, state = _state_after(opt, make_params(torch.float64), gseq)
    lrs = torch.tensor([0.001, 0.01, 0.1], dtype=torch.float64)
    batched = torch.func.vmap(lambda lr: opt.update(params, gseq[-1], state, lr=lr)[0])(lrs)
    for i, lr in enumerate(lrs.tolist()):
        single = opt.update(params, gseq[-1], state, lr=lr)[0]
        for k in params:
            torch.testing.assert_close(batched[k][i], single[k], rtol=0, atol=1e-15)


def test_sign_sgd_moves_each_coordinate_by_the_bias_corrected_average_of_its_signs():
    opt = build_optimizer("sign_sgd", lr=0.1, momentum=0.5)
    p = {"w": torch.zeros(3, dtype=torch.float64)}
    state = opt.init(p)
    g1 = {"w": torch.tensor([2.0, -1e-3, 0.0], dtype=torch.float64)}
    p, state = opt.update(p, g1, state)
    assert torch.allclose(p["w"], torch.tensor([-0.1, 0.1, 0.0], dtype=torch.float64))  # step 1: lr·sign(g)
    g2 = {"w": torch.tensor([-1e6, -5.0, 1.0], dtype=torch.float64)}  # a spike moves no further than a sign
    p, state = opt.update(p, g2, state)
    m = 0.5 * (0.5 * torch.sign(g1["w"])) + 0.5 * torch.sign(g2["w"])
    assert torch.allclose(state["sign_avg"]["w"], m)
    assert torch.allclose(p["w"], torch.tensor([-0.1, 0.1, 0.0], dtype=torch.float64) - 0.1 * m / (1 - 0.5**2))
    q, _ = opt.update(p, g2, state, lr=0.0)  # per-call override
    assert torch.equal(q["w"], p["w"])
