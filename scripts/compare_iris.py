"""HO on the reference Iris problem (17,280 per-weight decays) against a fixed baseline, a grid,
random search and TPE over one global weight decay, at an equal wall-clock budget: a thin call of

    hoexp compare experiment=iris_per_weight_decay --methods neumann,cg [ARGS...]

Every argument is passed on (overrides and options, which come after these defaults and so win):

    python scripts/compare_iris.py                                         # seed 0, budget = 1 HO run
    python scripts/compare_iris.py --seeds 0,1,2 --budget-factor 5         # 5 HO runs' worth per search
    python scripts/compare_iris.py outer_steps=20 inner_steps=50 --search-lr --workers 2
    python scripts/compare_iris.py --help                                  # every option of hoexp compare
"""

from __future__ import annotations

import sys


def main() -> None:
    from rich.console import Console

    from hoexp.tools.compare import parse_args, run_compare

    args = sys.argv[1:]
    defaults = []
    if not any(a.startswith("experiment=") for a in args):
        defaults.append("experiment=iris_per_weight_decay")
    if not any(a == "--methods" or a.startswith("--methods=") for a in args):
        defaults += ["--methods", "neumann,cg"]  # the caller's --methods replaces ours
    plan = parse_args([*defaults, *args])  # every check before anything runs
    console = Console()
    run_compare(plan, console=console if console.is_terminal else Console(width=240))


if __name__ == "__main__":
    from hoexp.errors import run_main

    run_main(main)
