"""Benchmark: does the least-squares refit after channel pruning (``reconstruct``) beat plain fine-tuning?

The demo model on MNIST-5k, uniform channel plans (every dependency group at one ratio, the search space's own
pruning and round_to), recovered with the demo space's budget (60 steps of batch 64, SGD 0.02) by: plain
fine-tuning; ``reconstruct`` (refit every narrowed conv and the classifier against the dense model on
``--calibration-batches`` training batches, then the same 60 steps); the refit alone (0 steps); and plain
fine-tuning with more steps, for an equal-wall-time comparison. Paired by recovery seed (same batch order);
accuracy on the held-out validation split (1,000 images).

    python scripts/bench_channel_refit.py --ratios 0.5,0.625,0.75,0.875 --seeds 0,1,2,3,4 \
        --out scripts/results/channel_refit_demo.md
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

from hwprune.plan import apply_plan
from hwprune.recover import evaluate, recover
from hwprune.workload import build_workload


def variants(calibration_batches: int, steps: int, long_steps: int):
    """label -> (method, its parameters, steps)."""
    refit = {"calibration_batches": calibration_batches}
    return {
        "finetune": ("finetune", {}, steps),
        "reconstruct": ("reconstruct", refit, steps),
        "reconstruct, refit only (0 steps)": ("reconstruct", refit, 0),
        f"finetune, {long_steps} steps": ("finetune", {}, long_steps),
    }


def paired(rows, label, base, ratio, seeds):
    d = [rows[(label, ratio, s)]["accuracy"] - rows[(base, ratio, s)]["accuracy"] for s in seeds]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
    return f"{100 * statistics.mean(d):+.2f} ± {100 * se:.2f}"


def write_table(path: Path, rows, args, ratios, seeds, labels, dense_acc) -> None:
    lines = ["# Least-squares refit after channel pruning vs fine-tuning: demo model, MNIST-5k, uniform plans", "",
             f"`python scripts/bench_channel_refit.py --ratios {args.ratios} --seeds {args.seeds} "
             f"--calibration-batches {args.calibration_batches} --long-steps {args.long_steps}` (the demo space's "
             f"recovery budget: {args.steps} steps of batch 64, SGD 0.02; validation split of 1,000 images). "
             f"Dense model {dense_acc:.4f}. Differences paired by recovery seed: mean ± standard error.", "",
             "| ratio | MACs kept | variant | mean val. accuracy | vs dense + same steps (pp) | vs finetune (pp) | seconds (mean) |",
             "|---|---|---|---|---|---|---|"]
    for r in ratios:
        for label in ["dense + same steps"] + labels:
            done = [s for s in seeds if (label, r, s) in rows]
            if not done:
                continue
            acc = statistics.mean(rows[(label, r, s)]["accuracy"] for s in done)
            sec = statistics.mean(rows[(label, r, s)]["seconds"] for s in done)
            full = len(done) == len(seeds) and all(("dense + same steps", r, s) in rows and ("finetune", r, s) in rows
                                                   for s in seeds)
            vs_dense = paired(rows, label, "dense + same steps", r, seeds) if full else ""
            vs_ft = paired(rows, label, "finetune", r, seeds) if full and label != "dense + same steps" else ""
            kept = rows[(label, r, done[0])].get("macs_kept", "")
            lines.append(f"| {r:g} | {kept} | {label} | {acc:.4f} | {vs_dense} | {vs_ft} | {sec:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.5,0.625,0.75,0.875")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--long-steps", type=int, default=120, help="fine-tuning steps for the equal-wall-time row")
    ap.add_argument("--calibration-batches", type=int, default=4)
    ap.add_argument("--run-dir", default="runs/bench-recovery", help="where the trained demo model is cached")
    ap.add_argument("--out", default="scripts/results/channel_refit_demo.md")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    w = build_workload("demo", "mnist-5k", "demo", run_dir=args.run_dir, seed=0)
    dense, data = w.model.eval(), w.data
    budget = dataclasses.replace(w.space.recovery, finetune_steps=args.steps)
    table = variants(args.calibration_batches, args.steps, args.long_steps)
    out = Path(args.out)
    rows_path = out.with_suffix(".jsonl")
    rows = {}
    if rows_path.is_file():  # resume: rows already measured are kept
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            rows[(r["label"], r["ratio"], r["seed"])] = r
    dense_acc = evaluate(dense, data)
    x = torch.randn(1, *data.input_shape)
    from hwprune.costs import count_macs

    dense_macs = count_macs(dense, x)

    def record(row):
        rows[(row["label"], row["ratio"], row["seed"])] = row
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        write_table(out, rows, args, ratios, seeds, list(table), dense_acc)
        print(json.dumps(row), flush=True)

    for seed in seeds:
        for r in ratios:
            pruned = apply_plan(dense, w.uniform_plan(r), x)[0]
            kept = round(count_macs(pruned, x) / dense_macs, 3)
            if ("dense + same steps", r, seed) not in rows:  # the unpruned model with the same steps, one per seed
                earlier = next((v for (lab, _, s), v in rows.items() if lab == "dense + same steps" and s == seed), None)
                if earlier is None:
                    t = time.perf_counter()
                    m = recover(copy.deepcopy(dense), data, dataclasses.replace(budget, method=("finetune",)), seed=seed)
                    earlier = {"accuracy": evaluate(m, data), "seconds": time.perf_counter() - t}
                record({"label": "dense + same steps", "ratio": r, "seed": seed, "accuracy": earlier["accuracy"],
                        "seconds": earlier["seconds"], "macs_kept": 1.0})
            for label, (method, params, steps) in table.items():
                if (label, r, seed) in rows:
                    continue
                b = dataclasses.replace(budget, method=(method,), method_params={method: params} if params else {},
                                        finetune_steps=steps)
                notes = []
                t = time.perf_counter()
                m = recover(copy.deepcopy(pruned), data, b, teacher=dense, seed=seed, log=notes.append)
                record({"label": label, "ratio": r, "seed": seed, "accuracy": evaluate(m, data),
                        "seconds": time.perf_counter() - t, "macs_kept": kept, "notes": notes})


if __name__ == "__main__":
    main()
