"""The language-modelling problem (PTB + LSTM) and the dataset presets."""

import io
import math

import pytest
import torch
from rich.console import Console

from hoexp.cli import compose_spec
from hoexp.config.run import run_experiment
from hoexp.model.lstm import LSTMLanguageModel, lm_loss
from hoexp.task import LanguageModel
from hoexp.task.streams import BPTTStream, batchify

TINY_LSTM = ["model.embed_dim=12", "model.hidden=12", "progress=false"]


class NoFamily:
    name = "none"

    def penalty(self, params, raw):
        return 0.0


def test_evaluate_carries_the_state_through_the_stream():
    torch.manual_seed(0)
    model = LSTMLanguageModel(20, 6, 6, 2).double()
    source = batchify(torch.randint(0, 20, (203,)), 4)  # [50, 4]
    problem = LanguageModel(model, NoFamily())
    problem.bptt = 7
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss, acc = problem.evaluate(params, source)
    with torch.no_grad():
        logits, _ = model(source[:-1])  # one pass over the whole stream = windows with the state carried
    assert float(loss) == pytest.approx(float(lm_loss(logits, source[1:])), rel=1e-10)
    assert float(acc) == pytest.approx(float((logits.argmax(-1) == source[1:]).double().mean()), rel=1e-6)


def test_bptt_stream_windows():
    source = torch.arange(40).reshape(20, 2)
    s = BPTTStream(source, 5)
    windows = [next(s) for _ in range(5)]
    assert torch.equal(windows[0][0], source[0:5]) and torch.equal(windows[0][1], source[1:6])
    assert torch.equal(windows[1][0], source[5:10])
    assert windows[3][0].shape[0] == 4  # the last window is shorter (19 targets in all)
    assert torch.equal(windows[4][0], source[0:5])  # wraps around: the next epoch
    r1 = BPTTStream(source, 5, torch.Generator().manual_seed(3))
    r2 = BPTTStream(source, 5, torch.Generator().manual_seed(3))
    assert all(torch.equal(next(r1)[0], next(r2)[0]) for _ in range(4))


def test_hypergradient_validation_windows_have_val_batch_size_streams():
    from types import SimpleNamespace

    from hoexp.task.language_model import lm_data

    text = torch.arange(1000)
    splits = SimpleNamespace(train=text, val=text[:600], test=text[:300], vocab_size=1000)
    data = lm_data(splits, 4, 2, 5, val_batch_size=12)
    window = next(LanguageModel(None, NoFamily(), data=data, bptt=5).val_stream(seed=0)).x
    assert window.shape == (5, 12) and data.train.shape[1] == 4  # training windows keep batch_size streams
    assert torch.equal(data.val_train_layout, batchify(splits.val, 12))  # every stream is a slice of the text
    assert lm_data(splits, 4, 2, 5).val_train_layout.shape[1] == 4  # 0: batch_size, as before


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, method, relaxation, rates, extra",
    [
        ("ptb_lstm_dropout", "stn", "bernoulli", 5, ["method.hold=1", "outer_steps=4"]),
        ("ptb_lstm_dropout_gaussian", "truncated", "gaussian", 1, ["outer_steps=3"]),
    ],
)
def test_ptb_lstm_dropout_preset_runs(tmp_path, preset, method, relaxation, rates, extra):
    spec, text = compose_spec(
        [f"experiment={preset}", *TINY_LSTM, "inner_steps=12", "warmup=1", "eval_every=1", *extra]
    )
    summary = run_experiment(spec, tmp_path, config_text=text, console=Console(file=io.StringIO()))
    assert summary["status"] == "completed" and summary["hypergradients"] == 2  # the last two outer steps
    f = summary["final"]
    assert f["val_ppl"] == pytest.approx(math.exp(f["val_loss"]), rel=1e-6) and f["val_ppl"] < 6100  # < vocab
    # standard: a rate per site (embedding, layer0, output, the DropConnect of each recurrent weight); Gaussian: one
    assert summary["num_hparams"] == rates and summary["method"] == method
    assert f"relaxation: {relaxation}" in text
    assert summary["hp_final"]["moved_fraction"] > 0
    # sign descent (lr 0.3): two hyper-steps move a logit by at most 0.6, whatever the hypergradients' size
    assert "_target_: hoexp.optim.sign_sgd" in text
    for p in (summary["hp_final"]["min"], summary["hp_final"]["max"]):
        assert abs(math.log(p / (1 - p))) <= 0.6 + 1e-5  # from the preset's 0.5, logit 0


@pytest.mark.slow
def test_mnist_per_weight_decay_preset_runs(tmp_path):
    spec, text = compose_spec(
        [
            "experiment=mnist_per_weight_decay",
            "model.width=16",
            "dataset.train_size=300",
            "outer_steps=2",
            "inner_steps=3",
            "eval_every=1",
            "progress=false",
        ]
    )
    summary = run_experiment(spec, tmp_path, config_text=text, console=Console(file=io.StringIO()))
    assert summary["status"] == "completed" and summary["dataset"] == "mnist"
    # layer_and_weight: one decay per weight (as offsets) plus one shared value per layer
    assert summary["num_hparams"] == 784 * 16 + 16 * 16 + 16 * 10 + 3


def test_dataset_model_mismatch_is_refused():
    """The model factory receives the loaded data and refuses what it cannot fit: one line when the run is built."""
    from hoexp.config.build import build
    from hoexp.errors import ConfigError

    with pytest.raises(ConfigError, match="model=lstm does not fit dataset=iris: .*model=mlp fits them"):
        build(compose_spec(["model=lstm"])[0])
    with pytest.raises(ConfigError, match="model=mlp does not fit dataset=ptb: .*model=lstm fits text"):
        build(compose_spec(["dataset=ptb"])[0])
