"""Every command and code block the README and the docs under docs/ (but the design notes, copied from elsewhere)
show is one that works: each ``hoexp run`` line composes and passes
every check made before a run (the same validation the CLI does), each ``hoexp check|compare|report`` line passes
its command's parser and checks (nothing is run), each script it names exists, each make target it names is in the
Makefile, every Python block runs (the "Bring your own" ones on a ``~/lab`` made of the docs' YAML blocks and
``tests/test_bring_your_own.py``'s components), and every relative link points into the repository (and at a
heading of the file it names, where it names one)."""

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from hoexp.cli import expand_sweeps, refuse_removed, split_hydra_args, validate_job

ROOT = Path(__file__).resolve().parents[1]
# The README and the docs it links to; docs/DESIGN.md is the project's design notes (math, papers), not commands.
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "DESIGN.md")]


def doc_commands(doc: Path) -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def readme_commands() -> list[str]:
    """Every bash line of the README and of docs/*.md."""
    return [line for doc in DOCS for line in doc_commands(doc)]


def _params(lines: list[str]) -> list:
    """One test per (file, line), named by both."""
    where = {line: doc.relative_to(ROOT) for doc in reversed(DOCS) for line in doc_commands(doc)}
    return [pytest.param(line, id=f"{where[line]}: {line}") for line in dict.fromkeys(lines)]


def _env_prefix(line: str) -> tuple[dict[str, str], str]:
    """``PYTHONPATH=x hoexp run ...`` → ({"PYTHONPATH": "x"}, "hoexp run ...")."""
    env = {}
    while re.match(r"[A-Z_]+=\S+ ", line):
        key, _, rest = line.partition(" ")
        env[key.split("=", 1)[0]] = key.split("=", 1)[1]
        line = rest
    return env, line


def _hoexp_words(line: str) -> list[str]:
    """The words from the hoexp command on (``hoexp run ...``, ``python -m hoexp ...``, ``torchrun ... -m hoexp``)."""
    words = shlex.split(_env_prefix(line)[1])
    if words[:1] == ["hoexp"]:
        return words
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "hoexp" and words[0] in ("python", "torchrun"):
            return ["hoexp", *words[i + 2 :]]
    return []


def _command(line: str) -> str:
    words = _hoexp_words(line)
    return words[1] if len(words) > 1 else ""


# ~/lab lines run on a ~/lab made by the test (lab_home).
RUN_LINES = [c for c in readme_commands() if _command(c) == "run" and "--help" not in c]


def test_readme_has_commands():
    assert len(RUN_LINES) >= 10
    readme = doc_commands(ROOT / "README.md")  # the two set-up commands and a run are on the first page
    assert any(c.startswith("make run") for c in readme) and any(c.startswith("make test") for c in readme)
    assert any(_command(c) == "run" for c in readme)
    assert {d.name for d in DOCS} >= {"README.md", "cli.md", "methods.md", "bring-your-own.md", "results.md"}


@pytest.mark.parametrize("line", _params(RUN_LINES))
def test_readme_run_line_validates(line, monkeypatch, tmp_path):
    from hoexp.cli import with_config_dir

    env, _ = _env_prefix(line)
    if "~/" in line:
        lab_home(tmp_path, monkeypatch)
    for part in env.get("PYTHONPATH", "").split(":") if "PYTHONPATH" in env else []:
        monkeypatch.syspath_prepend(str(ROOT / Path(part).expanduser()))  # a plugin's code (examples/..., ~/lab)
    monkeypatch.chdir(ROOT)
    words = _hoexp_words(line)
    args = with_config_dir(words[2:])
    overrides, flags = split_hydra_args(args)
    overrides = [o for o in overrides if "<" not in o and o != "..."]  # placeholders: <sweep folder>, ...
    refuse_removed(overrides)  # hydra/* overrides too, which expand_sweeps leaves to Hydra
    jobs = expand_sweeps(overrides) if flags & {"-m", "--multirun"} else [overrides]
    for job in jobs:
        validate_job(job)


COMPARE_LINES = [c for c in readme_commands() if _command(c) == "compare" and "--help" not in c]


@pytest.mark.parametrize("line", _params(COMPARE_LINES))
def test_readme_compare_line_validates(line, tmp_path):
    """Every check hoexp compare makes before running anything (its folder: a scratch one)."""
    from hoexp.tools.compare import parse_args

    args = [a for a in _hoexp_words(line)[2:] if "<" not in a and a != "..."]
    if "--out" in args:
        del args[args.index("--out") : args.index("--out") + 2]
    parse_args([*args, "--out", str(tmp_path / "compare")])


