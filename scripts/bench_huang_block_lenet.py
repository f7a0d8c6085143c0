"""Huang et al. (Entropy 2021) on MNIST-5k: LeNet-300-100, block sizes vs density, accuracy on the validation split
(never trained on), and BSR vs dense time of the FC layers at the final density.

Iterative schedule as in the authors' code: each round prunes 20 % of the remaining blocks of fc1/fc2 and 10 % of
fc3 (score: block mean |w| normalised per layer), then retrains with gradient masking. The dense reference gets the
same retraining budget (same number of extra epochs). Prints a markdown table; --out writes it.

    python scripts/bench_huang_block_lenet.py --quick --out huang.md      (< 2 min)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_structures_capability import md_table, time_pair, torch_runner  # noqa: E402

from hwprune.structures import apply_layer_structures  # noqa: E402


def lenet():
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def load(seed=0):
    from hwprune.data import load_dataset

    d = load_dataset("mnist-5k", val_fraction=0.2, seed=seed)
    xt, yt = d.train.tensors
    xv, yv = d.val.tensors
    return xt.reshape(len(xt), -1), yt, xv.reshape(len(xv), -1), yv  # hwprune.data already normalises


def train(model, x, y, epochs, lr, masks=None, bs=50, seed=0):
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="2,3,4,5,6")
    ap.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--retrain", type=int, default=3, help="epochs of masked retraining per round")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--retrain-lr", type=float, default=1e-4)
    ap.add_argument("--report-every", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="blocks 2,4,6; 3 epochs; 4 rounds of 1 epoch")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.quick:
        a.blocks, a.epochs, a.rounds, a.retrain, a.report_every, a.repeats = "2,4,6", 3, 4, 1, 2, 20
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xt, yt, xv, yv = load()
    base = lenet()
    train(base, xt, yt, a.epochs, a.lr)
    budget = a.rounds * a.retrain
    ref = copy.deepcopy(base)
    train(ref, xt, yt, budget, a.retrain_lr, seed=1)
    rows = [["dense", "-", "100.0%", f"{acc(base, xv, yv):.4f}", f"{acc(ref, xv, yv):.4f} (dense + {budget} ep)"]]
    timing = []
    for b in (int(s) for s in a.blocks.split(",")):
        model = copy.deepcopy(base)
        for r in range(1, a.rounds + 1):
            specs = {
                "0": {"structure": "block", "ratio": 1 - 0.8 ** r, "params": {"b": b, "execute": "dense"}},
                "2": {"structure": "block", "ratio": 1 - 0.8 ** r, "params": {"b": b, "execute": "dense"}},
                "4": {"structure": "block", "ratio": 1 - 0.9 ** r, "params": {"b": b, "execute": "dense"}},
            }
            model, reps = apply_layer_structures(model, specs, criterion="block_mean")
            masks = [(m.weight, (m.weight != 0).float()) for m in model if isinstance(m, nn.Linear)]
            train(model, xt, yt, a.retrain, a.retrain_lr, masks=masks, seed=r)
            if r % a.report_every == 0 or r == a.rounds:
                kept = sum(rp.weights_kept for rp in reps)
                tot = sum(rp.weights for rp in reps)
                rows.append([f"b={b}", r, f"{kept / tot:.1%}", f"{acc(model, xv, yv):.4f}", ""])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
        # BSR vs dense for the pruned FC layers at the final density (batch 1 and 64)
        bsr, _ = apply_layer_structures(model, {k: {"structure": "block", "ratio": 0.0, "params": {"b": b}} for k in ("0", "2", "4")})
        for bs in (1, 64):
            x = xv[:bs]
            d, p, s = time_pair(torch_runner(model, x), torch_runner(bsr, x), a.repeats)
            timing.append([f"b={b}", bs, f"{d:.4f}", f"{p:.4f}", f"{s:.2f}x"])
    t1 = md_table(["blocks", "round", "FC density", "val acc", "dense reference"], rows)
    t2 = md_table(["blocks", "batch", "dense ms", "BSR ms", "BSR speedup"], timing)
    note = (f"\n\nMNIST-5k (4000 train / 1000 val, stratified seed 0), Adam lr {a.lr} for {a.epochs} dense epochs, "
            f"{a.rounds} rounds x {a.retrain} epochs masked retraining at lr {a.retrain_lr}; torch CPU, 1 thread.")
    text = t1 + "\n\n" + t2 + note
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
