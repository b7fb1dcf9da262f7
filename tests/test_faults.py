"""A full disk during a run (issue 17, item 7): one line, a summary.json that says the run failed, no
temporary files left; injected as ``OSError(ENOSPC)`` and, where a tmpfs can be mounted, for real."""

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from hoexp.cli import compose_spec, main
from hoexp.config.run import Run
from hoexp.engine import rundir
from hoexp.errors import HoexpError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.width=8", "model.depth=1", "progress=false", "outer_steps=4", "inner_steps=3", "checkpoint_every=1"]


class FullAfter:
    """``open`` for hoexp.engine.rundir: the ``n``-th write of a file named ``name`` writes half its bytes,
    then fails with ENOSPC (as a disk that fills up during the write)."""

    def __init__(self, name, n):
        self.name, self.n, self.seen = name, n, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if Path(path).name != self.name:
            return f
        self.seen += 1
        if self.seen < self.n:
            return f
        real_write = f.write

        def write(data):
            real_write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        f.write = write
        return f


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def test_disk_full_while_checkpointing_is_one_line_with_a_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "open", FullAfter(".checkpoint.pt.tmp", 3), raising=False)
    spec, text = compose_spec(TINY)
    with pytest.raises(HoexpError) as e:
        Run(spec, tmp_path, config_text=text, console=Console(file=io.StringIO())).execute()
    message = str(e.value)
    assert "\n" not in message and "No space left on device" in message and "checkpoint.pt" in message, message
    assert f"resume=auto hydra.run.dir={tmp_path}" in message and "summary.json says status 'failed'" in message
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert summary["final"]["step"] == 3
    assert leftovers(tmp_path) == []  # no .checkpoint.pt.tmp left behind
    monkeypatch.undo()  # space freed: the run continues from its last checkpoint
    resumed = Run(compose_spec([*TINY, "resume=auto"])[0], tmp_path, console=Console(file=io.StringIO())).execute()
    assert resumed["status"] == "completed" and resumed["final"]["step"] == 4


def test_disk_full_from_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rundir, "open", FullAfter(".checkpoint.pt.tmp", 2), raising=False)
    with pytest.raises(SystemExit) as e:
        main(["run", *TINY, f"hydra.run.dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("hoexp: error:") == 1, err
    assert err.splitlines()[-1].startswith("hoexp: error: the run stopped at outer step 2: No space left"), err
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    assert leftovers(tmp_path) == []


def test_disk_full_in_the_metrics_file_names_it(tmp_path, monkeypatch):
    from hoexp.engine import metrics

    real = metrics.JsonlLogger.log_scalars

    def full(self, step, values):
        if step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        real(self, step, values)

    monkeypatch.setattr(metrics.JsonlLogger, "log_scalars", full)
    spec, _ = compose_spec(TINY)
    with pytest.raises(HoexpError, match=r"No space left on device \(.*metrics.jsonl\)"):
        Run(spec, tmp_path, console=Console(file=io.StringIO())).execute()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def _can_mount_tmpfs() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")
def test_a_real_full_disk(tmp_path):
    """A 600 kB tmpfs (in a private mount namespace): the 17,280-weight Iris run's checkpoints fill it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    run = mnt / "run"
    script = (
        f"mount -t tmpfs -o size=600k tmpfs {mnt} || exit 99; "
        f"{sys.executable} -m hoexp run outer_steps=20 inner_steps=3 checkpoint_every=1 progress=false "
        f"hydra.run.dir={run}; echo rc=$?; ls -A {run}; cat {run}/summary.json"
    )
    env = {
        **{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    assert "rc=2" in r.stdout, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("hoexp: error: the run stopped at outer step ")
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    listing, summary = r.stdout.split("rc=2\n")[1].split("{", 1)
    assert "summary.json" in listing.split() and not [n for n in listing.split() if n.endswith(".tmp")]
    assert '"status": "failed"' in "{" + summary