CHECK_LINES = [c for c in readme_commands() if _command(c) == "check"]
REPORT_LINES = [c for c in readme_commands() if _command(c) == "report"]


@pytest.mark.parametrize("line", _params(CHECK_LINES))
def test_readme_check_line_parses_and_validates(line, monkeypatch, tmp_path):
    """``hoexp check`` as the CLI runs it: its parser, the configuration and every --horizon contender composed and
    checked; only the measurement itself (run_check / run_horizon) is replaced by a recorder."""
    import hoexp.tools.check
    import hoexp.tools.horizon
    from hoexp.cli import cmd_check

    calls = []
    monkeypatch.setattr(hoexp.tools.check, "run_check", lambda spec, out, **kw: calls.append(("check", spec, kw)))
    monkeypatch.setattr(
        hoexp.tools.horizon, "run_horizon", lambda spec, cs, out, **kw: calls.append(("horizon", spec, cs))
    )
    cmd_check([*_hoexp_words(line)[2:], "--out", str(tmp_path / "check")])
    assert len(calls) == 1 and calls[0][0] == ("horizon" if "--horizon" in line else "check")
    if "--method" in line:  # every contender the line names was composed
        assert len(calls[0][2]) == line.count("--method")


@pytest.mark.parametrize("line", _params(REPORT_LINES))
def test_readme_report_line_parses(line, monkeypatch, tmp_path):
    """``hoexp report``'s parser takes the line (placeholder folders stand for scratch ones); no report is built."""
    import hoexp.tools.report
    from hoexp.cli import cmd_report

    calls = []
    monkeypatch.setattr(hoexp.tools.report, "build_report", lambda paths, out, **kw: calls.append(paths))
    args = [str(tmp_path) if "<" in a else a for a in _hoexp_words(line)[2:] if not a.startswith("[") and "]" not in a]
    cmd_report([*args, "--out", str(tmp_path / "report")])
    assert calls == [[str(tmp_path)]]


def test_readme_hoexp_help_and_version_lines_exit_0(capsys):
    from hoexp.cli import main

    for line in readme_commands():
        words = _hoexp_words(line)
        if "--help" in words or "--version" in words:
            try:
                main(words[1:])
            except SystemExit as e:
                assert e.code in (0, None), line
            assert capsys.readouterr().out.strip(), line


def test_every_readme_command_is_checked():
    """Each bash line is one of the kinds the tests above check, or a shell line that needs none."""
    for line in readme_commands():
        env, rest = _env_prefix(line)
        words = shlex.split(rest)
        kinds = {
            "hoexp": _command(line) in ("run", "check", "compare", "report") or {"--help", "--version"} & set(words),
            "make": words[0] == "make",
            "script": words[0] == "python" and words[1].endswith(".py"),
            "shell": words[0] == "source",
        }
        assert any(kinds.values()), f"no test checks this line of the README or docs/: {line}"


def test_readme_scripts_and_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for line in readme_commands():
        words = shlex.split(_env_prefix(line)[1])
        if words[0] == "python" and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), line
        if words[0] == "make" and len(words) > 1 and "=" not in words[1]:
            assert re.search(rf"^{re.escape(words[1])}:", makefile, flags=re.M), line


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens (outside code blocks)."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_readme_links_stay_inside_the_repository(doc):
    """A relative link names a file of the repository (not ../shared/..., which a clone does not have), relative
    to the file that holds it, and a ``#fragment`` names one of that file's headings."""
    links = [u for u in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()) if "://" not in u]
    assert links
    for url in links:
        path, _, fragment = url.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        assert target.is_relative_to(ROOT) and target.exists(), url
        if fragment and target.suffix == ".md":
            assert fragment in _anchors(target), f"{doc.name}: {url}"


# ----------------------------------------------------------------------------------------- Python blocks
def python_blocks(doc: Path | None = None) -> list[str]:
    """The Python blocks of one file, or of the README and docs/*.md (DOCS)."""
    return [b for d in ([doc] if doc else DOCS) for b in re.findall(r"```python\n(.*?)```", d.read_text(), flags=re.S)]


def yaml_blocks() -> list[str]:
    return [b for d in DOCS for b in re.findall(r"```yaml\n(.*?)```", d.read_text(), flags=re.S)]


