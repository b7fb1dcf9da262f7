"""``hoexp check --horizon``: does a method's hypergradient point where the *final* model improves?

The user's objective is the validation loss at the end of training. Its derivative with respect to
the hyperparameters, applied from outer step ``s`` on, is the *long-horizon truth*

    g*_s = d/dλ  L_V( w_{N·T}(λ) ),   λ used for every training step after outer step s,

measured by central finite differences over the whole remaining run with common random numbers
(the same minibatches and dropout noise for ``λ ± ε e_i``: the batch streams are restored from the
checkpoint at ``s``). Each method's hypergradient at ``s`` (the one its outer step starting at ``s``
returns; methods that carry state across outer steps run from step 0) is compared with it:
cosine, the fraction of coordinates whose sign agrees, and the relative error. Hyperparameters stay
at their initial values throughout (no outer updates), so every method sees one trajectory.

Cost: ``2·H`` remaining runs per checkpoint for ``H`` hyperparameters (use global or per-layer
granularity), plus one run per stateful method. Output: a rich table, ``horizon.json``, ``horizon.png``.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from hoexp import tree
from hoexp.config import Spec
from hoexp.config.build import build, build_method
from hoexp.engine.metrics import write_json_atomic
from hoexp.engine.state import start
from hoexp.errors import ConfigError
from hoexp.method.base import CarriesState, HyperMethod, InnerState, outer_step, train_inner

MAX_HPARAMS = 32


def central_differences(f: Callable[[Tensor], float], x: Tensor, eps: float) -> Tensor:
    """``(f(x + ε e_i) − f(x − ε e_i)) / 2ε`` for every coordinate of the flat vector ``x`` (2·dim calls)."""
    out = torch.zeros(x.numel(), dtype=torch.float64)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[i] = eps
        out[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return out


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
class HorizonResult:
    at: list[int]
    eps: float
    truth: dict[int, list[float]]
    hypergradients: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _fingerprint(spec: Spec, eps: float) -> dict:
    """What the truth depends on: the whole configuration except the method (and where it is written)."""
    raw = {k: v for k, v in spec.raw.items() if k not in ("method", "name", "hydra")}
    return {"config": raw, "eps": eps}


def run_horizon(
    spec: Spec,
    contenders: Sequence[tuple[Contender, Spec]],
    out_dir: Path,
    *,
    at: Sequence[int] | None = None,
    eps: float = 0.05,
    console: Console | None = None,
    truth_from: Path | None = None,
) -> HorizonResult:
    """The long-horizon truth at the checkpoints ``at`` (outer steps) and every contender against it.

    ``truth_from``: a previous ``horizon.json`` whose truth is reused for the checkpoints it has, when
    it was measured on the same configuration (all but the method) and ``eps``; the rest is measured.
    """
    console = console or Console(stderr=True)
    run = spec.run
    at = sorted(
        set(at if at is not None else [0, run.outer_steps // 4, run.outer_steps // 2, 3 * run.outer_steps // 4])
    )
    if not at or at[0] < 0 or at[-1] >= run.outer_steps:
        raise ConfigError(f"--at must list outer steps in [0, outer_steps={run.outer_steps}), got {at}")
    exp = build(spec)
    problem = exp.problem
    start_state = start(exp)  # the runner's start: weights, hyperparameters, streams
    raw = start_state.raw
    n_h = tree.numel(raw)
    if n_h > MAX_HPARAMS:
        raise ConfigError(
            f"the horizon diagnostic differentiates the whole remaining run per hyperparameter; "
            f"hp={spec.hp_name} has {n_h:,} here (limit {MAX_HPARAMS}): use a global or per_layer "
            "granularity"
        )
    methods = _check_contenders(contenders, exp, raw)  # every contender before any truth is computed
    known = _known_truth(truth_from, spec, eps)
    train, val, state = start_state.train, start_state.val, start_state.inner
    out_dir.mkdir(parents=True, exist_ok=True)

    checkpoints, state = reference_run(exp, state, raw, train, val, run.outer_steps, run.inner_steps, at)
    base_final = float(problem.evaluate(state.params, exp.data.val)[0])

    raw_flat = tree.flatten(raw.values()).detach()
    plain = exp.runtime.step()

    def final_val_loss(ck: _Checkpoint, flat: Tensor) -> float:
        assert ck.state is not None  # a checkpoint in `at`
        lam = tree.unflatten(flat, raw)
        stream, _ = _streams(exp, ck)
        st, _, _ = train_inner(
            problem, exp.inner_opt, ck.state, lam, stream, (run.outer_steps - ck.step) * run.inner_steps, step=plain
        )
        return float(problem.evaluate(st.params, exp.data.val)[0].double())

    result = HorizonResult(at=list(at), eps=eps, truth={})
    t0 = time.perf_counter()
    for s in at:
        if s in known:
            result.truth[s] = known[s]
            continue
        result.truth[s] = central_differences(lambda x: final_val_loss(checkpoints[s], x), raw_flat, eps).tolist()
        console.print(f"hoexp: truth at outer step {s}: {_fmt(result.truth[s])}", highlight=False, soft_wrap=True)
    result.seconds["truth"] = time.perf_counter() - t0

    for (contender, cspec), method in zip(contenders, methods):
        t0 = time.perf_counter()
        try:
            hgs = _contender_hypergradients(method, cspec, exp, raw, checkpoints, at)
        except Exception as e:  # one contender failing (e.g. a refused combination) must not end the check
            result.errors[contender.label] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            console.print(
                f"hoexp: {contender.label}: {result.errors[contender.label]}",
                highlight=False,
                soft_wrap=True,
                markup=False,
            )
            continue
        result.seconds[contender.label] = time.perf_counter() - t0
        result.hypergradients[contender.label] = {s: hg.tolist() for s, hg in hgs.items()}
        result.scores[contender.label] = _score(hgs, result.truth)

    report = {
        "at": result.at,
        "eps": eps,
        "num_hparams": n_h,
        "base_final_val_loss": base_final,
        "fingerprint": _fingerprint(spec, eps),
        "truth": {str(k): v for k, v in result.truth.items()},
        "hypergradients": {m: {str(k): v for k, v in d.items()} for m, d in result.hypergradients.items()},
        "scores": result.scores,
        "errors": result.errors,
        "seconds": result.seconds,
        "hp_layout": {k: list(v.shape) for k, v in raw.items()},
    }
    write_json_atomic(out_dir / "horizon.json", report)
    _table(result, console)
    if result.scores:
        _plot(result, out_dir / "horizon.png")
    else:
        console.print("hoexp: no contender gave a hypergradient: no horizon.png", highlight=False)
    console.print(f"hoexp: horizon diagnostic written to {out_dir}", highlight=False, soft_wrap=True)
    return result


def reference_run(
    exp: Any,
    state: InnerState,
    raw: dict[str, Tensor],
    train: Any,
    val: Any,
    outer_steps: int,
    inner_steps: int,
    at: Sequence[int],
) -> tuple[dict[int, _Checkpoint], InnerState]:
    """The reference trajectory at the hyperparameters ``raw`` (no outer updates), with a snapshot at every outer
    step (weights at the checkpoints ``at``, the streams' positions at all: a contender that runs from step 0 is
    put back on them, so it trains on the reference's batches). Returns the snapshots and the final state."""
    checkpoints: dict[int, _Checkpoint] = {}
    for step in range(outer_steps):
        checkpoints[step] = _Checkpoint(
            step, state if step in at else None, copy.deepcopy(train.state_dict()), copy.deepcopy(val.state_dict())
        )
        state, _, _ = train_inner(exp.problem, exp.inner_opt, state, raw, train, inner_steps, step=exp.runtime.step())
        next(val)  # the runner draws one validation batch per outer step
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


def _known_truth(truth_from: Path | None, spec: Spec, eps: float) -> dict[int, list[float]]:
    """The truth of an earlier ``horizon.json`` (``--truth``) measured on this configuration and ``eps``."""
    if truth_from is None:
        return {}
    try:
        old = json.loads(Path(truth_from).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--truth {truth_from}: cannot read it ({e}); pass a horizon.json") from None
    if old.get("fingerprint") != json.loads(json.dumps(_fingerprint(spec, eps))):
        raise ConfigError(
            f"--truth {truth_from} was measured on another configuration or --eps; drop --truth to measure it again"
        )
    return {int(k): v for k, v in old.get("truth", {}).items()}


def _check_contenders(
    contenders: Sequence[tuple[Contender, Spec]], exp: Any, raw: dict[str, Tensor]
) -> list[HyperMethod]:
    """Each contender's method, built and checked against this problem (as a run would check it) and
    able to give a hypergradient (``returns_hypergradient``); one line naming the contender otherwise."""
    from hoexp.components import CheckContext
    from hoexp.config.build import check_compatibility

    family = exp.problem.family
    ctx = CheckContext(exp.inner_opt, family, sum(p.numel() for p in exp.model.parameters()), tree.numel(raw))
    methods = []
    for contender, cspec in contenders:
        try:
            method = build_method(cspec)
            check_compatibility(cspec, method, family, ctx)
        except (ConfigError, ValueError, TypeError) as e:
            raise ConfigError(f"--method {contender.label}: {str(e).strip().splitlines()[0]}") from None
        if not getattr(method, "returns_hypergradient", True):
            raise ConfigError(
                f"--method {contender.label}: method={cspec.method.name} gives no hypergradient to compare with "
                "the truth (it adapts its hyperparameter inside training, or tunes none); choose a hypergradient "
                f"method, e.g. {', '.join(DEFAULT_CONTENDERS[:4])}"
            )
        methods.append(method)
    return methods


def _contender_hypergradients(
    method: HyperMethod,
    cspec: Spec,
    exp: Any,
    raw: dict[str, Tensor],
    checkpoints: dict[int, _Checkpoint],
    at: Sequence[int],
) -> dict[int, Tensor]:
    """The contender's hypergradient at each checkpoint: from the checkpoint's state for stateless
    methods; along its own run from step 0 (no outer updates) for methods that carry state."""
    problem, run, plain = exp.problem, cspec.run, exp.runtime.step()
    out: dict[int, Tensor] = {}
    if isinstance(method, CarriesState) and getattr(method, "carries", True):
        state = start(exp).inner  # the start's weights and a fresh optimizer state
        for step in range(max(at) + 1):
            # Back on the reference's stream positions: a method drawing batches beyond inner_steps (the IFT's
            # Hessian batch: extra_batches) would otherwise train on batches the reference never saw, and its
            # trajectory would drift from the one the truth is measured on.
            train, val = _streams(exp, checkpoints[step])
            hg, state, _ = outer_step(
                method, problem, exp.inner_opt, state, raw, train, next(val), run.inner_steps, step=plain
            )
            if step in at:
                out[step] = _flat(hg)
        return out
    for s in at:
        ck = checkpoints[s]
        assert ck.state is not None  # a checkpoint in `at`
        train, val = _streams(exp, ck)
        hg, _, _ = outer_step(
            method, problem, exp.inner_opt, ck.state, raw, train, next(val), run.inner_steps, step=plain
        )
        out[s] = _flat(hg)
    return out


def _flat(hg: dict[str, Tensor] | None) -> Tensor:
    """A contender's hypergradient as one float64 vector (method=none computes none)."""
    if hg is None:
        raise ValueError("the method computes no hypergradient")
    return tree.flatten(hg.values()).detach().double()


def _score(hgs: dict[int, Tensor], truth: dict[int, list[float]]) -> dict[str, float]:
    per = {s: agreement(hg, torch.tensor(truth[s], dtype=torch.float64)) for s, hg in hgs.items()}
    pooled_sign = torch.cat(
        [(torch.sign(hg) == torch.sign(torch.tensor(truth[s], dtype=torch.float64))).double() for s, hg in hgs.items()]
    ).mean()
    out = {
        "cosine": sum(p["cosine"] for p in per.values()) / len(per),
        "sign": float(pooled_sign),
        "rel_error": sum(p["rel_error"] for p in per.values()) / len(per),
    }
    out.update({f"cosine@{s}": p["cosine"] for s, p in per.items()})
    out.update({f"sign@{s}": p["sign"] for s, p in per.items()})
    return out


def _fmt(v: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:+.3g}" for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"


def _table(result: HorizonResult, console: Console) -> None:
    table = Table(
        title=f"hypergradient vs long-horizon truth (central differences, ε = {result.eps:g}, checkpoints {result.at})"
    )
    table.add_column("method")
    table.add_column("sign agreement", justify="right")
    table.add_column("cosine (mean)", justify="right")
    for s in result.at:
        table.add_column(f"cos@{s}", justify="right")
    table.add_column("rel. error", justify="right")
    table.add_column("time s", justify="right")
    for label, sc in result.scores.items():
        table.add_row(
            label,
            f"{sc['sign']:.2f}",
            f"{sc['cosine']:+.3f}",
            *[f"{sc[f'cosine@{s}']:+.2f}" for s in result.at],
            f"{sc['rel_error']:.3g}",
            f"{result.seconds.get(label, math.nan):.1f}",
        )
    for label, err in result.errors.items():
        table.add_row(label, "-", "-", *["-" for _ in result.at], "-", err[:60])
    console.print(table)


def _short(label: str) -> str:
    """A contender's label for plots: without the ``method.`` prefixes, wrapped."""
    import textwrap

    return "\n".join(textwrap.wrap(label.replace("method.", ""), 28, break_on_hyphens=False)) or label


def _plot(result: HorizonResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result.scores)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.45 * max(len(labels), 4)), layout="constrained")
    for label in labels:
        sc = result.scores[label]
        ax1.plot(result.at, [sc[f"cosine@{s}"] for s in result.at], marker="o", label=_short(label))
    ax1.axhline(0, color="grey", lw=0.5)
    ax1.set_xlabel("outer step of the checkpoint")
    ax1.set_ylabel("cosine with the long-horizon truth")
    ax1.set_ylim(-1.05, 1.05)
    ax1.set_title(f"long-horizon truth: central differences, ε = {result.eps:g}", fontsize=9)
    ax2.barh(range(len(labels)), [result.scores[m]["sign"] for m in labels])
    ax2.set_yticks(range(len(labels)), [_short(m) for m in labels], fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.axvline(0.5, color="grey", lw=0.5)
    ax2.set_xlabel("sign agreement (all checkpoints and coordinates)")
    fig.legend(loc="outside lower center", ncol=min(len(labels), 3), fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
