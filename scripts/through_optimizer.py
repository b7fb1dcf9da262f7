"""One-step IFT (T1-T2) against reverse mode through the inner optimizer's steps, at a run's checkpoint.

    python scripts/through_optimizer.py RUN_DIR [overrides...] [--steps 1,10,30] [--draws 3]

At the checkpoint of ``RUN_DIR`` (a run of the same configuration, e.g. ``method=none``), for every
hyperparameter ``λ`` (the family's raw values, summed over coordinates): the T1-T2 direction
``−(∂²L_T/∂λ∂w)·∂L_V/∂w``, the hypergradient by reverse mode through ``T`` steps of ``optim/inner``
(``unrolled``), and central finite differences (``±0.25`` on every raw value, the same batches and noise) of
the same ``T``-step validation loss. On the PTB preset with Adam the first disagrees in sign with the
others (docs/results.md). Cost: a few ``T``-step unrolls per draw.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hoexp.config.build import build
from hoexp.config.compose import compose_spec
from hoexp.errors import HoexpError, run_main
from hoexp.method.base import train_inner
from hoexp.method.unrolled import unrolled_hypergradient
from hoexp.types import InnerState


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", default="1,10,30")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--val-windows", type=int, default=4, help="validation batches averaged in L_V")
    a = ap.parse_args(argv)
    checkpoint = Path(a.run_dir) / "checkpoint.pt"
    if not checkpoint.is_file():
        raise HoexpError(f"no checkpoint.pt in {a.run_dir}; give the folder of a run that saved one")
    torch.set_num_threads(1)
    exp = build(compose_spec([*a.overrides, "progress=false"])[0])
    task = exp.task
    ck = torch.load(checkpoint, weights_only=False)
    w, opt, raw = ck["params"], ck["opt_state"], ck["raw"]
    vs = task.val_stream(seed=12)
    val = [next(vs) for _ in range(a.val_windows)]

    def lv(p, lam):
        return sum(task.val_loss(p, lam, b) for b in val) / len(val)

    print(f"checkpoint at outer step {ck['step']}; columns: sum over the raw hyperparameters")
    horizons = [int(t) for t in a.steps.split(",")]
    for d in range(a.draws):
        stream = task.train_stream(seed=100 + d)
        batches = [next(stream) for _ in range(max(horizons))]  # every horizon reads a prefix of these
        # T1-T2's direction at the checkpoint, on the first batch (α > 0 left out: only the sign matters); it
        # does not depend on the horizon
        wl = {k: v.detach().requires_grad_() for k, v in w.items()}
        rl = {k: v.detach().requires_grad_() for k, v in raw.items()}
        v = torch.autograd.grad(lv(wl, rl), list(wl.values()), allow_unused=True)
        g = torch.autograd.grad(task.train_loss(wl, rl, batches[0]), list(wl.values()), create_graph=True)
        dot = torch.stack([(gi * vi).sum() for gi, vi in zip(g, v) if vi is not None]).sum()
        t1t2 = -torch.stack([x.sum() for x in torch.autograd.grad(dot, list(rl.values()))]).sum()
        for steps in horizons:
            res = unrolled_hypergradient(
                lambda p, lam, t: task.train_loss(p, lam, batches[t]), lv, exp.inner_opt, w, opt, raw, steps
            )
            unrolled = torch.stack([x.sum() for x in res.hypergrad.values()]).sum()
            fd = []
            for sign in (1, -1):
                shifted = {k: x + sign * 0.25 for k, x in raw.items()}
                start = InnerState(w, opt, int(ck["inner_step"]))
                st, _, _ = train_inner(task, exp.inner_opt, start, shifted, batches[:steps])
                with torch.no_grad():
                    fd.append(float(lv(st.params, raw)))
            print(
                f"T={steps:3d} draw {d}: t1t2 {float(t1t2):+.2e}   through {exp.inner_opt.name} {float(unrolled):+.2e}"
                f"   finite differences {(fd[0] - fd[1]) / 0.5:+.2e}",
                flush=True,
            )


if __name__ == "__main__":
    run_main(main)
