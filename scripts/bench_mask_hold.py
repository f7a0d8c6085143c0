"""How to keep masks through training: projection after every optimizer step vs torch.nn.utils.parametrize.

The demo model (DemoNet 48/96/192) on MNIST-5k batches, kernel-wise masks at 80% on every 3x3 conv; training
steps per second for: no masks (reference), projection (hwprune's choice: ``masks.hold``), parametrization
(W * M recomputed in every forward, its gradient through the mask). Variants alternate in rounds so machine load
hits them alike. Both keep the zeros exactly; this measures only their cost.

    PYTHONPATH=$PWD nice -n 19 python scripts/bench_mask_hold.py --steps 10 --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from hwprune.data import load_dataset
from hwprune.models import DemoNet
from hwprune.plan import PruningPlan, apply_plan
from hwprune.structures.masks import KEEP, hold, masked_modules, strip


class MaskParam(nn.Module):
    def __init__(self, keep):
        super().__init__()
        self.register_buffer("keep", keep.float())

    def forward(self, w):
        return w * self.keep


def variant(base: nn.Module, kind: str) -> nn.Module:
    model = copy.deepcopy(base)
    if kind == "parametrize":
        for _, m in masked_modules(model):
            keep = m._buffers[KEEP]
            parametrize.register_parametrization(m, "weight", MaskParam(keep))
        for m in model.modules():  # no projection hooks: the parametrization alone holds the mask
            m._buffers.pop(KEEP, None)
    elif kind == "none":
        strip(model)
    return model


def steps_per_s(model: nn.Module, batches, kind: str) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    with hold(opt, model):
        t0 = None
        for i, (x, y) in enumerate(batches):
            if i == 2:
                t0 = time.perf_counter()  # two warm-up steps
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return (len(batches) - 2) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="scripts/results/mask_hold_cost.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_dataset("mnist-5k", val_fraction=0.2, seed=0)
    batches = [b for _, b in zip(range(args.steps + 2), data.loader("train", args.batch_size, shuffle=True, seed=0))]
    net = DemoNet().eval()
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    plan = PruningPlan(ratios={}, structures={n: {"structure": "kernel", "ratio": 0.8} for n in convs})
    masked, _, _ = apply_plan(net, plan, torch.randn(1, 1, 28, 28))
    kinds = ("none", "projection", "parametrize")
    rates = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            m = variant(masked, k)
            rates[k].append(steps_per_s(m, batches, k))
            if k != "none":
                w = [mod.parametrizations.weight.original * mod.parametrizations.weight[0].keep if k == "parametrize"
                     else mod.weight for mod in (dict(m.named_modules())[n] for n in convs)]
                zero = sum(int((x == 0).sum()) for x in w) / sum(x.numel() for x in w)
                assert zero > 0.79, (k, zero)  # per-layer rounding of 80%
    ref = statistics.median(rates["none"])
    lines = [f"# Holding masks during training: cost on the demo model ({len(convs)} masked 3x3 convs, kernel 80%)", "",
             f"`{' '.join(['python scripts/bench_mask_hold.py', '--steps', str(args.steps), '--rounds', str(args.rounds)])}`, "
             f"batch {args.batch_size}, MNIST-5k 28x28, CPU ({torch.get_num_threads()} threads, nice 19, shared machine)", "",
             "| variant | steps/s (median of rounds) | per round | vs no masks |", "|---|---|---|---|"]
    for k in kinds:
        med = statistics.median(rates[k])
        lines.append(f"| {k} | {med:.3f} | {', '.join(f'{r:.3f}' for r in rates[k])} | {med / ref:.3f}x |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
