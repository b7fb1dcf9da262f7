"""Run folders that cannot collide and resumes that cannot mix (issue 17): unique folders for
simultaneous starts, one writer per folder, refused path escapes, changed configs refused on resume,
``resume=auto`` and a SIGTERM before the first checkpoint."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from rich.console import Console

from hoexp.cli import compose_spec, main
from hoexp.config.run import Preempted, Run
from hoexp.engine import rundir
from hoexp.errors import ConfigError, HoexpError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.width=8", "model.depth=1", "progress=false", "outer_steps=3", "inner_steps=3", "checkpoint_every=1"]


def hoexp(*args, cwd=ROOT, timeout=300):
    env = {
        **{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "hoexp", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run(folder, *overrides, **kwargs):
    spec, text = compose_spec([*TINY, *overrides])
    return Run(spec, folder, config_text=text, console=Console(file=io.StringIO()), **kwargs).execute()


def lines(folder):
    return [json.loads(ln) for ln in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ unique folders, lock
def test_claim_gives_each_of_many_simultaneous_claims_its_own_folder(tmp_path):
    got: list[Path] = []
    threads = [
        threading.Thread(target=lambda: got.append(rundir.claim(tmp_path / "12-00-00_neumann"))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(p.is_dir() for p in got)
    assert sorted(p.name for p in got)[:2] == ["12-00-00_neumann", "12-00-00_neumann-2"]


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    procs = [hoexp("run", f"seed={s}", *TINY, cwd=tmp_path) for s in (1, 2, 3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    folders = sorted(p.parent for p in tmp_path.glob("outputs/runs/*/*/summary.json"))
    assert len(folders) == 3  # was one folder with 12 interleaved metric lines
    assert sorted(json.loads((f / "summary.json").read_text())["seed"] for f in folders) == [1, 2, 3]
    assert all(len(lines(f)) == 4 for f in folders)


def test_lock_refuses_a_second_writer_in_one_line(tmp_path):
    with rundir.RunLock(tmp_path):
        with pytest.raises(HoexpError, match=f"{tmp_path} is in use by another hoexp run .pid {os.getpid()} on ") as e:
            run(tmp_path)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / rundir.LOCK_NAME).exists()  # released and removed
    assert run(tmp_path, "resume=false")["status"] == "completed"  # free again


def test_second_command_on_a_busy_folder_is_one_line(tmp_path):
    with rundir.RunLock(tmp_path):
        p = hoexp("run", *TINY, f"hydra.run.dir={tmp_path}")
        _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"hoexp: error: {tmp_path} is in use by another hoexp run")


def test_a_lock_dies_with_its_process(tmp_path):
    """kill -9 leaves the lock file but not the lock: the folder can be resumed at once."""
    code = (
        f"from hoexp.engine.rundir import RunLock; import os, signal; RunLock({str(tmp_path)!r}).__enter__(); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
    assert (tmp_path / rundir.LOCK_NAME).exists()
    with rundir.RunLock(tmp_path):
        pass


@pytest.mark.parametrize("name", ["../../../../x", "a/b", "..", "has space", ""])
def test_names_that_escape_the_output_folder_are_refused(capsys, name):
    with pytest.raises(SystemExit) as e:
        main(["run", f"name='{name}'"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be a plain folder name" in err, err


def test_plain_names_pass():
    assert compose_spec(["name='lr=0.1,wd@2.v-1_x+y'"])[0].run.name == "lr=0.1,wd@2.v-1_x+y"


# ------------------------------------------------------------------------------------------- resume
def test_a_start_where_a_run_logged_is_refused(tmp_path):
    run(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(HoexpError, match="already holds a run .* continue it with resume=auto"):
        run(tmp_path, "resume=false")
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing appended


@pytest.mark.parametrize(
    "change,named",
    [
        (["model.width=16"], "model.width (8 → 16)"),
        (["method=cg"], "method.name ('neumann' → 'cg')"),
        (["seed=3"], "seed (0 → 3)"),
        (["inner_steps=4"], "inner_steps (3 → 4)"),
        (["hp.weight_decay.granularity=per_layer"], "hp.weight_decay.granularity ('per_weight' → 'per_layer')"),
        (["optim/inner=adam"], "optim.inner.name ('nesterov' → 'adam')"),  # was a KeyError
        (["hp=dropout"], "hp.dropout.name (None → 'dropout')"),  # was a KeyError
    ],
)
def test_resume_refuses_a_changed_configuration_naming_the_keys(tmp_path, change, named):
    with pytest.raises(Preempted):
        run(tmp_path, "outer_steps=5", loggers=[StopAt(2)])
    ckpt = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(HoexpError) as e:
        run(tmp_path, "outer_steps=5", "resume=true", *change)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"cannot resume {tmp_path}: the configuration differs")
    assert named in message and "outer_steps" in message.split("only ")[1]
    assert (tmp_path / "checkpoint.pt").read_bytes() == ckpt


def test_resume_restores_hydra_files_and_records_an_extension(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("outer_steps: 3\n")
    first = run(tmp_path)
    assert first["status"] == "completed" and "resumes" not in first
    (tmp_path / ".hydra" / "config.yaml").write_text("outer_steps: 5\n")  # what Hydra writes for the new command
    again = run(tmp_path, "resume=auto", "outer_steps=5", "progress=true")
    assert (tmp_path / ".hydra" / "config.yaml").read_text() == "outer_steps: 3\n"  # the original, as first written
    assert again["status"] == "completed" and again["final"]["step"] == 5 and again["hypergradients"] == 5
    assert again["resumes"] == [{"step": 3, "changes": {"outer_steps": [3, 5], "progress": [False, True]}}]
    assert [ln["step"] for ln in lines(tmp_path)] == [0, 1, 2, 3, 4, 5]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["resumes"] == again["resumes"]


def test_resume_of_a_completed_run_with_fewer_steps_is_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(HoexpError, match="outer_steps=2: its checkpoint is at outer step 3"):
        run(tmp_path, "resume=true", "outer_steps=2")


def test_resume_auto_starts_over_where_no_checkpoint_was_written(tmp_path):
    """A run killed before its first checkpoint: resume=auto truncates what it logged and starts over."""
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, "checkpoint_every=0", "outer_steps=5", loggers=[StopAt(2, hard=True)])
    assert not (tmp_path / "checkpoint.pt").exists() and len(lines(tmp_path)) == 3
    events = list(tmp_path.glob("events.out.tfevents.*"))
    summary = run(tmp_path, "resume=auto", "outer_steps=5")
    assert summary["status"] == "completed"
    assert [ln["step"] for ln in lines(tmp_path)] == [0, 1, 2, 3, 4, 5]  # not 2 + 6 lines
    assert not any(e.exists() for e in events) and len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert run(tmp_path, "resume=auto", "outer_steps=5") == json.loads((tmp_path / "summary.json").read_text())


def test_resume_true_without_checkpoint_names_resume_auto(tmp_path):
    with pytest.raises(HoexpError, match="no checkpoint.pt in .* or use resume=auto to start it over"):
        run(tmp_path, "resume=true")


def test_a_foreign_pt_file_as_checkpoint_is_one_line(tmp_path):
    rundir.mark(tmp_path, created=False)  # a run's folder whose checkpoint.pt was replaced (elsewhere: not its own)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "checkpoint.pt")
    with pytest.raises(HoexpError, match="checkpoint.pt is not a hoexp checkpoint .no elapsed_s, evals, "):
        run(tmp_path, "resume=true")


def test_resume_accepts_auto_true_false_only():
    for v in ("auto", "true", "false", "True"):
        assert compose_spec([f"resume={v}"])[0].run.resume == v.lower()
    with pytest.raises(ConfigError, match="resume='maybe' is not valid; choose one of: auto, false, true"):
        compose_spec(["resume=maybe"])


# ------------------------------------------------------------------------------------------ signals
class StopAt:
    """A logger that ends the run when outer step ``step`` is logged (before its checkpoint): SIGTERM, or
    with ``hard=True`` a failure that saves no checkpoint (as ``kill -9`` with ``checkpoint_every=0``)."""

    def __init__(self, step, hard=False):
        self.step, self.hard = step, hard

    def log_scalars(self, step, values):
        if step == self.step:
            if self.hard:
                raise RuntimeError("killed")
            os.kill(os.getpid(), signal.SIGTERM)

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_sigterm_during_step_0_evaluation_does_not_claim_a_checkpoint(tmp_path, monkeypatch):
    from hoexp.engine import evaluate as runner

    real = runner.evaluate

    def evaluate_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", evaluate_then_sigterm)
    with pytest.raises(Preempted) as e:
        run(tmp_path)
    assert "everything is saved" not in str(e.value) and "before its first checkpoint" in str(e.value)
    assert f"resume=auto hydra.run.dir={tmp_path}" in str(e.value) and e.value.exit_code == 128 + signal.SIGTERM
    assert not (tmp_path / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "interrupted"


def test_sigterm_after_a_snapshot_saves_and_says_so(tmp_path):
    with pytest.raises(Preempted, match="after outer step 1; everything is saved; resume with"):
        run(tmp_path, loggers=[StopAt(2)])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
