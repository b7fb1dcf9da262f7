"""A model, a dataset, a hyperparameter family and a linear solve defined here, outside hoexp, and used with
``hoexp run --config-dir`` and from Python, as docs/bring-your-own.md shows."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from rich.console import Console
from torch import Tensor, nn

from hoexp import tree
from hoexp.components import DataContext, PositiveFloat, PositiveInt
from hoexp.dataset.base import Split, Splits
from hoexp.method.base import train_inner
from hoexp.method.solvers import SolveResult
from hoexp.types import InnerState, OuterResult, OuterStep

ROOT = Path(__file__).resolve().parents[1]
MODULE = __name__  # tests.test_bring_your_own: the configs below name these factories by this path


# ------------------------------------------------------------------------- the user's components
def blobs(ctx: DataContext, *, n: PositiveInt = 90, spread: PositiveFloat = 1.0) -> Splits:
    """Three Gaussian blobs in 2-D, split 1/3 each into train / validation / test (seeded by the run)."""
    g = torch.Generator().manual_seed(ctx.seed)
    y = torch.randint(0, 3, (n,), generator=g)  # every split gets all three classes
    centers = torch.tensor([[0.0, 2.0], [-1.7, -1.0], [1.7, -1.0]])
    x = (centers[y] + spread * torch.randn(n, 2, generator=g)).to(ctx.dtype)
    parts = [Split(x[i::3], y[i::3]) for i in range(3)]
    return Splits(*parts, num_features=2, num_classes=3)


class TinyNet(nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_net(data: Splits, *, hidden: PositiveInt = 8) -> TinyNet:
    return TinyNet(data.num_features, data.num_classes, hidden)


class L1Decay:
    """One L1 strength ``exp(raw)`` per weight matrix: ``L_T += Σ_k exp(raw_k)·‖W_k‖₁``."""

    name = "l1"
    moves_optimum = True

    def __init__(self, init: float):
        self.start = math.log(init)

    def init(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f"l1:{k}": torch.full((), self.start, dtype=v.dtype) for k, v in params.items() if k.endswith("weight")}

    def view(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.exp() for k, v in raw.items()}

    def clamp(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.clamp(-20, 5) for k, v in raw.items()}

    def penalty(self, params: dict[str, Tensor], raw: dict[str, Tensor]) -> Tensor:
        return sum(raw[f"l1:{k}"].exp() * params[k].abs().sum() for k in params if f"l1:{k}" in raw)

    def optimizer_overrides(self, raw: dict[str, Tensor], step: int) -> dict:
        return {}


def l1_decay(*, init: PositiveFloat = 1e-3) -> L1Decay:
    return L1Decay(init)


class Jacobi:
    """``x ← x + ω·(b − Hx)/d`` with ``d`` the Hessian's diagonal estimated once by Hutchinson probes."""

    def __init__(self, iterations: int, omega: float):
        self.iterations, self.omega = iterations, omega

    def __call__(self, op, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        z = torch.randn(8, b.numel(), dtype=b.dtype, generator=torch.Generator().manual_seed(0))
        d = torch.stack([zi * op.matvec(zi) for zi in z]).mean(0).abs().clamp_min(1e-3)
        x = torch.zeros_like(b) if x0 is None else x0
        for _ in range(self.iterations):
            x = x + self.omega * (b - op.matvec(x)) / d
        r = float((op.matvec(x) - b).norm() / b.norm().clamp_min(1e-30))
        return SolveResult(x, self.iterations, self.iterations + 9, r)


def jacobi(*, iterations: PositiveInt = 10, omega: PositiveFloat = 0.5) -> Jacobi:
    return Jacobi(iterations, omega)


class LastStep:
    """A hypergradient method: train ``inner_steps − 1`` plain steps, then differentiate the validation loss
    through the last SGD step, ``d/dλ L_V(w − η·∇_w L_T(w, λ))`` (the greedy one-step hypergradient)."""

    extra_batches: ClassVar[int] = 0
    needs_stationary_point: ClassVar[bool] = False  # it differentiates a step, so it tunes lr too
    differentiates_steps: ClassVar[bool] = True
    refuses_data_parallel: ClassVar[str] = "was not written for it"

    def __init__(self, name: str = "last_step"):
        self.name = name

    def __call__(self, st: OuterStep) -> OuterResult:
        state, _, _ = train_inner(st.task, st.inner_opt, st.inner, st.raw, st.train[:-1])
        w = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
        lam = {k: v.detach().requires_grad_(True) for k, v in st.raw.items()}
        loss = st.task.train_loss(w, lam, st.train[-1])
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        lr = st.task.family.optimizer_overrides(lam, state.step).get("lr", st.inner_opt.defaults["lr"])
        step = {k: w[k] - (lr[k] if isinstance(lr, dict) else lr) * g for k, g in zip(w, grads)}
        val = st.task.val_loss(step, lam, st.val)
        hg = dict(zip(lam, torch.autograd.grad(val, list(lam.values()), allow_unused=True)))
        hg = {k: torch.zeros_like(lam[k]) if g is None else g for k, g in hg.items()}
        new = InnerState({k: v.detach() for k, v in step.items()}, state.opt_state, state.step + 1)
        return OuterResult(hg, new, {"inner/loss": float(loss.detach()), "hypergrad/norm": float(tree.norm(hg))})


def last_step(*, name: str = "last_step") -> LastStep:
    return LastStep(name)


CONFIGS = {
    "dataset/blobs.yaml": f"_target_: {MODULE}.blobs\n_partial_: true\nname: blobs\nn: 90\nspread: 1.0\n",
    "model/tiny.yaml": f"_target_: {MODULE}.tiny_net\n_partial_: true\nname: tiny\nhidden: 8\n",
    "hp/l1.yaml": f"# @package hp.l1\n_target_: {MODULE}.l1_decay\nname: l1\ninit: 1.0e-3\n",
    "method/jacobi_ift.yaml": (
        "_target_: hoexp.method.implicit.ift\nname: jacobi_ift\n"
        f"solver: {{_target_: {MODULE}.jacobi, iterations: 10, omega: 0.5}}\n"
    ),
    "method/last_step.yaml": f"_target_: {MODULE}.last_step\nname: last_step\n",
}
OVERRIDES = [
    "dataset=blobs",
    "model=tiny",
    "hp=l1",
    "method=jacobi_ift",
    "outer_steps=3",
    "inner_steps=20",
    "dtype=float64",
    "progress=false",
]


def write_configs(folder: Path) -> Path:
    for rel, text in CONFIGS.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def test_own_components_run_from_python(tmp_path, compose):
    from hoexp.config.build import build
    from hoexp.config.run import run_experiment

    conf = write_configs(tmp_path / "conf")
    spec = compose(*OVERRIDES, config_dir=conf)
    exp = build(spec)
    assert isinstance(exp.model, TinyNet) and isinstance(exp.problem.family, L1Decay)
    assert isinstance(exp.method.solver, Jacobi) and exp.method.solver.iterations == 10
    summary = run_experiment(spec, tmp_path / "run", console=Console(file=io.StringIO()))
    assert summary["status"] == "completed" and summary["hypergradients"] == 3
    assert summary["num_hparams"] == 2 and summary["method"] == "jacobi_ift" and summary["dataset"] == "blobs"
    assert summary["hp_final"]["moved_fraction"] > 0


def test_own_components_run_from_the_command_line(tmp_path):
    conf = write_configs(tmp_path / "conf")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hoexp",
            "run",
            "--config-dir",
            str(conf),
            *OVERRIDES,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["model"] == "tiny"


def test_own_option_errors_are_one_line_from_the_signature(tmp_path, capsys):
    import pytest

    from hoexp.cli import main

    conf = write_configs(tmp_path / "conf")
    for args, expected in [
        (["model.hiddn=3"], "unknown key 'hiddn' in model (did you mean 'hidden'?); valid keys: hidden"),
        (["model.hidden=0"], "model=tiny: hidden must be > 0, got 0"),
        (["dataset.spread=wide"], "dataset.spread: 'wide' is not a valid float"),
        (
            ["method=nope"],
            "unknown method 'nope'; choose one of: amigo, cg, cg_gn, exact, fd, fixed_point, forward, hd, "
            "jacobi_ift, last_step, neumann",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["run", "--config-dir", str(conf), *OVERRIDES, *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_own_method_matches_truncated_reverse_mode_through_one_step(tmp_path, compose):
    """The method above, run from its YAML, equals hoexp's truncated k=1 (plain SGD) at the same point, for a
    family that moves w* (l1) and one that changes only the path (lr: allowed, it differentiates a step)."""
    from hoexp.config.build import build
    from hoexp.engine import start
    from hoexp.method.base import outer_step

    conf = write_configs(tmp_path / "conf")
    for family in (["hp=l1"], ["hp=lr", "hp.lr.granularity=per_layer"]):
        base = [*OVERRIDES[:2], *family, "optim/inner=sgd", "optim.inner.lr=0.1", "dtype=float64", "inner_steps=5"]
        hgs = []
        for method in (["method=last_step"], ["method=truncated", "method.k=1"]):
            exp = build(compose(*base, *method, config_dir=conf))
            st = start(exp)
            res = outer_step(exp.method, exp.task, exp.inner_opt, st.inner, st.raw, st.train, next(st.val), 5)
            hgs.append(torch.cat([v.flatten() for v in res.hypergrad.values()]))
        assert float(hgs[0].norm()) > 0
        torch.testing.assert_close(hgs[0], hgs[1], rtol=1e-9, atol=1e-12)


def test_hoexp_check_reads_your_config_folder_too(tmp_path):
    """hoexp check on your own dataset, model and family: every applicable method against the dense solve."""
    from hoexp.cli import main

    conf = write_configs(tmp_path / "conf")
    main(
        [
            "check",
            "--config-dir",
            str(conf),
            "dataset=blobs",
            "model=tiny",
            "hp=l1",
            "inner_steps=30",
            "dtype=float64",
            "--iterations",
            "0,3",
            "--out",
            str(tmp_path / "check"),
        ]
    )
    report = json.loads((tmp_path / "check" / "check.json").read_text())
    assert report["problem"]["dataset"] == "blobs" and report["problem"]["model"] == "tiny"
    assert any(row["method"] == "cg" for row in report["rows"])


def test_hoexp_compare_accepts_your_config_folder(tmp_path):
    """hoexp compare plans HO with your method against a grid of your family's value (checked, nothing run)."""
    from hoexp.cli import with_config_dir
    from hoexp.tools.compare import parse_args

    conf = write_configs(tmp_path / "conf")
    plan = parse_args(
        with_config_dir(
            [
                "--config-dir",
                str(conf),
                "dataset=blobs",
                "model=tiny",
                "hp=l1",
                "--methods",
                "last_step,jacobi_ift",
                "--grid",
                "0.001,0.01",
                "--search",
                "random",
                "--out",
                str(tmp_path / "cmp"),
            ]
        )
    )
    assert [name for name, _ in plan.ho] == ["last_step", "jacobi_ift"] and plan.grid_key == "hp.l1.init"
    assert any(o.startswith("hydra.searchpath=") for o in plan.base)


def test_config_dirs_side_by_side_and_clashes_refused(tmp_path, monkeypatch):
    """--config-dir repeats: the example's folder and yours (your method with its preset), or yours split in two;
    one option name in two folders, or in a folder and hoexp's own, is refused in one line (Hydra would silently
    take the first)."""
    from hoexp.cli import validate_job, with_config_dir
    from hoexp.config.compose import compose
    from hoexp.errors import ConfigError

    write_configs(tmp_path / "conf")
    (tmp_path / "a").mkdir()
    (tmp_path / "conf" / "dataset").rename(tmp_path / "a" / "dataset")
    (tmp_path / "conf" / "model").rename(tmp_path / "a" / "model")
    dirs = ["--config-dir", str(tmp_path / "a"), f"--config-dir={tmp_path / 'conf'}", "-cd", str(tmp_path / "a")]
    args = with_config_dir([*dirs, *OVERRIDES])
    assert args[-1] == f"hydra.searchpath=[file://{tmp_path / 'a'},file://{tmp_path / 'conf'}]"
    validate_job(args)
    assert compose(args).method.solver.iterations == 10 and compose(args).model.hidden == 8
    example = ROOT / "examples" / "hyper_cleaning"
    monkeypatch.syspath_prepend(str(example))
    both = with_config_dir(["-cd", str(example / "conf"), "-cd", str(tmp_path / "conf"), "experiment=hyper_cleaning"])
    validate_job([*both, "method=jacobi_ift"], device=False)
    assert compose([*both, "method=jacobi_ift"]).dataset.name == "corrupted_mnist"

    (tmp_path / "b" / "model").mkdir(parents=True)
    (tmp_path / "b" / "model" / "tiny.yaml").write_text("_target_: x.y\n")
    with pytest.raises(ConfigError, match=rf"--config-dir {tmp_path / 'b'}: model/tiny.yaml is also in --config-dir "):
        with_config_dir(["-cd", str(tmp_path / "a"), "-cd", str(tmp_path / "b")])
    (tmp_path / "b" / "model" / "tiny.yaml").rename(tmp_path / "b" / "model" / "mlp.yaml")
    with pytest.raises(ConfigError, match=r"model/mlp.yaml is also in hoexp's own configs, and only one can be used"):
        with_config_dir(["-cd", str(tmp_path / "b")])


def test_a_family_yaml_without_its_header_is_refused_naming_the_header(tmp_path, capsys):
    """hp/<name>.yaml without '# @package hp.<name>': Hydra puts its keys in hp itself, and the error said the
    option "names no code" though the file starts with _target_; now it names the header to add (alone and with
    another family). With the header, as docs/bring-your-own.md shows, it runs."""
    import pytest

    from hoexp.cli import main

    conf = write_configs(tmp_path / "conf")
    (conf / "hp" / "l1.yaml").write_text(CONFIGS["hp/l1.yaml"].split("\n", 1)[1])  # the header line left out
    for hp in ("hp=l1", "hp=[l1,weight_decay]"):
        with pytest.raises(SystemExit) as e:
            main(["run", "--config-dir", str(conf), *OVERRIDES, hp])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert "hp=l1: its YAML has no package header" in err and "'# @package hp.l1'" in err, err
