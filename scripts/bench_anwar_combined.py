"""Anwar et al.'s claim on MNIST-5k: > 70 % of a small CNN's weights pruned with < 1 pp accuracy loss using combined
granularities — feature-map (filter, physical through the dependency graph), kernel and intra-kernel strided
(mixed kernel+strided, realized as a gathered conv) — and the measured ONNX Runtime latency of that model vs dense.

Mask choice: l1 by default, or Anwar's particle filter (--pf: validation-subset misclassification, bounded cost).
After pruning, the model is retrained with gradient masking. The dense reference gets the same retraining budget.

    python scripts/bench_anwar_combined.py --quick --out anwar.md      (< 2 min)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_structures_capability import md_table, ort_session, time_pair  # noqa: E402

from hwprune.importance import misclassification_rate  # noqa: E402
from hwprune.structures import apply_layer_structures  # noqa: E402


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),     # 24 -> 12
        nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),    # 8 -> 4
        nn.Flatten(), nn.Linear(64 * 16, 10),
    )


def train(model, x, y, epochs, lr, bs=64, seed=0, masks=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = perm[i: i + bs]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            if masks:
                for p, m in masks:
                    p.grad.mul_(m)
            opt.step()
            if masks:
                with torch.no_grad():
                    for p, m in masks:
                        p.mul_(m)
    model.eval()


def acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def weights(model):
    return sum(int((p != 0).sum()) for n, p in model.named_parameters() if p.dim() > 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--retrain", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--retrain-lr", type=float, default=3e-4)
    ap.add_argument("--fm", default="0.25,0.5", help="feature-map (filter) ratios of conv1, conv2")
    ap.add_argument("--kernel", type=float, default=0.5, help="kernel+strided ratio on conv2")
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--fc", type=float, default=0.5, help="connection ratio on the classifier")
    ap.add_argument("--pf", action="store_true", help="particle-filter mask choice (Anwar) for the classifier")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 dense epochs, 2 retraining epochs, 50 timing repeats")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.quick:
        a.epochs, a.retrain, a.repeats = 3, 2, 50
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from hwprune.data import load_dataset

    d = load_dataset("mnist-5k", val_fraction=0.2, seed=0)
    xt, yt = d.train.tensors
    xv, yv = d.val.tensors
    base = cnn()
    train(base, xt, yt, a.epochs, a.lr)
    ref = copy.deepcopy(base)
    train(ref, xt, yt, a.retrain, a.retrain_lr, seed=1)

    f1, f2 = (float(v) for v in a.fm.split(","))
    specs = {
        "0": {"structure": "filter", "ratio": f1},
        "3": {"structure": "filter", "ratio": f2},
        "7": {"structure": "connection", "ratio": a.fc},
    }
    example = xt[:1]
    pruned, reps = apply_layer_structures(base, specs, example_input=example)
    mixed = {"3": {"structure": "mixed", "ratio": a.kernel, "params": {"parts": "kernel+strided", "strided.s": a.stride}}}
    pf_kw = {}
    if a.pf:
        sub = [(xv[:200], yv[:200])]
        pf_kw = dict(criterion="pf", pf_error=lambda m: misclassification_rate(m, sub),
                     pf_settings={"n_particles": 8, "iterations": 3})
    pruned, reps2 = apply_layer_structures(pruned, mixed, example_input=example, **pf_kw)
    before_retrain = acc(pruned, xv, yv)
    masks = [(p, (p != 0).float()) for n, p in pruned.named_parameters() if p.dim() > 1]
    train(pruned, xt, yt, a.retrain, a.retrain_lr, seed=1, masks=masks)
    w_dense, w_pruned = weights(base), weights(pruned)
    x1 = xv[:1]
    dm, pm, sp = time_pair(ort_session(ref, x1, a.threads), ort_session(pruned, x1, a.threads), a.repeats)
    x64 = xv[:64]
    dm64, pm64, sp64 = time_pair(ort_session(ref, x64, a.threads), ort_session(pruned, x64, a.threads), max(10, a.repeats // 5))
    rows = [
        ["dense (+ same retraining budget)", w_dense, "0.0%", f"{acc(ref, xv, yv):.4f}", f"{dm:.4f}", f"{dm64:.3f}"],
        ["combined: FM + kernel + strided + FC connections", w_pruned, f"{1 - w_pruned / w_dense:.1%}",
         f"{acc(pruned, xv, yv):.4f} (before retraining {before_retrain:.4f})", f"{pm:.4f} ({sp:.2f}x)",
         f"{pm64:.3f} ({sp64:.2f}x)"],
    ]
    table = md_table(["model", "non-zero weights", "pruned", "val acc", "ORT ms batch 1", "ORT ms batch 64"], rows)
    layers = md_table(["layer", "structure", "executed", "weights kept / before", "MACs effective / dense"],
                      [[r.layer, r.structure, r.executed, f"{r.weights_kept}/{r.weights}",
                        f"{r.macs_effective}/{r.macs_dense}"] for r in reps + reps2])
    note = (f"\n\nMNIST-5k (4000 train / 1000 val), {a.epochs} dense epochs, {a.retrain} masked retraining epochs, "
            f"specs {specs} then {mixed}{' with particle filter' if a.pf else ''}; ORT CPU {a.threads} thread(s), "
            f"interleaved medians. Masked zeros (kernel, FC connections) count as pruned weights but run dense; "
            f"filters and strided rows are physically gone.")
    text = table + "\n\n" + layers + note
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
