"""The bilevel loop in-process: methods, granularities, compatibility checks."""

import io

import pytest
import torch
from rich.console import Console

from hoexp import engine
from hoexp.cli import compose_spec
from hoexp.config.build import build
from hoexp.config.run import run_experiment
from hoexp.engine.metrics import MemoryLogger
from hoexp.errors import ConfigError
from hoexp.method.base import outer_step, train_inner
from hoexp.task.streams import FullBatch

SMALL = ["model.width=8", "model.depth=1", "progress=false", "dtype=float64"]


def run(tmp_path, *overrides):
    spec, text = compose_spec([*SMALL, *overrides])
    mem = MemoryLogger()
    summary = run_experiment(spec, tmp_path, config_text=text, console=Console(file=io.StringIO()), loggers=[mem])
    return summary, mem


def start(overrides):
    """A built experiment at its initial point: (exp, inner state, raw hyperparameters, validation batch)."""
    exp = build(compose_spec(overrides)[0])
    st = engine.start(exp)
    return exp, st.inner, st.raw, (exp.data.val.x, exp.data.val.y)


@pytest.mark.parametrize("granularity,count", [("global", 1), ("per_layer", 2), ("per_weight", 4 * 8 + 8 * 3)])
def test_granularities_run_and_move_hyperparameters(tmp_path, granularity, count):
    summary, mem = run(tmp_path, f"hp.weight_decay.granularity={granularity}", "outer_steps=3", "inner_steps=20")
    assert summary["status"] == "completed" and summary["num_hparams"] == count
    assert summary["hypergradients"] == 3
    means = [v for _, v in mem.series("hp/mean")]
    assert len(means) == 4 and means[-1] != means[0]


def test_none_keeps_hyperparameters_and_computes_no_hypergradient(tmp_path):
    summary, mem = run(tmp_path, "method=none", "outer_steps=3", "inner_steps=20")
    assert summary["hypergradients"] == 0 and summary["hp_final"]["moved_fraction"] == 0
    assert summary["hp_final"]["min"] == summary["hp_final"]["max"] == pytest.approx(1e-3)
    assert not mem.series("hypergrad/norm")
    assert summary["final"]["train_loss"] < mem.series("loss/train")[0][1]  # it did train


def test_same_seed_same_run(tmp_path):
    a, _ = run(tmp_path / "a", "outer_steps=2", "inner_steps=10")
    b, _ = run(tmp_path / "b", "outer_steps=2", "inner_steps=10")
    c, _ = run(tmp_path / "c", "outer_steps=2", "inner_steps=10", "seed=1")
    assert a["final"] == b["final"]
    assert a["final"] != c["final"]


@pytest.mark.slow
def test_runner_methods_agree_with_exact_at_the_same_point():
    """Inside the runner's method objects: CG and Neumann against the dense solve, same weights."""
    from hoexp.config.build import build_method

    smooth = [
        *SMALL,
        "model.activation=tanh",
        "hp.weight_decay.init=1e-2",
        "optim.inner.lr=0.1",
    ]  # a strict minimum: H ≻ 0, CG applies
    exp, state, raw, val = start([*smooth, "method=exact"])
    batches = FullBatch(exp.data.train)
    state, _, _ = train_inner(exp.problem, exp.inner_opt, state, raw, batches, 3000)
    hgs = {}
    for overrides in (
        ["method=exact"],
        ["method=cg", "method.iterations=500", "method.tol=1e-12"],
        ["method=neumann", "method.terms=2000", "method.alpha=0.05"],
    ):
        m = build_method(compose_spec([*smooth, *overrides])[0])
        hg, _, stats = outer_step(m, exp.problem, exp.inner_opt, state, raw, batches, val, 0)
        assert stats["inner/grad_norm"] < 1e-3, (overrides, stats)
        assert stats["solver/residual"] < (0.1 if overrides[0] == "method=neumann" else 1e-6), (overrides, stats)
        hgs[overrides[0]] = torch.cat([v.flatten() for v in hg.values()])
    ref = hgs["method=exact"]
    assert float(ref.norm()) > 0
    for name, bound in (("method=cg", 0.999), ("method=neumann", 0.99)):
        cos = torch.nn.functional.cosine_similarity(hgs[name], ref, dim=0)
        assert cos > bound, (name, float(cos))


