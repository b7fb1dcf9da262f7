"""SGD-HD on logistic regression on MNIST (Baydin et al. 2018, Fig. 2 setting).

Learning rate from 1e-3 with hyper-learning rate β = 1e-3, minibatch 128; plain SGD at the same
initial lr as the baseline. The paper saw SGD-HD's lr peak near 0.047 within ~15 iterations and a
final training loss of 0.293 against 0.396 for SGD. Data: torchvision's MNIST loader on
``$HOEXP_DATA/mnist`` (the shared copy has 5,000 training images, so the figures are not comparable
with the paper's 60,000).

    HOEXP_DATA=../shared/data python scripts/hd_logreg_mnist.py --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from hoexp.dataset.mnist import read_mnist
from hoexp.errors import run_main
from hoexp.method.hd import hd_init, hd_sgd_step


def load(root: Path, normalize: bool):
    """The training file (checked: a missing data root is one line, not torchvision's traceback)."""
    images, labels = read_mnist(root, train=True)
    x = images.reshape(len(images), -1).double() / 255.0
    if normalize:  # the usual MNIST mean/std standardization
        x = (x - 0.1307) / 0.3081
    return x, labels


def full_loss(w, x, y):
    return float(F.cross_entropy(x @ w["W"] + w["b"], y))


def train(x, y, steps, batch, lr0, beta, seed):
    g = torch.Generator().manual_seed(seed)
    w = {"W": torch.zeros(784, 10, dtype=torch.float64), "b": torch.zeros(10, dtype=torch.float64)}
    state = hd_init(w, lr0, "sgd")
    lrs, losses, order, pos = [], [], torch.randperm(len(y), generator=g), 0
    for _ in range(steps):
        if pos + batch > len(y):
            order, pos = torch.randperm(len(y), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        wg = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        loss = F.cross_entropy(x[idx] @ wg["W"] + wg["b"], y[idx])
        grads = dict(zip(wg, torch.autograd.grad(loss, list(wg.values()))))
        w, state = hd_sgd_step(w, grads, state, beta)
        lrs.append(float(state["hd_lr"]))
        losses.append(float(loss.detach()))
    return w, lrs, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr0", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=1e-3)
    ap.add_argument(
        "--raw-pixels",
        dest="normalize",
        action="store_false",
        help="pixels in [0, 1] instead of the usual standardization (mean 0.1307, std 0.3081)",
    )
    ap.add_argument("--out", default="outputs/studies/hd_logreg_mnist.json")
    args = ap.parse_args()
    root = Path(os.environ.get("HOEXP_DATA", "../shared/data"))
    x, y = load(root, args.normalize)
    steps = int(args.epochs * len(y) / args.batch)
    w_hd, lrs, _ = train(x, y, steps, args.batch, args.lr0, args.beta, 0)
    w_sgd, _, _ = train(x, y, steps, args.batch, args.lr0, 0.0, 0)
    peak = max(range(len(lrs)), key=lambda i: lrs[i])
    res = {
        "train_images": len(y),
        "normalized": args.normalize,
        "iterations": steps,
        "batch": args.batch,
        "lr0": args.lr0,
        "beta": args.beta,
        "hd_peak_lr": lrs[peak],
        "hd_peak_iteration": peak + 1,
        "hd_final_lr": lrs[-1],
        "hd_lr_at_15": lrs[min(14, len(lrs) - 1)],
        "final_train_loss_sgd_hd": full_loss(w_hd, x, y),
        "final_train_loss_sgd": full_loss(w_sgd, x, y),
    }
    for k, v in res.items():
        print(f"{k:26s} {v:.4g}" if isinstance(v, float) else f"{k:26s} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**res, "lr_trajectory": lrs}, indent=1))


if __name__ == "__main__":
    run_main(main)
