"""Every command the README shows is one that works: each ``hoexp run`` line composes and passes
every check made before a run (the same validation the CLI does), each script it names exists,
and each make target it names is in the Makefile."""

import re
import shlex
from pathlib import Path

import pytest

from hoexp.cli import expand_sweeps, refuse_removed, split_hydra_args, validate_job

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _env_prefix(line: str) -> tuple[dict[str, str], str]:
    """``PYTHONPATH=x hoexp run ...`` → ({"PYTHONPATH": "x"}, "hoexp run ...")."""
    env = {}
    while re.match(r"[A-Z_]+=\S+ ", line):
        key, _, rest = line.partition(" ")
        env[key.split("=", 1)[0]] = key.split("=", 1)[1]
        line = rest
    return env, line


# Lines about a user's own folders (~/lab) are illustrations; every other run line must validate.
RUN_LINES = [
    c
    for c in readme_commands()
    if _env_prefix(c)[1].startswith(("hoexp run", "python -m hoexp run")) and "--help" not in c and "~/" not in c
]


def test_readme_has_commands():
    assert len(RUN_LINES) >= 10
    assert any(c.startswith("make run") for c in readme_commands())


@pytest.mark.parametrize("line", RUN_LINES)
def test_readme_run_line_validates(line, monkeypatch):
    from hoexp.cli import with_config_dir

    env, line = _env_prefix(line)
    if "PYTHONPATH" in env:  # a plugin's code (examples/...), importable as the line makes it
        monkeypatch.syspath_prepend(str(ROOT / env["PYTHONPATH"]))
    monkeypatch.chdir(ROOT)
    words = shlex.split(line)
    args = with_config_dir(words[words.index("run") + 1 :])
    overrides, flags = split_hydra_args(args)
    overrides = [o for o in overrides if "<" not in o and o != "..."]  # placeholders: <sweep folder>, ...
    refuse_removed(overrides)  # hydra/* overrides too, which expand_sweeps leaves to Hydra
    jobs = expand_sweeps(overrides) if flags & {"-m", "--multirun"} else [overrides]
    for job in jobs:
        validate_job(job)


COMPARE_LINES = [
    c for c in readme_commands() if c.startswith(("hoexp compare", "python -m hoexp compare")) and "--help" not in c
]


@pytest.mark.parametrize("line", COMPARE_LINES)
def test_readme_compare_line_validates(line, tmp_path):
    """Every check hoexp compare makes before running anything (its folder: a scratch one)."""
    from hoexp.tools.compare import parse_args

    words = shlex.split(line)
    args = [a for a in words[words.index("compare") + 1 :] if "<" not in a and a != "..."]
    if "--out" in args:
        del args[args.index("--out") : args.index("--out") + 2]
    parse_args([*args, "--out", str(tmp_path / "compare")])


def test_readme_scripts_and_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for line in readme_commands():
        words = shlex.split(line)
        if words[0] == "python" and words[1].startswith("scripts/"):
            assert (ROOT / words[1]).is_file(), line
        if words[0] == "make" and len(words) > 1 and "=" not in words[1]:
            assert re.search(rf"^{re.escape(words[1])}:", makefile, flags=re.M), line
