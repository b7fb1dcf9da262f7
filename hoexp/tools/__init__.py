"""The tools on top of the engine: check, horizon, compare, search, report."""
