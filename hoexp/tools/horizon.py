"""``hoexp check --horizon``: does a method's hypergradient point where the *final* model improves?

The user's objective is the validation loss at the end of training. Its derivative with respect to
the hyperparameters, applied from outer step ``s`` on, is the *long-horizon truth*

    g*_s = d/dλ  L_V( w_{N·T}(λ) ),   λ used for every training step after outer step s,

measured over the whole remaining run with common random numbers (the same minibatches and dropout
noise for every perturbed λ: the batch streams are restored from the checkpoint at ``s``), in two ways
(:mod:`hoexp.tools.horizon_truth`):

* central finite differences ``±ε e_i`` (always): the derivative of this one draw of the noise, which
  with hard (Bernoulli) masks is piecewise constant in λ and noisy;
* with ``smoothing`` (``--smooth σ``), the gradient of the Gaussian-smoothed objective
  ``E_ε L_V(w_{N·T}(λ + σε))`` (the objective ES methods estimate), from antithetic pairs of whole
  remaining runs, with its standard error per coordinate (plain, or with the central differences as a
  linear control variate, unbiased whatever they are: whichever estimate has the smaller error).

Each method's hypergradient at ``s`` (the one its outer step starting at ``s`` returns, from the
reference's weights at ``s``) is compared with both: cosine, the fraction of coordinates whose sign
agrees (against the smoothed truth also over the coordinates it resolves, ``|g*| > 2 SE``), and the
relative error. Hyperparameters stay at their initial values throughout (no outer updates), so every
method sees one trajectory. Methods that carry state across outer steps run from step 0 on the
reference's batches and report the estimate their outer step ``s`` returns, as a run would use it:
PES / NRES (``method=pes``) one draw of their particles' estimate, unbiased for the gradient of the
smoothed validation loss at the end of truncation ``s`` with λ perturbed since step 0 (their particles
persist from step 0: ``s + 1`` truncations to reach it); STN (``method=stn``) the gradient through its
best response fitted since step 0 (its weights train at perturbed λ, so they leave the reference's
trajectory, as in a run). A contender's overrides may change how it models the hyperparameters
(``hp.*``, e.g. ``t1t2:hp.dropout.relaxation=gaussian`` against a Bernoulli reference: it then runs
on its own problem, with the reference's weights, batches and noise, and the same hyperparameter layout).

Cost: ``2·H`` remaining runs per checkpoint for ``H`` hyperparameters (use global or per-layer
granularity), ``2·pairs`` more with smoothing, plus one run per stateful method (PES: ``particles + 1``
training runs to the last checkpoint). Output: a rich table, ``horizon.json``, ``horizon.png``.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from hoexp import tree
from hoexp.config import Spec
from hoexp.config.build import Prebuilt, build, build_method
from hoexp.config.compose import Job
from hoexp.engine.metrics import write_json_atomic
from hoexp.engine.state import RunState, start
from hoexp.engine.step import PLAIN, advance
from hoexp.errors import ConfigError
from hoexp.method.base import CarriesState, HyperMethod, InnerState
from hoexp.tools import horizon_report
from hoexp.tools.horizon_report import HorizonResult
from hoexp.tools.horizon_truth import (
    SMOOTH_SEED,
    SmoothedGradient,
    Smoothing,
    antithetic_differences,
    central_differences,
    resolved_sign,
    smoothed_estimate,
)

__all__ = [
    "Contender",
    "HorizonResult",
    "Smoothing",
    "agreement",
    "central_differences",
    "parse_contender",
    "reference_run",
    "run_horizon",
]

MAX_HPARAMS = 32
OWN_PROBLEM_KEYS = ("hp",)  # what a contender may change beside method.*: how it models the hyperparameters


def agreement(hg: Tensor, truth: Tensor) -> dict[str, float]:
    """Cosine, sign agreement (fraction of coordinates where both signs match) and ``‖hg − g*‖/‖g*‖``."""
    a, b = hg.reshape(-1).double(), truth.reshape(-1).double()
    na, nb = float(a.norm()), float(b.norm())
    return {
        "cosine": float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0,
        "sign": float((torch.sign(a) == torch.sign(b)).double().mean()) if b.numel() else float("nan"),
        "rel_error": float((a - b).norm()) / nb if nb > 0 else float("inf"),
    }


@dataclass
class Contender:
    """A method to diagnose: a label and the Hydra overrides that select it (e.g. ``method=cg``)."""

    label: str
    overrides: list[str]


def split_overrides(text: str) -> list[str]:
    """Overrides separated by spaces (``method.terms=20 method.alpha=0.05``), as ``hoexp compare --ho``
    takes them; a comma directly before ``key=`` also separates (the older form), one inside a value
    (``include=[a,b]``) does not."""
    return [o for o in re.split(r"\s+|,(?=[\w.@/+~-]+=)", text.strip()) if o]


def parse_contender(text: str) -> Contender:
    """``neumann`` or ``neumann:method.terms=20 method.alpha=0.05`` (a method name, then overrides)."""
    name, _, rest = text.partition(":")
    return Contender(text, [f"method={name.strip()}", *split_overrides(rest)])


DEFAULT_CONTENDERS = ("t1t2", "neumann", "cg", "truncated", "unrolled", "forward", "forward:method.carry=true")


@dataclass
class _Checkpoint:
    step: int
    state: InnerState | None  # weights only at the checkpoints the truth is measured from
    train_stream: dict
    val_stream: dict


@dataclass
class _Prepared:
    """A contender ready to run: its method and the experiment it runs on (the reference's, or its own when its
    overrides change how the hyperparameters are modelled)."""

    contender: Contender
    method: HyperMethod
    exp: Any


def run_horizon(
    spec: Spec,
    contenders: Sequence[tuple[Contender, Spec | Job]],
    out_dir: Path,
    *,
    at: Sequence[int] | None = None,
    eps: float = 0.05,
    console: Console | None = None,
    truth_from: Path | None = None,
    smoothing: Smoothing | None = None,
    prebuilt: Prebuilt | None = None,
) -> HorizonResult:
    """The long-horizon truths at the checkpoints ``at`` (outer steps) and every contender against them.
    A contender's configuration is its :class:`Spec`, or its checked :class:`Job` (whose checks' build is reused).

    ``truth_from``: a previous ``horizon.json`` whose truths are reused for the checkpoints it has, when
    it was measured on the same configuration (all but the method) and ``eps`` (the smoothed one also
    needs the same ``smoothing``); the rest is measured. ``smoothing``: also the smoothed truth. ``prebuilt``: what
    the checks of ``spec`` built (:func:`~hoexp.config.build.preflight`), not built again.
    """
    console = console or Console(stderr=True)
    at = _checkpoint_steps(at, spec.run.outer_steps)
    exp = build(spec, prebuilt=prebuilt)
    start_state = start(exp)  # the runner's start: weights, hyperparameters, streams
    raw = start_state.raw
    _check_size(spec, raw)
    prepared = _prepare_contenders(contenders, spec, exp, raw)  # every contender before any truth is computed
    known = horizon_report.known_truth(truth_from, spec, eps, smoothing)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints, state = reference_run(exp, start_state, at)
    base_final = float(exp.problem.evaluate(state.params, exp.data.val)[0])

    result = HorizonResult(at=list(at), eps=eps, truth={}, smoothing=smoothing)
    _measure_truths(result, exp, raw, checkpoints, known, console)
    for p in prepared:
        _run_contender(result, p, raw, checkpoints, console)

    write_json_atomic(out_dir / "horizon.json", horizon_report.to_json(result, spec, raw, base_final))
    horizon_report.table(result, console)
    if result.scores:
        horizon_report.plot(result, out_dir / "horizon.png")
    else:
        console.print("hoexp: no contender gave a hypergradient: no horizon.png", highlight=False)
    console.print(f"hoexp: horizon diagnostic written to {out_dir}", highlight=False, soft_wrap=True)
    return result


def _checkpoint_steps(at: Sequence[int] | None, outer_steps: int) -> list[int]:
    """``at`` sorted (default: 0, N/4, N/2, 3N/4), each an outer step in ``[0, outer_steps)``."""
    steps = sorted(set(at if at is not None else [0, outer_steps // 4, outer_steps // 2, 3 * outer_steps // 4]))
    if not steps or steps[0] < 0 or steps[-1] >= outer_steps:
        raise ConfigError(f"--at must list outer steps in [0, outer_steps={outer_steps}), got {steps}")
    return steps


def _check_size(spec: Spec, raw: dict[str, Tensor]) -> None:
    n_h = tree.numel(raw)
    if n_h > MAX_HPARAMS:
        raise ConfigError(
            f"the horizon diagnostic differentiates the whole remaining run per hyperparameter; "
            f"hp={spec.hp_name} has {n_h:,} here (limit {MAX_HPARAMS}): use a global or per_layer "
            "granularity"
        )


def final_loss(exp: Any, ck: _Checkpoint, raw: dict[str, Tensor]) -> Callable[[Tensor], float]:
    """``λ ↦ L_V(w_{N·T}(λ))`` (flat ``λ``, float64 loss on the whole validation split): the remaining run from
    checkpoint ``ck``, the engine's plain outer steps (a per-step schedule restarts at each), on the batches and
    noise it had there (restored for every call: common random numbers)."""
    state = ck.state
    assert state is not None  # a checkpoint in `at`

    def f(flat: Tensor) -> float:
        train, val = _streams(exp, ck)
        lam, st = tree.unflatten(flat, raw), state
        for _ in range(ck.step, exp.settings.outer_steps):
            st = advance(exp, PLAIN, st, lam, train, val).inner
        return float(exp.problem.evaluate(st.params, exp.data.val)[0].double())

    return f


def _measure_truths(
    result: HorizonResult,
    exp: Any,
    raw: dict[str, Tensor],
    checkpoints: dict[int, _Checkpoint],
    known: dict[str, dict[int, list[float]]],
    console: Console,
) -> None:
    """The ±ε truth and (with ``result.smoothing``) the smoothed one at every checkpoint, reusing ``known``."""
    x = tree.flatten(raw.values()).detach()
    sm = result.smoothing
    t0 = time.perf_counter()
    for s in result.at:
        f = final_loss(exp, checkpoints[s], raw)
        measured = s not in known["truth"] or (sm is not None and s not in known["smoothed"])
        result.truth[s] = known["truth"][s] if s in known["truth"] else central_differences(f, x, result.eps).tolist()
        msg = f"hoexp: truth at outer step {s}: {horizon_report.fmt(result.truth[s])}"
        if sm is not None and s in known["smoothed"]:
            result.smoothed[s], result.smoothed_stderr[s] = known["smoothed"][s], known["smoothed_stderr"][s]
        elif sm is not None:
            g = _smoothed_truth(f, x, sm, torch.tensor(result.truth[s], dtype=torch.float64))
            result.smoothed[s], result.smoothed_stderr[s] = g.grad.tolist(), g.stderr.tolist()
        if sm is not None:
            msg += f"; smoothed (σ = {sm.sigma:g}): {horizon_report.fmt(result.smoothed[s])}"
            msg += f" ± {horizon_report.fmt(result.smoothed_stderr[s])}"
        if measured:  # a reused truth is in horizon.json already
            console.print(msg, highlight=False, soft_wrap=True)
    result.seconds["truth"] = time.perf_counter() - t0


def _smoothed_truth(f: Callable[[Tensor], float], x: Tensor, sm: Smoothing, slope: Tensor) -> SmoothedGradient:
    """The smoothed gradient from ``sm.pairs`` antithetic pairs, plain or with the central differences ``slope`` as
    a linear control variate (both unbiased, from the same runs): whichever has the smaller standard error."""
    directions, diffs = antithetic_differences(
        f, x, sm.sigma, sm.pairs, torch.Generator().manual_seed(SMOOTH_SEED + sm.seed)
    )
    plain, cv = smoothed_estimate(directions, diffs), smoothed_estimate(directions, diffs, slope)
    return cv if float(cv.stderr.norm()) < float(plain.stderr.norm()) else plain


def _run_contender(
    result: HorizonResult, p: _Prepared, raw: dict[str, Tensor], checkpoints: dict[int, _Checkpoint], console: Console
) -> None:
    """One contender's hypergradients at the checkpoints and their scores, or the one line saying why none."""
    label = p.contender.label
    t0 = time.perf_counter()
    try:
        hgs = _contender_hypergradients(p.method, p.exp, raw, checkpoints, result.at)
    except Exception as e:  # one contender failing (e.g. a refused combination) must not end the check
        result.errors[label] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        console.print(f"hoexp: {label}: {result.errors[label]}", highlight=False, soft_wrap=True, markup=False)
        return
    result.seconds[label] = time.perf_counter() - t0
    result.hypergradients[label] = {s: hg.tolist() for s, hg in hgs.items()}
    result.scores[label] = _score(hgs, result.truth)
    if result.smoothing is not None:
        result.smoothed_scores[label] = _score(hgs, result.smoothed, result.smoothed_stderr)


