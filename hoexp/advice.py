"""The commands hoexp tells its user to run after a stop (resume a run, finish a sweep): exact and pasteable.

Light on purpose (no torch, no Hydra at import): the command line imports it before its signal handling.

A command is ``hoexp run`` with the run's own overrides, where each ``key=value`` in ``settings``
replaces any earlier value of that key (``resume=true hydra.run.dir=<folder>``). Arguments are quoted
for a POSIX shell.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Sequence
from typing import Any

# What cli.cmd_run sets sys.argv[0] to before Hydra runs (sys.argv[1:] then holds the command's arguments,
# its folder included): a sweep's launcher, in that process, can repeat the exact command.
RUN_ARGV0 = "hoexp run"


def key(arg: str) -> str:
    """The key an override sets (``+seed=1`` → ``seed``); a flag is its own key."""
    return arg.lstrip("+~").partition("=")[0] if not arg.startswith("-") else arg


def command(args: Sequence[str], *settings: str, prefix: str = "hoexp run") -> str:
    """``prefix`` with ``args``, each of ``settings`` (``key=value``) replacing that key's override in them."""
    replaced = {key(s) for s in settings}
    kept = [a for a in args if key(a) not in replaced]
    return " ".join([prefix, *(shlex.quote(a) for a in [*kept, *settings])])


def command_line() -> list[str] | None:
    """The arguments of the ``hoexp run`` command running in this process (its folder included), or None
    where this process is not one (a sweep's worker, a script, a test)."""
    return list(sys.argv[1:]) if sys.argv and sys.argv[0] == RUN_ARGV0 else None


def resume_advice(multirun: bool) -> dict[str, Any]:
    """What a stopped run tells its user to run (:class:`hoexp.engine.io.RunIO`): ``hoexp run`` with this job's
    overrides (a sweep job's: its own values), under torchrun the same; and the sweep's command when this
    process runs the sweep (its later jobs wait for that one)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides
    search = [o for o in overrides.hydra if o.startswith("hydra.searchpath=")]  # --config-dir
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    return {
        "command": [*overrides.task, *search],
        "prefix": "torchrun <its options> -m hoexp run" if torchrun else "hoexp run",
        "sweep": command_line() if multirun else None,
    }


def stopped_outside_a_run(subcommand: str, signum: int) -> str:
    """The line for a signal that stopped ``hoexp <subcommand>`` where no run was stepping (a run's own handler
    says more)."""
    what = f"stopped by {signal.Signals(signum).name}"
    if subcommand != "run":
        return what
    sweep = command_line()
    if sweep is not None and ("-m" in sweep or "--multirun" in sweep):  # between jobs: the sweep goes on from here
        return (
            f"{what} while a job of the sweep was starting; the finished jobs are saved; finish the sweep with: "
            f"{command(sweep, 'resume=auto')}"
        )
    return f"{what} while starting, before any outer step: nothing to resume; start it again with the same command"
