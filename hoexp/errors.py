"""User-facing errors: one line that names the problem and the fix; the CLI prints it and exits 2."""


class HoexpError(Exception):
    """An error caused by the user's input or environment, not by a bug in hoexp."""

    exit_code = 2


class ConfigError(HoexpError):
    """An invalid configuration: unknown option or key, wrong type, out-of-range value,
    or an incompatible combination (method × family, dataset × model)."""
