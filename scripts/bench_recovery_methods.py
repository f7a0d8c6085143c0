"""Recovery methods at an equal step budget: the demo model on MNIST-5k with one mask structure on every 3x3 conv.

For each method (finetune, iterative, dpu one_stage and multi_step, admm, cdp_dtc intended and code_faithful) the
pruned model gets the same BN recalibration and the same ``--steps`` optimizer steps; the dense model gets the same
fine-tuning budget as the reference. Accuracy on the held-out validation split; the zeros of the delivered weights
are counted (every method must reach the target exactly). Rows are appended to a JSONL file as they finish (a rerun
skips finished rows), and the markdown table is rewritten after each.

    PYTHONPATH=$PWD nice -n 19 python scripts/bench_recovery_methods.py --structure kernel --ratio 0.8 --steps 60 \
        --demo-cache /path/demo_model.pt
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn

from hwprune.config import RecoveryBudget
from hwprune.data import load_dataset
from hwprune.models import load_or_train_demo
from hwprune.plan import PruningPlan, apply_plan
from hwprune.recover import evaluate, recover
from hwprune.structures import get_structure
from hwprune.structures.masks import masked_modules

VARIANTS = {  # label -> (method, its hyperparameters)
    "finetune": ("finetune", {}),
    "iterative": ("iterative", {}),
    "iterative ramp 0.3": ("iterative", {"ramp_fraction": 0.3}),
    "dpu one_stage": ("dpu", {"mode": "one_stage"}),
    "dpu multi_step": ("dpu", {"mode": "multi_step"}),
    "admm": ("admm", {}),
    "cdp_dtc intended": ("cdp_dtc", {"mode": "intended"}),
    "cdp_dtc code_faithful": ("cdp_dtc", {"mode": "code_faithful"}),
}


def target_zero_fraction(model: nn.Module) -> float:
    """Fraction of zeros the masks ask for, over the masked layers (per-layer rounding of the ratio included)."""
    need = total = 0
    for _, m in masked_modules(model):
        need += int((~m.hw_keep).sum())
        total += m.hw_keep.numel()
    return need / max(total, 1)


def delivered_zero_fraction(model: nn.Module, layers) -> float:
    mods = dict(model.named_modules())
    z = sum(int((mods[n].weight == 0).sum()) for n in layers)
    return z / sum(mods[n].weight.numel() for n in layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--structure", default="kernel")
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--demo-cache", default="runs/bench-recovery/demo_model.pt")
    ap.add_argument("--only", nargs="*", help="labels of the variants to run (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_dataset("mnist-5k", val_fraction=0.2, seed=0)
    dense = load_or_train_demo(Path(args.demo_cache), data, seed=0)
    tag = f"{args.structure}{int(round(args.ratio * 100))}"
    out = Path(args.out or f"scripts/results/recovery_methods_{tag}.md")
    rows_path = out.with_suffix(".jsonl")
    done = {}
    if rows_path.is_file():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[r["label"]] = r
    budget = RecoveryBudget(finetune_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            bn_recalibration_batches=10)
    convs = [n for n, m in dense.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    st = get_structure(args.structure)
    spec = {"structure": st.name, "ratio": args.ratio}
    plan = PruningPlan(ratios={}, structures={n: dict(spec) for n in convs})
    x = torch.randn(1, *data.input_shape)

    def record(row):
        done[row["label"]] = row
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        write_table(out, done, args, len(convs))
        print(json.dumps(row), flush=True)

    if "dense (no pruning, no training)" not in done:
        record({"label": "dense (no pruning, no training)", "accuracy": evaluate(dense, data), "seconds": 0})
    if "dense + same budget (finetune)" not in done:
        t = time.perf_counter()
        m = recover(copy.deepcopy(dense), data, budget, method="finetune")
        record({"label": "dense + same budget (finetune)", "accuracy": evaluate(m, data), "seconds": time.perf_counter() - t})
    pruned, _, _ = apply_plan(dense, plan, x)
    target = target_zero_fraction(pruned)
    if "pruned, no recovery" not in done:
        record({"label": "pruned, no recovery", "accuracy": evaluate(pruned, data), "zeros": delivered_zero_fraction(pruned, convs),
                "target_zeros": target, "seconds": 0})
    for label, (method, params) in VARIANTS.items():
        if label in done or (args.only and label not in args.only):
            continue
        b = dataclasses.replace(budget, method=(method,), method_params={method: params} if params else {})
        notes = []
        t = time.perf_counter()
        m = recover(copy.deepcopy(pruned), data, b, method=method, log=notes.append)
        record({"label": label, "method": method, "params": params, "accuracy": evaluate(m, data),
                "zeros": delivered_zero_fraction(m, convs), "target_zeros": target,
                "seconds": time.perf_counter() - t, "notes": notes})
    write_table(out, {k: done[k] for k in sorted(done, key=_order)}, args, len(convs))


def _order(label: str) -> int:
    fixed = ["dense (no pruning, no training)", "dense + same budget (finetune)", "pruned, no recovery", *VARIANTS]
    return fixed.index(label) if label in fixed else len(fixed)


def write_table(out: Path, rows, args, n_layers: int) -> None:
    ref = rows.get("dense + same budget (finetune)", {}).get("accuracy")
    ft = rows.get("finetune", {}).get("accuracy")
    lines = [f"# Recovery methods at an equal step budget: demo model, MNIST-5k, {args.structure} {args.ratio:g} on "
             f"{n_layers} 3x3 convs", "",
             f"`python scripts/bench_recovery_methods.py --structure {args.structure} --ratio {args.ratio:g} "
             f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr:g}` (SGD momentum 0.9, cosine, "
             f"wd 5e-4, 10 BN recalibration batches; validation split of 1,000 images)", "",
             "| variant | val. accuracy | vs dense same budget (pp) | vs finetune (pp) | zeros delivered / target | seconds |",
             "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        acc = r["accuracy"]
        d_ref = f"{100 * (acc - ref):+.2f}" if ref is not None else ""
        d_ft = f"{100 * (acc - ft):+.2f}" if ft is not None and "method" in r else ""
        z = f"{r['zeros']:.4f} / {r['target_zeros']:.4f}" if "zeros" in r else ""
        lines.append(f"| {label} | {acc:.4f} | {d_ref} | {d_ft} | {z} | {r['seconds']:.0f} |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
