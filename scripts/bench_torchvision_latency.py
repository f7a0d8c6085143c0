"""Benchmark: latency-only searches for torchvision models at 224x224 on ONNX Runtime CPU; for every model on the
front, MACs reduction against the speedup measured interleaved with the dense model in the same window.

Without data, the search's first objective is the fraction of MACs a plan keeps (maximised) and the second its
measured latency (minimised): the front holds, for each latency, the plan that keeps the most compute. Comparing
MACs reduction with measured speedup shows where FLOPs stop predicting time on this device.

    python scripts/bench_torchvision_latency.py --models resnet18 mobilenet_v2 --trials 30 --report tv.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from hwprune.config import load_profile
from hwprune.latency.base import MeasureSettings
from hwprune.results import retime_front, write_results
from hwprune.search import SearchConfig, run_search
from hwprune.workload import build_workload


def bench_model(name: str, args) -> pd.DataFrame:
    out = Path(args.out) / name
    workload = build_workload(f"torchvision:{name}", "none", args.search_space, input_shape=(3, 224, 224),
                              seed=args.seed)
    profile = load_profile(args.profile)
    cfg = SearchConfig(out_dir=out, trials=args.trials, seed=args.seed, progress=True)
    t0 = time.perf_counter()
    study = run_search(workload, [profile], cfg)
    minutes = (time.perf_counter() - t0) / 60
    tables = write_results(study, workload, out)
    df, front = tables["trials"], tables["pareto"]
    dense = df[df.role == "dense"].iloc[0]
    settings = MeasureSettings(warmup=5, min_repeats=30, max_repeats=200, target_rel_ci=0.01, time_cap_s=8.0)
    rows = []
    for r, pair in retime_front(workload, out, df, front[front.role != "dense"], profile, settings):
        rows.append({"model": name, "trial": int(r.trial), "macs_G": r.macs / 1e9,
                     "macs_reduction": dense.macs / r.macs, "dense_ms": pair.reference.median_ms,
                     "pruned_ms": pair.candidate.median_ms, "measured_speedup": pair.reference.median_ms / pair.candidate.median_ms,
                     "speedup_paired": 1.0 / pair.pair_ratio_median,
                     "speedup_per_macs_reduction": (pair.reference.median_ms / pair.candidate.median_ms) / (dense.macs / r.macs)})
    print(f"{name}: {len(df)} trials in {minutes:.1f} min, {len(front)} on the front", flush=True)
    return pd.DataFrame(rows).sort_values("macs_reduction")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--search-space", default="filters")
    ap.add_argument("--out", default="runs/bench-torchvision")
    ap.add_argument("--report", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    table = pd.concat([bench_model(m, args) for m in args.models], ignore_index=True)
    text = table.to_markdown(index=False, floatfmt=".3g")
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
