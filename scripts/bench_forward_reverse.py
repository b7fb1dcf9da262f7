"""Forward versus reverse mode: time as the number of hyperparameters grows, memory as T grows.

Problem: an MLP on Iris (depth 15, width 32: 16 weight tensors) trained with SGD + momentum,
with H learning rates (H = 1, 2, 4, 8, 16; the weight tensors are split round-robin into H groups,
lr_g = exp(raw_g)). Forward mode costs ~T·H JVPs and keeps no graph; reverse mode (unrolled) costs
~2T gradients whatever H, and keeps a graph that grows with T. Figures are ratios to one plain
training step measured in the same process; memory is the bytes of tensors the autograd graph saves
(reverse) and the bytes of the tangents carried (forward: weights and momentum, per hyperparameter).

    python scripts/bench_forward_reverse.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.func import functional_call

from hoexp import tree
from hoexp.dataset.iris import load_iris
from hoexp.errors import run_main
from hoexp.method.forward import forward_hypergradient
from hoexp.method.unrolled import unrolled_hypergradient
from hoexp.model.mlp import MLP
from hoexp.optim import build_optimizer
from hoexp.tools.check import GraphMemory


def problem(num_lrs: int):
    torch.manual_seed(0)
    data = load_iris(seed=0)
    model = MLP(4, 3, width=32, depth=15, activation="tanh", bias=False)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    group = {n: i % num_lrs for i, n in enumerate(names)}
    raw = {f"lr:{g}": torch.tensor(-2.5) for g in range(num_lrs)}

    def overrides(h, t):
        return {"lr": {n: torch.exp(h[f"lr:{group[n]}"]) for n in names}}

    def train_loss(w, h, t):
        return F.cross_entropy(functional_call(model, w, (data.train.x,)), data.train.y)

    def val_loss(w, h):
        return F.cross_entropy(functional_call(model, w, (data.val.x,)), data.val.y)

    return params, raw, overrides, train_loss, val_loss


def timed(fn, repeat=3):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="outputs/bench/forward_reverse.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    opt = build_optimizer("sgd", lr=0.05, momentum=0.9)
    console = Console(width=130)
    result: dict[str, Any] = {"time": [], "memory": []}

    params, raw, overrides, tl, vl = problem(1)
    state = opt.init(params)

    def plain_step():
        w = tree.detached(params, True)
        g = torch.autograd.grad(tl(w, raw, 0), list(w.values()))
        with torch.no_grad():
            opt.update(params, dict(zip(w.keys(), g)), state)

    step_s = timed(plain_step, 20)
    T = args.steps
    table = Table(title=f"Forward vs reverse, T={T} steps, time ÷ one training step ({step_s * 1e3:.2f} ms)")
    for c in ("hyperparameters H", "forward (÷ step)", "reverse (÷ step)", "forward / reverse", "max |fwd − rev| rel."):
        table.add_column(c, justify="right")
    for H in (1, 2, 4, 8, 16):
        params, raw, overrides, tl, vl = problem(H)
        state = opt.init(params)
        rev = unrolled_hypergradient(tl, vl, opt, params, state, raw, T, overrides=overrides)
        fwd = forward_hypergradient(tl, vl, opt, params, state, raw, T, overrides=overrides)
        a, b = tree.flatten(fwd.hypergrad.values()), tree.flatten(rev.hypergrad.values())
        agree = float((a - b).abs().max() / b.abs().max())
        t_rev = timed(lambda: unrolled_hypergradient(tl, vl, opt, params, state, raw, T, overrides=overrides), 2)
        t_fwd = timed(lambda: forward_hypergradient(tl, vl, opt, params, state, raw, T, overrides=overrides), 2)
        result["time"].append({"H": H, "forward_s": t_fwd, "reverse_s": t_rev, "step_s": step_s, "agree": agree})
        table.add_row(str(H), f"{t_fwd / step_s:.1f}", f"{t_rev / step_s:.1f}", f"{t_fwd / t_rev:.2f}", f"{agree:.1e}")
    console.print(table)

    params, raw, overrides, tl, vl = problem(4)
    state = opt.init(params)
    p_bytes = tree.numel(params) * 4
    mem = Table(
        title="Memory as T grows (H = 4): reverse = bytes saved by the autograd graph; forward = tangents carried"
    )
    for c in ("T", "reverse (MiB)", "reverse ÷ P·4 bytes", "forward (MiB)", "forward ÷ P·4 bytes"):
        mem.add_column(c, justify="right")
    for T in (10, 20, 50, 100):
        with GraphMemory(torch.device("cpu")) as g:
            unrolled_hypergradient(tl, vl, opt, params, state, raw, T, overrides=overrides)
        fwd_bytes = 4 * 2 * p_bytes  # H tangents of (weights, momentum buffer), independent of T
        result["memory"].append({"T": T, "reverse_bytes": g.bytes, "forward_bytes": fwd_bytes, "P": tree.numel(params)})
        mem.add_row(
            str(T),
            f"{g.bytes / 2**20:.2f}",
            f"{g.bytes / p_bytes:.0f}",
            f"{fwd_bytes / 2**20:.2f}",
            f"{fwd_bytes / p_bytes:.0f}",
        )
    console.print(mem)

    # Reversible learning against the unrolled graph: Iris reference MLP, T = 100, γ = 0.9.
    from hoexp.cli import compose_spec
    from hoexp.config.build import build, build_method
    from hoexp.dataset.base import Splits
    from hoexp.engine.state import start
    from hoexp.method.base import outer_step
    from hoexp.task.streams import FullBatch

    base = ["experiment=iris_per_weight_decay", "optim/inner=momentum", "optim.inner.momentum=0.9", "progress=false"]
    exp = build(compose_spec([*base, "method=unrolled"])[0])
    start_state = start(exp)
    p0, raw0, st = start_state.inner.params, start_state.raw, start_state.inner
    data = exp.data
    assert isinstance(data, Splits)  # Iris
    val = (data.val.x, data.val.y)
    with GraphMemory(torch.device("cpu")) as g:
        outer_step(
            build_method(compose_spec([*base, "method=unrolled"])[0]),
            exp.problem,
            exp.inner_opt,
            st,
            raw0,
            FullBatch(data.train),
            val,
            100,
        )
    _, _, rs = outer_step(
        build_method(compose_spec([*base, "method=reversible"])[0]),
        exp.problem,
        exp.inner_opt,
        st,
        raw0,
        FullBatch(data.train),
        val,
        100,
    )
    P = tree.numel(p0)
    bits_per_step = rs["reversible/bits_per_weight_step"]
    rev_bytes = P * 100 * bits_per_step / 8 + 2 * 8 * P  # the bit store + int64 weights and velocity
    traj_bytes = 100 * P * 4
    rev_table = Table(title=f"Iris MLP (P = {P:,}), T = 100, γ = 0.9")
    for c in ("memory of", "MiB", "÷ reversible"):
        rev_table.add_column(c, justify="right")
    rev_table.add_row("unrolled autograd graph (measured)", f"{g.bytes / 2**20:.2f}", f"{g.bytes / rev_bytes:.0f}")
    rev_table.add_row("float32 trajectory, 32·T·P bits", f"{traj_bytes / 2**20:.2f}", f"{traj_bytes / rev_bytes:.1f}")
    rev_table.add_row(
        f"reversible: bit store ({bits_per_step:.3f} bits/weight/step) + fixed-point w, v",
        f"{rev_bytes / 2**20:.2f}",
        "1",
    )
    console.print(rev_table)
    result["reversible"] = {
        "P": P,
        "T": 100,
        "gamma": 0.9,
        "unrolled_graph_bytes": g.bytes,
        "trajectory_bytes": traj_bytes,
        "reversible_bytes": rev_bytes,
        "bits_per_weight_step": bits_per_step,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