def reference_run(exp: Any, start: RunState, at: Sequence[int]) -> tuple[dict[int, _Checkpoint], InnerState]:
    """The reference trajectory from the run's ``start`` at its hyperparameters (the engine's plain outer steps, no
    outer updates), with a snapshot before every outer step (weights at the checkpoints ``at``, the streams'
    positions at all: a contender that runs from step 0 is put back on them, so it trains on the reference's
    batches). Returns the snapshots and the final state."""
    checkpoints: dict[int, _Checkpoint] = {}
    state, train, val = start.inner, start.train, start.val
    for step in range(exp.settings.outer_steps):
        checkpoints[step] = _Checkpoint(
            step, state if step in at else None, copy.deepcopy(train.state_dict()), copy.deepcopy(val.state_dict())
        )
        state = advance(exp, PLAIN, state, start.raw, train, val).inner
    return checkpoints, state


def _streams(exp: Any, at: _Checkpoint | None = None) -> tuple[Any, Any]:
    """The run's training and validation streams (as the runner makes them), fresh or restored to
    the position they had at checkpoint ``at``: the common random numbers of every comparison."""
    fresh = start(exp)
    train, val = fresh.train, fresh.val
    if at is not None:
        train.load_state_dict(copy.deepcopy(at.train_stream))
        val.load_state_dict(copy.deepcopy(at.val_stream))
    return train, val


