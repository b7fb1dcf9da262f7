"""User-facing errors: one line that names the problem and the fix; the CLI prints it and exits 2."""

from __future__ import annotations

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


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal (SIGTERM, SIGINT): the command ends with one line and ``exit_code``
    (128 + the signal's number, the shell's convention). Raised where no run has its own handler (start-up:
    imports, composing, loading data). Not an ``Exception``, like KeyboardInterrupt: code that catches
    ``Exception`` (a library's optional import) must not swallow it."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code

    @property
    def signum(self) -> int:
        return self.exit_code - 128

    @classmethod
    def by_signal(cls, signum: int) -> Stopped:
        import signal

        return cls(f"stopped by {signal.Signals(signum).name}", 128 + signum)


class stop_on_signals:
    """While active (in the main thread), SIGTERM and SIGINT raise :class:`Stopped` instead of killing the
    process silently (SIGTERM) or raising a bare KeyboardInterrupt; a signal the process was started to
    ignore stays ignored. A run replaces these with its own (it saves a checkpoint), then puts them back.

    ``received``: the first signal seen. Some code swallows every exception (torch's C extension importing
    numpy does): :func:`raise_if_stopped` raises the stop again where hoexp next looks.
    """

    def __enter__(self) -> stop_on_signals:
        import signal
        import threading

        self.previous: dict = {}
        self.received = 0
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                    self.previous[sig] = signal.signal(sig, self._raise)
        return self

    def _raise(self, signum, frame):
        self.received = self.received or signum
        raise Stopped.by_signal(signum)

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self.previous.items():
            if signal.getsignal(sig) == self._raise:  # not where code inside chose its own (a done job ignores them)
                signal.signal(sig, handler)


class signals_deferred:
    """SIGTERM and SIGINT held back for the length of a block (in the main thread; elsewhere it does nothing): a
    signal that arrives is only noted, and when the block ends the handler that was in place gets it (a run's
    stop is raised there; the default ends the process). For writes that a stop must not cut in half, such as
    an Optuna journal append under its file lock (a stop inside it left the lock half-taken and the trial
    ``FAIL`` where it should have stayed running, to be resumed)."""

    def __enter__(self) -> signals_deferred:
        import signal
        import threading

        self.previous: dict = {}
        self.received: list[int] = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                # One the process ignores stays ignored; one whose handler is not Python's (None) could not be
                # put back by signal.signal, so it is left as it is.
                if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                    self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.received.append(signum)

    def __exit__(self, *exc: object) -> None:
        import os
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if not self.received:
            return
        signum = self.received[0]
        handler = self.previous[signum]
        if callable(handler):
            handler(signum, None)  # e.g. a run's stop: raised here, after the block
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # what the signal would have done, now that the write is whole


def received_stop(handlers=None) -> int:
    """The signal a :class:`stop_on_signals` handler (the current one, or one of ``handlers``) has seen; 0: none."""
    import signal

    for handler in handlers if handlers is not None else (signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)):
        owner = getattr(handler, "__self__", None)
        if isinstance(owner, stop_on_signals) and owner.received:
            return owner.received
    return 0


def raise_if_stopped() -> None:
    """Raise :class:`Stopped` for a signal whose exception some code swallowed (see :class:`stop_on_signals`)."""
    signum = received_stop()
    if signum:
        raise Stopped.by_signal(signum)


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
