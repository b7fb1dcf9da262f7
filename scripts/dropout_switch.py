"""When does dropout help? Fixed-rate runs of a preset that switch the rate part-way through.

Trains the preset (default ``experiment=mnist_dropout_gaussian``, one rate per layer, ``method=none``) at rate
``--from`` for the first ``k`` outer steps and at ``--to`` afterwards, for every ``k`` of ``--at``
(``never``: ``--from`` throughout), all on the same batches and dropout noise. Prints the validation
loss every ``--every`` outer steps and the final test loss. With ``--branch S``: trains at ``--from``
up to outer step ``S``, then continues from that one state at each rate of ``--rates``, printing the
validation loss after 1, 2, 3, 5, 10 and 20 more outer steps (how long a change of rate takes to pay).

    HOEXP_DATA=../shared/data python scripts/dropout_switch.py [--at 0,10,40,60,never] [overrides ...]
    HOEXP_DATA=../shared/data python scripts/dropout_switch.py --branch 40 --rates 0.05,0.07,0.1,0.2,0.5
    HOEXP_DATA=../shared/data python scripts/dropout_switch.py --experiment ptb_lstm_dropout_gaussian --to 0.65 --at 20,40
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

from hoexp.cli import compose_spec
from hoexp.config.build import build
from hoexp.engine.state import start
from hoexp.errors import ConfigError, run_main
from hoexp.method.base import train_inner


def _setup(overrides: list[str]):
    spec, _ = compose_spec(["method=none", *overrides])
    exp = build(spec)
    st = start(exp)
    return spec, exp, st.inner, st.raw


def _at_rate(raw: dict[str, torch.Tensor], p: float) -> dict[str, torch.Tensor]:
    logit = math.log(p) - math.log1p(-p)
    return {k: torch.full_like(v, logit) for k, v in raw.items()}  # every site (and no offsets: per_layer)


def _val(exp, params) -> float:
    return float(exp.problem.evaluate(params, exp.data.val)[0])


def switch(overrides: list[str], p_from: float, p_to: float, at: list[int | None], every: int) -> None:
    for k in at:
        spec, exp, state, raw = _setup(overrides)
        batches = exp.problem.train_stream(spec.run.seed)
        curve = []
        for step in range(spec.run.outer_steps):
            p = p_from if k is None or step < k else p_to
            state, _, _ = train_inner(
                exp.problem, exp.inner_opt, state, _at_rate(raw, p), batches, spec.run.inner_steps
            )
            if (step + 1) % every == 0:
                curve.append(_val(exp, state.params))
        test = float(exp.problem.evaluate(state.params, exp.data.test)[0])
        label = "never" if k is None else f"at {k}"
        print(
            f"{p_from} → {p_to} {label:>8}: val every {every} outer steps "
            f"{' '.join(f'{c:.3f}' for c in curve)}; test {test:.3f}",
            flush=True,
        )


def branch(overrides: list[str], p_from: float, at: int, rates: list[float]) -> None:
    spec, exp, state, raw = _setup(overrides)
    batches = exp.problem.train_stream(spec.run.seed)
    for _ in range(at):
        state, _, _ = train_inner(
            exp.problem, exp.inner_opt, state, _at_rate(raw, p_from), batches, spec.run.inner_steps
        )
    saved = copy.deepcopy(batches.state_dict())
    for p in rates:
        stream = exp.problem.train_stream(spec.run.seed)
        stream.load_state_dict(copy.deepcopy(saved))
        st, out = state, []
        for k in range(1, 21):
            st, _, _ = train_inner(exp.problem, exp.inner_opt, st, _at_rate(raw, p), stream, spec.run.inner_steps)
            if k in (1, 2, 3, 5, 10, 20):
                out.append(f"{_val(exp, st.params):.3f}")
        print(f"from outer step {at} at p = {p}: val after 1, 2, 3, 5, 10, 20 outer steps: {' '.join(out)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="p_from", type=float, default=0.05)
    ap.add_argument("--to", dest="p_to", type=float, default=0.5)
    ap.add_argument("--at", default="0,10,40,60,never", help="outer steps at which to switch (or 'never')")
    ap.add_argument("--every", type=int, default=20, help="print the validation loss every N outer steps")
    ap.add_argument("--branch", type=int, default=None, help="branch at this outer step instead")
    ap.add_argument("--rates", default="0.05,0.07,0.1,0.2,0.3,0.5", help="--branch: rates to continue at")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--experiment", default="mnist_dropout_gaussian", help="the preset (e.g. ptb_lstm_dropout_gaussian)"
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides")
    ns = ap.parse_args()
    ns.overrides = [f"experiment={ns.experiment}", *ns.overrides]
    torch.set_num_threads(ns.threads)
    try:
        at = [None if a.strip() == "never" else int(a) for a in ns.at.split(",")]
        rates = [float(r) for r in ns.rates.split(",")]
    except ValueError:
        raise ConfigError("--at takes outer steps or 'never', --rates rates, comma-separated") from None
    if ns.branch is None:
        switch(ns.overrides, ns.p_from, ns.p_to, at, ns.every)
    else:
        branch(ns.overrides, ns.p_from, ns.branch, rates)


if __name__ == "__main__":
    run_main(main, "dropout_switch.py")