def _prepare_contenders(
    contenders: Sequence[tuple[Contender, Spec | Job]], spec: Spec, exp: Any, raw: dict[str, Tensor]
) -> list[_Prepared]:
    """Each contender's method, built and checked against its problem (as a run would check it) and able to give
    a hypergradient (``returns_hypergradient``); one line naming the contender otherwise. A contender whose
    overrides change ``hp.*`` gets its own experiment (:func:`_own_experiment`)."""
    from hoexp.components import CheckContext
    from hoexp.config.build import check_compatibility

    family = exp.problem.family
    ctx = CheckContext(exp.inner_opt, family, sum(p.numel() for p in exp.model.parameters()), tree.numel(raw))
    out = []
    for contender, job in contenders:
        cspec, pre = (job.spec, job.prebuilt) if isinstance(job, Job) else (job, None)
        try:
            if _differences(spec, cspec):
                cexp = _own_experiment(spec, cspec, raw, pre)
                method = cexp.method
            else:
                cexp, method = exp, (pre.method if pre is not None and pre.method is not None else build_method(cspec))
                check_compatibility(cspec, method, family, ctx)
        except (ConfigError, ValueError, TypeError) as e:
            raise ConfigError(f"--method {contender.label}: {str(e).strip().splitlines()[0]}") from None
        if not getattr(method, "returns_hypergradient", True):
            raise ConfigError(
                f"--method {contender.label}: method={cspec.method.name} gives no hypergradient to compare with "
                "the truth (it adapts its hyperparameter inside training, or tunes none); choose a hypergradient "
                f"method, e.g. {', '.join(DEFAULT_CONTENDERS[:4])}"
            )
        out.append(_Prepared(contender, method, cexp))
    return out


