"""Reliability of `hoexp run` (issue 28): a run writes only into a folder it owns and removes only what it
wrote; inputs that ran nothing or crashed are refused in one line; a signal at any time is one line with the
shell's exit code and advice that works (each piece of advice printed on a stop is run here); a full disk in
TensorBoard's thread or in `report`, a missing summary.json, a failed data load, compile's known warnings."""

import errno
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from hoexp.cli import compose_spec, main
from hoexp.config.run import Run
from hoexp.engine import rundir
from hoexp.errors import ConfigError, HoexpError, Stopped, raise_if_stopped, signals_deferred, stop_on_signals
from hoexp.tools.search import TrialContext
from tests import stopping

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.width=8", "model.depth=1", "progress=false", "checkpoint_every=1"]
TINY = [*BASE, "outer_steps=3", "inner_steps=3"]


def env():
    return {
        **{k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE")},
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }


def hoexp(*args, cwd=ROOT, slow_steps=None):
    """``python -m hoexp *args``; with ``slow_steps`` (a folder for its site code), each outer step takes 0.5 s
    more, so that a test's signal always finds the run still going."""
    environ = env() if slow_steps is None else stopping.slow_steps(env(), slow_steps)
    return subprocess.Popen(
        [sys.executable, "-m", "hoexp", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )


def run(folder, *overrides, **kwargs):
    spec, text = compose_spec([*TINY, *overrides])
    return Run(spec, folder, config_text=text, console=Console(file=io.StringIO()), **kwargs).execute()


def one_line(capsys, code, e, ran=False):
    """The one error line a command ended with (``ran``: after a run's own lines, which start with 'hoexp: ')."""
    assert e.value.code == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert (ran or len(lines) == 1) and all(ln.startswith("hoexp: ") for ln in lines), err
    assert lines[-1].startswith("hoexp: error: ") and err.count("hoexp: error:") == 1, err
    return lines[-1]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ------------------------------------------------------------------- item 1: only a folder it owns
def _users_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    (folder / "summary.json").write_text('{"mine": 1}\n')
    (folder / "events.out.tfevents.mine").write_text("x")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("my: own\n")
    return snapshot(folder)


@pytest.mark.parametrize("where", ["named", "current"])
def test_a_folder_with_the_users_files_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, where):
    """Was: 'removed 3 files an earlier start logged' and .hydra/config.yaml overwritten (exit 0)."""
    folder = tmp_path / "mine"
    before = _users_folder(folder)
    if where == "current":
        monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as e:
        main(["run", *TINY, f"hydra.run.dir={folder if where == 'named' else '.'}"])
    err = one_line(capsys, 2, e)
    assert f"{folder} holds files hoexp did not write" in err and "choose another with hydra.run.dir=<path>" in err
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(
        [".hydra", "metrics.jsonl", "summary.json", "events.out.tfevents.mine"]
    )


def test_a_sweep_folder_with_the_users_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["run", "-m", "seed=0,1", *TINY, f"hydra.sweep.dir={tmp_path}"])
    assert "choose another with hydra.sweep.dir=<path>" in one_line(capsys, 2, e)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_run_made_in_python_refuses_a_foreign_folder_too(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not mine to delete")
    with pytest.raises(HoexpError, match="holds files hoexp did not write .checkpoint.pt."):
        run(tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"not mine to delete"


def test_starting_over_removes_only_the_files_the_run_wrote(tmp_path):
    """A start without checkpoint (killed before it), then files dropped into the run's folder: a start over
    removes the run's metrics and event file, not the dropped ones (was: every events.out.tfevents.*)."""

    class Killed:
        def log_scalars(self, step, values):
            if step == 2:
                raise RuntimeError("killed")

        def __getattr__(self, name):
            return lambda *a, **k: None

    with pytest.raises(RuntimeError):
        run(tmp_path, "checkpoint_every=0", loggers=[Killed()])  # later overrides of a key win
    (own,) = tmp_path.glob("events.out.tfevents.*")
    (tmp_path / "events.out.tfevents.copied_here").write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    summary = run(tmp_path, "resume=auto")
    assert summary["status"] == "completed" and not own.exists()
    assert (tmp_path / "events.out.tfevents.copied_here").read_text() == "x" and (tmp_path / "notes.txt").exists()
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_a_run_folder_from_before_the_marker_still_resumes(tmp_path):
    """A folder an earlier hoexp wrote (no marker; its checkpoint.pt is a hoexp checkpoint) is still its own."""
    first = run(tmp_path)
    (tmp_path / rundir.MARKER).unlink()
    again = run(tmp_path, "outer_steps=4", "resume=true")
    assert again["status"] == "completed" and again["final"]["step"] == 4 and first["final"]["step"] == 3
    assert rundir.marker(tmp_path) is not None


# ------------------------------------------------------------------- item 2: inputs that ran nothing or crashed
def test_inner_steps_0_is_refused():
    """Was: a run that trained nothing, exit 0 (only fuse_step refused it, at run time)."""
    with pytest.raises(ConfigError, match=r"^inner_steps must be >= 1 \(the training steps between hypergradients\)"):
        compose_spec(["inner_steps=0"])


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_run_folder_that_cannot_be_created_is_one_line(capsys):
    """Was: Hydra's FileNotFoundError traceback, exit 1."""
    with pytest.raises(SystemExit) as e:
        main(["run", *TINY, "hydra.run.dir=/proc/hoexp-no/run"])
    err = one_line(capsys, 2, e)
    assert "cannot create the output folder /proc/hoexp-no/run" in err and "hydra.run.dir=<path>" in err


# ------------------------------------------------------------------- item 3: hydra.* where no Hydra job runs
def test_check_refuses_hydra_overrides_naming_out(capsys, tmp_path):
    """Was: accepted and ignored (the check went to outputs/check/<time>)."""
    with pytest.raises(SystemExit) as e:
        main(["check", *TINY, f"hydra.run.dir={tmp_path}/c"])
    assert "does not take 'hydra.run.dir=" in (err := one_line(capsys, 2, e)) and "--out <folder>" in err
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------- item 4: signals
def test_a_swallowed_signal_is_raised_again():
    """torch's C code swallows every exception of an import it makes: the stop is raised where hoexp looks next."""
    with stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except BaseException:  # noqa: BLE001 - what torch's import of numpy does
            pass
        with pytest.raises(Stopped) as e:
            raise_if_stopped()
    assert e.value.exit_code == 128 + signal.SIGTERM and str(e.value) == "stopped by SIGTERM"
    assert isinstance(e.value, KeyboardInterrupt) and not isinstance(e.value, Exception)


def test_a_signal_in_a_deferred_block_reaches_the_handler_once_the_block_is_done():
    written = []
    with stop_on_signals():
        with pytest.raises(Stopped) as e, signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler would have run by now
            written.append("whole")
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # the handler in place before is back
    assert written == ["whole"] and e.value.exit_code == 128 + signal.SIGTERM


def test_a_deferred_signal_with_no_handler_ends_the_process_after_the_block():
    code = "import os, signal, time\nfrom hoexp.errors import signals_deferred\nwith signals_deferred():\n"
    code += "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); print('whole', flush=True)\nprint('after')\n"
    p = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGTERM and p.stdout == "whole\n", p.stderr


def test_a_stop_while_a_trial_reports_to_optuna_comes_after_the_journal_writes():
    """Was (a search worker's parent killed with kill -9, under load): the SIGTERM raised the run's stop inside
    Optuna's journal file lock; the lock's clean-up failed (FileNotFoundError on its .rename file), and the
    trial ended FAIL instead of staying running for the continued search to resume."""

    class Journal:  # stands for Optuna's trial: its writes go through a file lock
        def __init__(self):
            self.writes = []

        def report(self, value, step):
            os.kill(os.getpid(), signal.SIGTERM)  # the parent-death signal, mid-write
            time.sleep(0.2)
            self.writes.append(("report", step))

        def set_user_attr(self, key, value):
            self.writes.append(key)

        def should_prune(self):
            return False

    journal = Journal()
    with stop_on_signals(), pytest.raises(Stopped):
        TrialContext(0, {}, journal, start=time.time()).report(3, 0.5)
    assert journal.writes == [("report", 3), "last_s"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("after", [0.4, 1.5])
def test_a_signal_at_start_up_is_one_line_with_its_exit_code(tmp_path, sig, after):
    """Was: a KeyboardInterrupt traceback (SIGINT), nothing at all (SIGTERM); no half-made folder is left."""
    p = hoexp("run", *BASE, "outer_steps=100", "inner_steps=100", f"hydra.run.dir={tmp_path / 'run'}")
    time.sleep(after)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("hoexp: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"hoexp: error: stopped by {signal.Signals(sig).name}"), err
    if "while starting" in lines[0]:
        assert "start it again with the same command" in lines[0] and not (tmp_path / "run").exists()


# ------------------------------------------------------------------- items 4 and 6: advice that works
def _advice(line, marker="resume with: "):
    """The command a line tells to run (up to ' (' or the end), as arguments for python -m hoexp."""
    text = line.split(marker, 1)[1]
    text = text.split(" (each job")[0].split(" (the whole sweep")[0]
    args = shlex.split(text)
    assert args[:2] == ["hoexp", "run"], text
    return args[1:]


def _wait_for(path, text, p, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never showed {text!r}")


def _steps(folder):
    return [json.loads(ln)["step"] for ln in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_advice_after_a_stopped_run_resumes_it(tmp_path):
    """SIGINT mid-run: exit 130, 'stopped by SIGINT after outer step N; everything is saved; resume with:
    <command>'; that command continues the run from step N (was: exit 1 / 'at outer step N; checkpoint saved')."""
    folder = tmp_path / "run"
    p = hoexp("run", *BASE, "outer_steps=20", "inner_steps=30", f"hydra.run.dir={folder}", slow_steps=tmp_path / "site")
    _wait_for(folder / "metrics.jsonl", '"step": 1,', p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert p.returncode == 130 and "Traceback" not in err, err
    m = re.match(r"hoexp: error: stopped by SIGINT after outer step (\d+); everything is saved; resume with: ", last)
    assert m, last
    r = subprocess.run(
        [sys.executable, "-m", "hoexp", *_advice(last)], cwd=tmp_path, capture_output=True, text=True, env=env()
    )
    assert r.returncode == 0 and f"resumed after outer step {m.group(1)}" in r.stderr, r.stderr
    assert _steps(folder) == list(range(21))
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"


def _sweep(folder, *extra):
    return ["run", "-m", "seed=0,1,2", *BASE, "outer_steps=20", "inner_steps=30", *extra, f"hydra.sweep.dir={folder}"]


@pytest.mark.slow
def test_the_advice_after_a_stopped_parallel_sweep_resumes_each_job(tmp_path):
    """SIGTERM to a parallel sweep: each stopped job's advice resumes that job in its folder (was: a whole new
    sweep from scratch, exit 0), and the sweep's advice finishes the rest, resuming, not restarting."""
    sweep = tmp_path / "sweep"
    p = hoexp(
        *_sweep(sweep, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"), cwd=tmp_path, slow_steps=tmp_path / "site"
    )
    for job in ("0_neumann", "1_neumann"):
        _wait_for(sweep / job / "metrics.jsonl", '"step": 1,', p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=200)
    assert p.returncode == 143 and "Traceback" not in err, err
    job_lines = [ln for ln in err.splitlines() if re.match(r"hoexp: job #\d interrupted: ", ln)]
    assert len(job_lines) == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hoexp: error: stopped by SIGTERM: 3 of 3 jobs did not finish") and "#2 not started" in last
    for line in job_lines:  # each job's own advice: that job resumes alone, in its folder
        num = line.split("#")[1].split()[0]
        r = subprocess.run(
            [sys.executable, "-m", "hoexp", *_advice(line)], cwd=tmp_path, capture_output=True, text=True, env=env()
        )
        assert r.returncode == 0 and "resumed after outer step" in r.stderr, r.stderr
        assert f"→ {sweep / f'{num}_neumann'} (resumed" in r.stderr
        assert _steps(sweep / f"{num}_neumann") == list(range(21))
    r = subprocess.run(
        [sys.executable, "-m", "hoexp", *_advice(last, "finish them with: ")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env(),
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == [
        "0_neumann",
        "1_neumann",
        "2_neumann",
    ]
    assert "already completed" in (sweep / "0_neumann" / "job.log").read_text()
    assert all(
        json.loads((sweep / f"{n}_neumann" / "summary.json").read_text())["status"] == "completed" for n in "012"
    )
    assert len(list(tmp_path.glob("outputs/multirun/*/*"))) == 0  # no new sweep folder


@pytest.mark.slow
def test_the_advice_after_a_stopped_in_process_sweep_finishes_it(tmp_path):
    """The basic launcher stops the whole sweep with the job: its line names the sweep's command (which
    finishes every job) and the job's own; both resume."""
    sweep = tmp_path / "sweep"
    p = hoexp(*_sweep(sweep), cwd=tmp_path, slow_steps=tmp_path / "site")
    _wait_for(sweep / "0_neumann" / "metrics.jsonl", '"step": 1,', p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=200)
    last = err.strip().splitlines()[-1]
    assert p.returncode == 143 and "everything is saved; resume with: hoexp run -m " in last, err
    alone = _advice(last, "this job alone: ")
    alone[-1] = alone[-1].rstrip(")")
    r = subprocess.run([sys.executable, "-m", "hoexp", *alone], cwd=tmp_path, capture_output=True, text=True, env=env())
    assert r.returncode == 0 and f"→ {sweep / '0_neumann'} (resumed after outer step" in r.stderr, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "hoexp", *_advice(last)], cwd=tmp_path, capture_output=True, text=True, env=env()
    )
    assert r.returncode == 0 and "already completed" in r.stderr, r.stderr
    assert all(_steps(sweep / f"{n}_neumann") == list(range(21)) for n in "012")


# ------------------------------------------------------------------- item 7: one line, not a traceback
def test_an_unknown_launcher_is_one_line_listing_the_launchers(capsys, tmp_path):
    """Was: a 63-line MissingConfigException traceback."""
    with pytest.raises(SystemExit) as e:
        main(["run", "-m", "hydra/launcher=nonexistent", "seed=0,1", f"hydra.sweep.dir={tmp_path}"])
    err = one_line(capsys, 2, e)
    assert "unknown hydra/launcher 'nonexistent'; choose one of: " in err and "parallel" in err and "basic" in err


def test_a_full_disk_in_tensorboards_thread_is_one_line_and_keeps_the_run(tmp_path, monkeypatch, capsys):
    """Was: 'Exception in thread' with a traceback from TensorBoard's writer thread, then the run's error."""
    from tensorboard.summary.writer import record_writer

    real, calls = record_writer.RecordWriter.write, [0]

    def write(self, data):
        calls[0] += 1
        if calls[0] > 40:  # the disk fills up mid-run
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    from_threads = []  # what the thread would print as 'Exception in thread ...' and its traceback
    monkeypatch.setattr(threading, "excepthook", lambda args: from_threads.append(args.exc_value))
    with pytest.raises(SystemExit) as e:
        main(["run", *BASE, "outer_steps=20", "inner_steps=3", f"hydra.run.dir={tmp_path}"])
    err = one_line(capsys, 2, e, ran=True)
    assert from_threads == [] and "No space left on device" in err and "events.out.tfevents" in err
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    assert (tmp_path / "checkpoint.pt").exists() and _steps(tmp_path)[0] == 0


def test_a_full_disk_while_report_writes_is_one_line(tmp_path, monkeypatch, capsys):
    """Was: a matplotlib OSError traceback; the half-written PNG is removed, the runs are untouched."""
    from matplotlib.figure import Figure

    from tests.test_report import make_run

    make_run(tmp_path / "runs" / "a")
    before = snapshot(tmp_path / "runs")

    def savefig(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    err = one_line(capsys, 2, e)
    assert "report: cannot write " in err and ".png (No space left on device)" in err and "--out <folder>" in err
    assert not list((tmp_path / "rep").glob("*.png")) and snapshot(tmp_path / "runs") == before


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_finished_run_without_a_readable_summary_is_summarized_again(tmp_path, capsys, damage):
    """Was: a FileNotFoundError / JSONDecodeError traceback (exit 1) on 'already completed'."""
    main(["run", *TINY, f"hydra.run.dir={tmp_path}"])
    original = json.loads((tmp_path / "summary.json").read_text())
    if damage == "missing":
        (tmp_path / "summary.json").unlink()
    else:
        (tmp_path / "summary.json").write_text('{"final": ')
    capsys.readouterr()
    main(["run", *TINY, f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert "already completed" in err and "written again from checkpoint.pt" in err and "Traceback" not in err
    again = json.loads((tmp_path / "summary.json").read_text())
    assert {k: v for k, v in again.items() if k != "wall_time_s"} == {
        k: v for k, v in original.items() if k != "wall_time_s"
    }


# ------------------------------------------------------------------- item 9: smaller ones
def test_make_run_passes_the_data_folder():
    """`make run ARGS=experiment=mnist_*` found no data (only test and bench passed HOEXP_DATA)."""
    text = (ROOT / "Makefile").read_text()
    recipe = text.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "HOEXP_DATA=$(HOEXP_DATA) $(VENV)/bin/hoexp run $(ARGS)" in recipe, recipe


def test_a_data_loading_failure_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOEXP_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as e:
        main(["run", "experiment=mnist_per_weight_decay", "outer_steps=1", "inner_steps=1", "progress=false"])
    assert "MNIST not found" in one_line(capsys, 2, e)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()] and not list(tmp_path.rglob("*_neumann"))
    mine = tmp_path / "mine"  # a folder the user made stays, empty as it was
    mine.mkdir()
    with pytest.raises(SystemExit):
        main(["run", "experiment=mnist_per_weight_decay", "outer_steps=1", "inner_steps=1", f"hydra.run.dir={mine}"])
    assert mine.is_dir() and not list(mine.iterdir())


@pytest.mark.skipif(__import__("shutil").which("srun") is not None, reason="this machine has SLURM")
def test_the_slurm_refusal_names_the_chosen_launcher(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["run", "-m", "hydra/launcher=slurm_ddp", "seed=0,1", f"hydra.sweep.dir={tmp_path}"])
    assert one_line(capsys, 2, e).startswith("hoexp: error: hydra/launcher=slurm_ddp needs a SLURM cluster")


def test_compiles_known_warnings_are_dropped_and_others_kept(capsys):
    import logging
    import warnings

    from hoexp.method.compiling import quiet_compile

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_compile():
            warnings.warn(
                "Dynamo detected a call to a `functools.lru_cache`-wrapped function at 'fnmatch.py:70'. Dynamo ...",
                UserWarning,
                stacklevel=1,
            )
            warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a real problem"]
    log = logging.getLogger("torch.utils.cpp_extension")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        with quiet_compile():
            log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
            log.warning("something else")
        log.warning("No CUDA runtime is found, outside")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else", "No CUDA runtime is found, outside"]


@pytest.mark.slow
@pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("c++", "g++")), reason="needs a C++ compiler")
def test_compile_true_prints_only_hoexps_lines(tmp_path):
    """Was: ~12 lines of Dynamo and cpp_extension warnings."""
    p = hoexp("run", *BASE, "outer_steps=1", "inner_steps=3", "compile=true", f"hydra.run.dir={tmp_path}")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert [ln.split(":")[0] for ln in err.strip().splitlines()] == ["hoexp", "hoexp"], err


@pytest.mark.slow
def test_a_killed_torchrun_rank_is_reported_as_such_not_as_sigterm(tmp_path):
    """kill -9 of rank 1: torchrun then sends SIGTERM to rank 0, which said 'stopped by SIGTERM'; it names the
    dead rank (exit 1, a failure) and how to resume."""
    folder = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hoexp", "run"]
        + [*BASE, "outer_steps=40", "inner_steps=100", f"hydra.run.dir={folder}"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for(folder / "metrics.jsonl", '"step": 2,', p, timeout=300)
    ranks = {}
    for child in (c for t in Path(f"/proc/{p.pid}/task").iterdir() for c in (t / "children").read_text().split()):
        variables = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        ranks[next(int(v[5:]) for v in variables if v.startswith(b"RANK="))] = int(child)
    os.kill(ranks[1], signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.startswith("hoexp: error:")]
    assert len(lines) == 1 and "SIGTERM" not in lines[0], err
    assert lines[0].startswith(f"hoexp: error: rank 1 of 2 (pid {ranks[1]}) died without a message"), lines[0]
    assert f"resume=true hydra.run.dir={folder}" in lines[0]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed" and "rank 1 of 2" in summary["error"]
