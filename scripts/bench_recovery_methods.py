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
import statistics
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

VARIANTS = {  # label -> (method, its hyperparameters[, distil from the dense model[, steps instead of --steps]])
    "finetune": ("finetune", {}),
    "iterative": ("iterative", {}),
    "iterative ramp 0.3": ("iterative", {"ramp_fraction": 0.3}),
    "iterative ramp 0.2 every 2": ("iterative", {"ramp_fraction": 0.2, "interval": 2}),
    "dpu one_stage": ("dpu", {"mode": "one_stage"}),
    "dpu multi_step": ("dpu", {"mode": "multi_step"}),
    "dpu fixed": ("dpu", {"mode": "fixed"}),
    "admm": ("admm", {}),
    "cdp_dtc intended": ("cdp_dtc", {"mode": "intended"}),
    "cdp_dtc code_faithful": ("cdp_dtc", {"mode": "code_faithful"}),
    # the same methods with the budget's distillation from the dense model (KL at T=4, alpha 0.7): an option of
    # every method, compared here with plain finetune at the same steps (the teacher's forward passes are extra)
    "finetune + distill": ("finetune", {}, True),
    "iterative ramp 0.3 + distill": ("iterative", {"ramp_fraction": 0.3}, True),
    "dpu fixed + distill": ("dpu", {"mode": "fixed"}, True),
    # not a seed method: the layer-wise least-squares refit under the mask (OBC/SparseGPT's problem), then finetune
    "reconstruct": ("reconstruct", {}),
    "reconstruct + distill": ("reconstruct", {}, True),
    "reconstruct, refit only (0 steps)": ("reconstruct", {}, False, 0),
    # plain fine-tuning given the refit's wall time on the demo (refit ~2x a 60-step finetune): equal cost, not steps
    "finetune, 180 steps": ("finetune", {}, False, 180),
    "reconstruct, 4 calibration batches": ("reconstruct", {"calibration_batches": 4}),
    "finetune, 100 steps": ("finetune", {}, False, 100),
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
    ap.add_argument("--seeds", default="0", help="recovery seeds (batch order, DPU/ADMM randomness), e.g. 0,1,2: "
                    "every variant runs once per seed and the table reports the mean and the paired difference")
    args = ap.parse_args()
    seeds = [int(s) for s in str(args.seeds).split(",")]
    torch.manual_seed(0)
    data = load_dataset("mnist-5k", val_fraction=0.2, seed=0)
    dense = load_or_train_demo(Path(args.demo_cache), data, seed=0)
    tag = f"{args.structure}{int(round(args.ratio * 100))}"
    out = Path(args.out or f"scripts/results/recovery_methods_{tag}.md")
    rows_path = out.with_suffix(".jsonl")
    done = {}  # (label, seed) -> row; rows written before --seeds existed are seed 0
    if rows_path.is_file():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["label"], r.get("seed", 0))] = r
    budget = RecoveryBudget(finetune_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            bn_recalibration_batches=10)
    convs = [n for n, m in dense.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    st = get_structure(args.structure)
    spec = {"structure": st.name, "ratio": args.ratio}
    plan = PruningPlan(ratios={}, structures={n: dict(spec) for n in convs})
    x = torch.randn(1, *data.input_shape)

    def record(row):
        done[(row["label"], row["seed"])] = row
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        write_table(out, done, args, len(convs))
        print(json.dumps(row), flush=True)

    if ("dense (no pruning, no training)", 0) not in done:
        record({"label": "dense (no pruning, no training)", "seed": 0, "accuracy": evaluate(dense, data), "seconds": 0})
    pruned, _, _ = apply_plan(dense, plan, x)
    target = target_zero_fraction(pruned)
    if ("pruned, no recovery", 0) not in done:
        record({"label": "pruned, no recovery", "seed": 0, "accuracy": evaluate(pruned, data),
                "zeros": delivered_zero_fraction(pruned, convs), "target_zeros": target, "seconds": 0})
    for seed in seeds:
        if ("dense + same budget (finetune)", seed) not in done:
            t = time.perf_counter()
            m = recover(copy.deepcopy(dense), data, budget, method="finetune", seed=seed)
            record({"label": "dense + same budget (finetune)", "seed": seed, "accuracy": evaluate(m, data),
                    "seconds": time.perf_counter() - t})
        for label, (method, params, *extra) in VARIANTS.items():
            if (label, seed) in done or (args.only and label not in args.only):
                continue
            distill = bool(extra and extra[0])
            steps = extra[1] if len(extra) > 1 else budget.finetune_steps
            b = dataclasses.replace(budget, method=(method,), method_params={method: params} if params else {},
                                    distill=distill, finetune_steps=steps)
            notes = []
            t = time.perf_counter()
            m = recover(copy.deepcopy(pruned), data, b, teacher=dense, method=method,  # distils if b.distill
                        log=notes.append, seed=seed)
            record({"label": label, "seed": seed, "method": method, "params": params, "distill": distill,
                    "accuracy": evaluate(m, data),
                    "zeros": delivered_zero_fraction(m, convs), "target_zeros": target,
                    "seconds": time.perf_counter() - t, "notes": notes})
    write_table(out, done, args, len(convs))


def _order(label: str) -> int:
    fixed = ["dense (no pruning, no training)", "dense + same budget (finetune)", "pruned, no recovery", *VARIANTS]
    return fixed.index(label) if label in fixed else len(fixed)


def write_table(out: Path, done, args, n_layers: int) -> None:
    """One row per variant: mean accuracy over the seeds it ran, each seed's figure, and the mean paired difference
    (same seed, so the same batch order) against the dense model with the same budget and against finetune."""
    by_label = {}
    for (label, seed), r in done.items():
        by_label.setdefault(label, {})[seed] = r
    ref = {s: r["accuracy"] for s, r in by_label.get("dense + same budget (finetune)", {}).items()}
    ft = {s: r["accuracy"] for s, r in by_label.get("finetune", {}).items()}

    def paired(runs, base):
        diffs = [runs[s]["accuracy"] - base[s] for s in runs if s in base]
        if not diffs:
            return ""
        mean = statistics.mean(diffs)
        if len(diffs) == 1:
            return f"{100 * mean:+.2f}"
        return f"{100 * mean:+.2f} ± {100 * statistics.stdev(diffs) / len(diffs) ** 0.5:.2f}"

    lines = [f"# Recovery methods at an equal step budget: demo model, MNIST-5k, {args.structure} {args.ratio:g} on "
             f"{n_layers} 3x3 convs", "",
             f"`python scripts/bench_recovery_methods.py --structure {args.structure} --ratio {args.ratio:g} "
             f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr:g} --seeds {args.seeds}` (SGD "
             f"momentum 0.9, cosine, wd 5e-4, 10 BN recalibration batches; validation split of 1,000 images). "
             f"Differences are paired by recovery seed (same batch order): mean ± standard error over the seeds.", "",
             "| variant | mean val. accuracy | per seed | vs dense same budget (pp) | vs finetune (pp) | "
             "zeros delivered / target | seconds (mean) |",
             "|---|---|---|---|---|---|---|"]
    for label in sorted(by_label, key=_order):
        runs = by_label[label]
        accs = [runs[s]["accuracy"] for s in sorted(runs)]
        first = runs[min(runs)]
        z = f"{first['zeros']:.4f} / {first['target_zeros']:.4f}" if "zeros" in first else ""
        per_seed = " ".join(f"{a:.3f}" for a in accs)
        lines.append(f"| {label} | {sum(accs) / len(accs):.4f} | {per_seed} | {paired(runs, ref)} | "
                     f"{paired(runs, ft) if 'method' in first else ''} | {z} | "
                     f"{sum(r['seconds'] for r in runs.values()) / len(runs):.0f} |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