def _differences(spec: Spec, cspec: Spec) -> list[str]:
    """The top-level config keys where a contender's configuration differs from the reference's (but the method)."""
    skip = ("method", "name", "hydra")
    keys = (set(spec.raw) | set(cspec.raw)) - set(skip)
    return sorted(k for k in keys if spec.raw.get(k) != cspec.raw.get(k))


def _own_experiment(spec: Spec, cspec: Spec, raw: dict[str, Tensor], prebuilt: Prebuilt | None = None) -> Any:
    """The experiment of a contender that models the hyperparameters its own way (``hp.*``: a relaxation, a
    temperature), checked to change nothing else and to have the reference's hyperparameter layout."""
    other = [k for k in _differences(spec, cspec) if k not in OWN_PROBLEM_KEYS]
    if other:
        raise ConfigError(
            f"its overrides change {', '.join(other)}: a contender may change only method.* and hp.* (how it "
            "models the hyperparameters); put the rest in the reference's overrides"
        )
    cexp = build(cspec, prebuilt=prebuilt)
    layout, reference = ({k: tuple(v.shape) for k, v in r.items()} for r in (start(cexp).raw, raw))
    if layout != reference:
        raise ConfigError(
            f"its hyperparameters {layout} differ from the reference's {reference}; change only options that keep "
            "them (relaxation, temperature)"
        )
    return cexp


