"""``hoexp compare``: HO methods against black-box baselines at an equal wall-clock budget, one command.

For each seed (the seed sets the data split and the initialization, shared by every contender):

1. **HO**: one run per HO contender (``--methods neumann,cg``, ``--ho 'neumann:method.terms=20'``).
2. **Baseline**: ``method=none`` at the initial hyperparameters (the *fixed* row).
3. **Grid**: ``method=none`` at each value of ``--grid`` for ``--grid-key`` (default: the family's
   ``hp.<family>.init``). With ``method=none`` every hyperparameter of the family stays at that one
   value, so this is a grid over the family's global value. Each point is a row; the *grid search*
   row is the point with the lowest validation loss (``--objective``), per seed.
4. **Random search and TPE** (``--search``) over ``--space`` (default: the grid's range; ``--search-lr``
   adds the inner lr), Optuna ask/tell (:mod:`hoexp.tools.search`) with a wall-clock budget of
   ``--budget-s`` or ``--budget-factor`` × the slowest HO run of that seed; a MedianPruner stops
   hopeless trials from the validation losses each run logs; ``--workers`` local processes.

The searches and the grid choose on validation loss only (``best``: the lowest validation loss a run
reached, i.e. with early stopping; ``final``: the one after the last step); test losses are only
reported. Every run is a normal hoexp run folder (summary.json, metrics.jsonl, TensorBoard events,
``.hydra/config.yaml``) under the compare folder; ``compare.json`` holds the raw numbers and
``report/`` the ``hoexp report`` of it all. The same command with the same ``--out`` continues an
interrupted compare.

Parts: :mod:`~hoexp.tools.compare.args` (the command line, validated), :mod:`~hoexp.tools.compare.trial` (one run,
the search's objective), :mod:`~hoexp.tools.compare.orchestration` (running and continuing it all),
:mod:`~hoexp.tools.compare.output` (compare.json).
"""

from hoexp.tools.compare.args import Plan, parse_args
from hoexp.tools.compare.orchestration import run_compare
from hoexp.tools.compare.output import match_time, pick_best
from hoexp.tools.compare.trial import format_value, objective_value

__all__ = ["Plan", "format_value", "match_time", "objective_value", "parse_args", "pick_best", "run_compare"]