def lab_home(tmp: Path, monkeypatch) -> Path:
    """``~/lab`` as docs/bring-your-own.md has it, in a scratch HOME: ``lab.py`` holds the test's
    components (tests/test_bring_your_own.py) and the docs' own Python class, ``lab/conf`` the docs' YAML
    blocks (each names its file in a comment) and, for the options the docs do not show, the test's YAML."""
    from tests.test_bring_your_own import CONFIGS, MODULE

    lab = tmp / "lab"
    (lab / "conf").mkdir(parents=True)
    own = [b for b in python_blocks() if "~/lab/lab.py" in b.splitlines()[0]]
    assert own, "the docs' ~/lab/lab.py block"
    (lab / "lab.py").write_text(
        f"from {MODULE} import blobs, jacobi, l1_decay, tiny_net  # noqa: F401\n" + "".join(own)
    )
    for rel, text in CONFIGS.items():
        (lab / "conf" / rel).parent.mkdir(parents=True, exist_ok=True)
        (lab / "conf" / rel).write_text(text.replace(MODULE, "lab"))
    written = []
    for block in yaml_blocks():
        m = re.search(r"# ~/lab/conf/(\S+\.yaml)", block)
        if m:
            (lab / "conf" / m.group(1)).write_text(block)
            written.append(m.group(1))
    assert {"model/tiny.yaml", "hp/l1.yaml", "method/last_step.yaml"} <= set(written), written
    monkeypatch.setenv("HOME", str(tmp))
    monkeypatch.syspath_prepend(str(lab))
    monkeypatch.delitem(sys.modules, "lab", raising=False)
    return lab


def test_the_python_blocks_are_found():
    assert len(python_blocks()) >= 4
    assert any("hoexp.hypergradient(" in b for b in python_blocks(ROOT / "docs" / "bring-your-own.md"))


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_readme_python_block_runs(doc, tmp_path, monkeypatch):
    """Each block of each file as a user pastes it (in a scratch folder with ~/lab in place): the library example,
    the loop on objects made in Python, and the bring-your-own flow (compose → build → run, which also runs the
    docs' method class from its YAML)."""
    import hoexp

    blocks = python_blocks(doc)
    if not blocks:
        pytest.skip(f"{doc.name} has no Python blocks")
    lab_home(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        torch.manual_seed(0)
        scope: dict = {}
        exec(compile(block, doc.name, "exec"), scope)
        if "summary" in scope:
            assert scope["summary"]["status"] == "completed", block
    if any("outputs/my_run" in b for b in blocks):
        assert (tmp_path / "outputs" / "my_run" / "summary.json").is_file()
    if not any("class LastStep" in b for b in blocks):
        return
    # The docs' LastStep from its YAML, through the loop: its hypergradients moved the family.
    spec, _ = hoexp.compose(
        ["model=tiny", "dataset=blobs", "hp=l1", "method=last_step", "outer_steps=2", "inner_steps=5"],
        config_dir="~/lab/conf",
    )
    summary = hoexp.run(hoexp.build(spec))
    assert summary["status"] == "completed" and summary["hypergradients"] == 2 and summary["method"] == "last_step"


# ----------------------------------------------------------------------------- scripts without their data
# Every script that reads the data root, with the arguments that get it there quickly (a new such script must be
# added here: test_every_data_script_is_listed).
DATA_SCRIPTS = {
    "hd_logreg_mnist.py": [],
    "dropout_mnist.py": [],
    "dropout_switch.py": [],
    "lr_schedule_mnist.py": [],
    "bench.py": ["--quick", "--only", "mnist", "--out", "RUN"],
    "ddp_scaling.py": ["--procs", "1", "--out", "RUN"],
    "through_optimizer.py": ["RUN", "experiment=ptb_lstm_dropout_gaussian"],
    "bench_bilevel.py": ["--seeds", "32", "--budget", "1", "--solvers", "hoexp-cg", "--out", "RUN"],
}


def test_every_data_script_is_listed():
    reads = {p.name for p in (ROOT / "scripts").glob("*.py") if re.search(r"mnist|ptb|HOEXP_DATA", p.read_text(), re.I)}
    assert reads == set(DATA_SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(DATA_SCRIPTS))
def test_script_without_its_data_ends_in_one_line(script, tmp_path):
    """``HOEXP_DATA=/nonexistent python scripts/<script>``: one line ``<script>: error: ... not found ...``, exit 2
    (hd_logreg_mnist.py and through_optimizer.py ended in tracebacks, ddp_scaling.py with exit 1)."""
    import os
    import subprocess

    (tmp_path / "RUN").mkdir()
    (tmp_path / "RUN" / "checkpoint.pt").write_bytes(b"")  # through_optimizer.py reads it after the data
    args = [a.replace("RUN", str(tmp_path / "RUN")) for a in DATA_SCRIPTS[script]]
    env = {**os.environ, "HOEXP_DATA": str(tmp_path / "nonexistent"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = (r.stderr.strip().splitlines() or [""])[-1]  # after progress lines (bench.py's), if any
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.match(r"[\w.]+: error: .*not found under ", last), r.stderr[-2000:]