def _contender_hypergradients(
    method: HyperMethod, exp: Any, raw: dict[str, Tensor], checkpoints: dict[int, _Checkpoint], at: Sequence[int]
) -> dict[int, Tensor]:
    """The contender's hypergradient at each checkpoint (the engine's outer step, :func:`~hoexp.engine.step.advance`):
    from the checkpoint's state for stateless methods; along its own run from step 0 (no outer updates) for methods
    that carry state. ``exp``: the experiment the contender runs on (the reference's, or its own with the same model,
    data and streams)."""
    out: dict[int, Tensor] = {}
    if isinstance(method, CarriesState) and getattr(method, "carries", True):
        state = start(exp).inner  # the start's weights (the reference's: same model and seed), a fresh optimizer state
        for step in range(max(at) + 1):
            # Back on the reference's stream positions: a method drawing batches beyond inner_steps (the IFT's
            # Hessian batch: extra_batches) would otherwise train on batches the reference never saw, and its
            # trajectory would drift from the one the truth is measured on.
            hg, state, _ = advance(exp, method, state, raw, *_streams(exp, checkpoints[step]))
            if step in at:
                out[step] = _flat(hg)
        return out
    for s in at:
        ck = checkpoints[s]
        assert ck.state is not None  # a checkpoint in `at`
        out[s] = _flat(advance(exp, method, ck.state, raw, *_streams(exp, ck)).hypergrad)
    return out


def _flat(hg: dict[str, Tensor] | None) -> Tensor:
    """A contender's hypergradient as one float64 vector (method=none computes none)."""
    if hg is None:
        raise ValueError("the method computes no hypergradient")
    return tree.flatten(hg.values()).detach().double()


def _score(
    hgs: dict[int, Tensor], truth: dict[int, list[float]], stderr: dict[int, list[float]] | None = None
) -> dict[str, float]:
    """Mean cosine and relative error over the checkpoints, sign agreement pooled over checkpoints and coordinates,
    and per checkpoint; with the truth's ``stderr`` also the sign agreement over the coordinates it resolves
    (``sign_resolved``, over ``resolved`` of them: ``|g*| > 2 SE``)."""
    g = {s: torch.tensor(truth[s], dtype=torch.float64) for s in hgs}
    per = {s: agreement(hg, g[s]) for s, hg in hgs.items()}
    pooled_sign = torch.cat([(torch.sign(hg) == torch.sign(g[s])).double() for s, hg in hgs.items()]).mean()
    out = {
        "cosine": sum(p["cosine"] for p in per.values()) / len(per),
        "sign": float(pooled_sign),
        "rel_error": sum(p["rel_error"] for p in per.values()) / len(per),
    }
    out.update({f"cosine@{s}": p["cosine"] for s, p in per.items()})
    out.update({f"sign@{s}": p["sign"] for s, p in per.items()})
    if stderr is not None:
        hg = torch.cat([hgs[s].reshape(-1) for s in hgs])
        se = torch.cat([torch.tensor(stderr[s], dtype=torch.float64) for s in hgs])
        out["sign_resolved"], n = resolved_sign(hg, torch.cat([g[s] for s in hgs]), se)
        out["resolved"] = float(n)
    return out
