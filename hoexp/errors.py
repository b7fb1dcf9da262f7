"""User-facing errors: one line that names the problem and the fix; the CLI prints it and exits 2."""

import argparse


class HoexpError(Exception):
    """An error caused by the user's input or environment, not by a bug in hoexp."""

    exit_code = 2


class ConfigError(HoexpError):
    """An invalid configuration: unknown option or key, wrong type, out-of-range value,
    or an incompatible combination (method × family, dataset × model)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown option, a value of the wrong type) are one :class:`ConfigError` line
    naming the command (``hoexp check`` → ``check: ...``), exit 2, like every hoexp error."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog.removeprefix('hoexp ')}: {message}")


class StopRun(Exception):
    """Raised by one of a run's extra metric loggers to end the run early on purpose (e.g. a pruned
    search trial); the runner writes the summary with ``status`` = the exception's ``status`` and
    re-raises it. Not a :class:`HoexpError`: nothing went wrong."""

    status = "stopped"


def run_main(main, prog: str | None = None) -> None:
    """Run a script's ``main()`` the way the CLI runs a command: a :class:`HoexpError` (bad input,
    missing data, ...) ends with one line ``<prog>: error: ...`` and its exit code, Ctrl-C with one
    line and 130; ``HYDRA_FULL_ERROR=1`` shows the traceback instead."""
    import os
    import sys
    from pathlib import Path

    prog = prog or Path(sys.argv[0]).name
    try:
        main()
    except HoexpError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