def test_ift_methods_refuse_families_that_do_not_move_the_optimum():
    for method in ("cg", "neumann", "exact", "t1t2", "fixed_point"):
        with pytest.raises(ConfigError, match=f"method={method} .* cannot tune hp=lr"):
            compose_spec([f"method={method}", "hp=lr"])


def test_failed_run_still_writes_summary(tmp_path, monkeypatch):
    """A run that dies part-way keeps what it logged and records why in summary.json."""
    import json

    from hoexp.method import implicit

    calls = {"n": 0}
    real = implicit.ift_hypergradient

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(implicit, "ift_hypergradient", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        run(tmp_path, "outer_steps=4", "inner_steps=5")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "boom" in summary["error"]
    assert summary["final"]["step"] == 1 and summary["hypergradients"] == 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # steps 0 and 1 survived


def test_nonfinite_hypergradients_are_skipped_then_abort(tmp_path, monkeypatch):
    import json

    from hoexp.config.run import Diverged
    from hoexp.method import implicit

    real = implicit.ift_hypergradient
    calls = {"n": 0}

    def nan_after_first(*args, **kwargs):
        hg, stats = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 2:  # the first hypergradient is fine, then NaN forever
            hg = {k: torch.full_like(v, float("nan")) for k, v in hg.items()}
        return hg, stats

    monkeypatch.setattr(implicit, "ift_hypergradient", nan_after_first)
    with pytest.raises(Diverged, match="3 non-finite hypergradients in a row .outer step 4.*lower method.alpha"):
        run(tmp_path, "outer_steps=6", "inner_steps=5")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["hypergradients"] == 1
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [ln.get("hypergrad/nonfinite", 0) for ln in lines] == [0, 0, 1, 1, 1]
    assert lines[2]["hp/mean"] == lines[3]["hp/mean"] == lines[4]["hp/mean"]  # updates skipped


def test_nonfinite_training_loss_stops_the_run(tmp_path):
    import json

    from hoexp.config.run import Diverged

    with pytest.raises(Diverged, match="training loss became nan at outer step 1; lower optim.inner.lr"):
        run(tmp_path, "optim.inner.lr=1e12", "outer_steps=3", "inner_steps=20")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize(
    "method",
    [
        ["method=unrolled"],
        ["method=truncated", "method.k=3"],
        ["method=forward", "hp.weight_decay.granularity=per_layer"],
        ["method=t1t2"],
        ["method=fixed_point"],
    ],
)
def test_every_method_runs_in_the_runner(tmp_path, method):
    summary, mem = run(tmp_path, *method, "outer_steps=2", "inner_steps=8")
    assert summary["status"] == "completed" and summary["hypergradients"] == 2
    assert summary["hp_final"]["moved_fraction"] > 0
    assert all(v > 0 for _, v in mem.series("hypergrad/norm"))


def test_unrolled_and_forward_agree_inside_the_runner():
    from hoexp.config.build import build_method

    base = [*SMALL, "hp.weight_decay.granularity=per_layer"]
    exp, state, raw, val = start([*base, "method=unrolled"])
    params = state.params
    out = {}
    for name in ("unrolled", "forward"):
        m = build_method(compose_spec([*base, f"method={name}"])[0])
        hg, new_state, _ = outer_step(m, exp.problem, exp.inner_opt, state, raw, FullBatch(exp.data.train), val, 12)
        out[name] = (torch.cat([v.flatten() for v in hg.values()]), new_state)
    assert torch.allclose(out["unrolled"][0], out["forward"][0], rtol=1e-8, atol=1e-14)
    for k in params:
        assert torch.allclose(out["unrolled"][1].params[k], out["forward"][1].params[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["sgd", "sgdn", "adam"])
def test_hd_adapts_the_learning_rate_in_the_runner(tmp_path, variant):
    summary, mem = run(
        tmp_path,
        "hp=lr",
        "method=hd",
        f"method.variant={variant}",
        "method.beta=1e-3",
        "outer_steps=3",
        "inner_steps=10",
    )
    lrs = [v for _, v in mem.series("hd/lr")]
    assert summary["status"] == "completed" and summary["hypergradients"] == 0 and len(lrs) == 3
    assert lrs[-1] != 0.01  # moved away from optim.inner.lr
    assert summary["hp"] == "lr"


def test_reversible_matches_unrolled_inside_the_runner():
    """Same first outer step (momentum buffer starts at zero in both): same hypergradient and weights."""
    from hoexp.config.build import build_method

    # γ = 0.75 is exactly representable (reversible learning rounds γ to a multiple of 2^-16).
    base = [*SMALL, "optim/inner=momentum", "optim.inner.lr=0.05", "optim.inner.momentum=0.75"]
    exp, state, raw, val = start([*base, "method=unrolled"])
    params = state.params
    out = {}
    for name in ("unrolled", "reversible"):
        m = build_method(compose_spec([*base, f"method={name}"])[0])
        hg, new_state, stats = outer_step(m, exp.problem, exp.inner_opt, state, raw, FullBatch(exp.data.train), val, 15)
        out[name] = (torch.cat([v.flatten() for v in hg.values()]), new_state, stats)
    a, b = out["unrolled"][0], out["reversible"][0]
    assert float((a - b).norm() / a.norm()) < 1e-7
    for k in params:
        assert torch.allclose(out["unrolled"][1].params[k], out["reversible"][1].params[k], rtol=0, atol=1e-8)
    assert 0 < out["reversible"][2]["reversible/bits_per_weight_step"] < 0.5  # log2(1/0.75) = 0.415


def test_reversible_refuses_optimizers_it_cannot_reverse():
    from hoexp.cli import validate_job

    for inner in ("adam", "nesterov", "sgd"):  # sgd: momentum 0 cannot be reversed either
        with pytest.raises(ConfigError, match="method=reversible reverses SGD"):
            validate_job(["method=reversible", f"optim/inner={inner}"])
    validate_job(["method=reversible", "optim/inner=momentum"])


def test_minibatch_stream_is_seeded_and_covers_each_epoch():
    from hoexp.dataset.base import Split
    from hoexp.task.streams import Minibatches

    split = Split(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    a = Minibatches(split, 3, torch.Generator().manual_seed(0))
    b = Minibatches(split, 3, torch.Generator().manual_seed(0))
    first = [next(a)[1] for _ in range(3)]
    assert all(torch.equal(x, next(b)[1]) for x in first)
    assert sorted(torch.cat(first).tolist()) == sorted(set(torch.cat(first).tolist()))  # no repeats in an epoch
    assert len(set(torch.cat(first).tolist())) == 9


@pytest.mark.slow
def test_mnist_minibatch_run(tmp_path):
    summary, mem = run(
        tmp_path,
        "dataset=mnist",
        "dataset.train_size=500",
        "dataset.val_size=200",
        "dataset.batch_size=64",
        "dataset.val_batch_size=100",
        "model.width=32",
        "model.depth=1",
        "hp=[weight_decay,dropout]",
        "hp.dropout.granularity=per_layer",
        "outer_steps=2",
        "inner_steps=5",
        "dtype=float32",
    )
    assert summary["status"] == "completed" and summary["dataset"] == "mnist" and summary["hypergradients"] == 2
    assert summary["num_hparams"] == 784 * 32 + 32 * 10 + 2  # per-weight decays + 2 per-layer dropout rates
    assert 0 < summary["final"]["test_acc"] <= 1
