"""hoexp as an installed package: a wheel built from the checkout, installed into a scratch
environment, runs from a folder outside the checkout (configs shipped inside the package), and the
scripts import the installed package and end with hoexp's one-line errors."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import hoexp

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", "outputs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def _copy_source(dst: Path) -> None:
    """The checkout without its outputs and build leftovers (building in place would write build/)."""
    shutil.copytree(ROOT, dst, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A scratch venv with hoexp installed from a wheel (its dependencies come from this
    interpreter's site-packages through a .pth line: no network, no editable hoexp)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, wheels, venv = tmp / "src", tmp / "wheels", tmp / "venv"
    _copy_source(src)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("hoexp-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_hoexp_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return wheel, venv


@pytest.mark.slow
def test_wheel_ships_the_configs(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("hoexp/conf/") and n.endswith(".yaml")}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "hoexp" / "conf").rglob("*.yaml")}
    assert expected and shipped == expected
    assert "hoexp/dataset/iris.csv" in names
    assert "hydra_plugins/hoexp_launcher/__init__.py" in names  # hydra/launcher=parallel's plugin class


@pytest.mark.slow
def test_installed_hoexp_runs_from_any_folder(installed, tmp_path):
    _, venv = installed
    hoexp_bin = venv / "bin" / "hoexp"
    env = _clean_env()
    version = subprocess.run([str(hoexp_bin), "--version"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"hoexp {hoexp.__version__}"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import hoexp; print(hoexp.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert Path(where.strip()).resolve().is_relative_to(venv.resolve())  # the wheel's copy, not the checkout
    run = subprocess.run(
        [str(hoexp_bin), "run", "outer_steps=1", "inner_steps=2", "progress=false", "model.width=8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(list(tmp_path.glob("outputs/runs/*/*/summary.json"))) == 1
    bad = subprocess.run([str(hoexp_bin), "run", "method=nope"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("hoexp: error: unknown method 'nope'")
    assert len(bad.stderr.strip().splitlines()) == 1
    sweep = subprocess.run(
        [
            str(hoexp_bin),
            "run",
            "-m",
            "hydra/launcher=parallel",
            "hydra.launcher.n_jobs=2",
            "seed=0,1",
            "outer_steps=1",
            "inner_steps=2",
            "progress=false",
            "model.width=8",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    assert len(list(tmp_path.glob("outputs/multirun/*/*/*/summary.json"))) == 2


@pytest.mark.slow
def test_scripts_use_the_installed_package_and_fail_in_one_line(installed, tmp_path):
    """A script run by path from another folder imports the installed hoexp; a missing data root is
    one line naming the fix, exit 2 (it was a 20-line traceback in make bench)."""
    _, venv = installed
    env = _clean_env(HOEXP_DATA=str(tmp_path / "no-data-here"))
    for script, args in (("bench.py", ["--quick", "--only", "mnist"]), ("dropout_mnist.py", [])):
        p = subprocess.run(
            [str(venv / "bin" / "python"), str(ROOT / "scripts" / script), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 2, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith(f"{script}: error: MNIST not found under") and "HOEXP_DATA" in last
        assert "Traceback" not in p.stderr
