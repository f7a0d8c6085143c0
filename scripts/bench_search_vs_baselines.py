"""Benchmark: does the search beat what a practitioner gets by hand? One search (warm-started with the uniform
sweep and a global-magnitude plan) against uniform, global-magnitude and random plans evaluated with the same
trial pipeline and recovery budget, on the demo model or a VGG-style CNN this script trains itself (MNIST-5k).

Reported: hypervolume of the front vs each baseline's (in-search latencies, reference point stated), then the front
and the uniform plans re-timed after the search, each model alone in a fresh process over rotating rounds
(``hwprune.results.retime_alone``, the ground truth of ``hwprune verify``), and the best speedup within 0.5 / 1 / 2 pp
of dense for both.

    nice -n 19 python scripts/bench_search_vs_baselines.py --model demo --trials 30 --out runs/bvb-demo \
        --report scripts/results/search_vs_baselines_demo.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_models:vgg_small

from hwprune.baselines import (HEADROOM_TARGET, meter_for_run, run_baselines,  # noqa: E402
                               write_baseline_summary)
from hwprune.config import load_profile  # noqa: E402
from hwprune.hypervolume import (Reference, best_speedup_within, ceiling_at_floor,  # noqa: E402
                                 drop_allowed_at_floor, hypervolume)
from hwprune.results import retime_alone, write_results  # noqa: E402
from hwprune.search import SearchConfig, run_search  # noqa: E402
from hwprune.workload import build_workload  # noqa: E402

VGG_FACTORIES = {"vgg": "vgg_small", "vgg-wide": "vgg_wide"}  # --model -> bench_models factory


def vgg_workload(out: Path, space: str, seed: int, model_name: str = "vgg"):
    """A VGG-style CNN trained once on MNIST-5k (3 epochs, like the demo) and cached in the run directory."""
    import bench_models

    from hwprune.data import load_dataset
    from hwprune.recover import evaluate, train

    factory = VGG_FACTORIES[model_name]
    weights = out / f"{factory}.pt"
    if not weights.is_file():
        data = load_dataset("mnist-5k", seed=seed)
        torch.manual_seed(seed)
        model = getattr(bench_models, factory)()
        train(model, data, steps=3 * math.ceil(len(data.train) / 64), lr=0.05, batch_size=64, seed=seed)
        print(f"{factory} trained: validation accuracy {evaluate(model, data):.4f}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
    return build_workload(f"bench_models:{factory}", "mnist-5k", space, weights=str(weights), run_dir=out, seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["demo", *VGG_FACTORIES], default="demo")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--profile", default="cpu-1thread")
    ap.add_argument("--search-space", default="demo")
    ap.add_argument("--sampler", default="nsga2")
    ap.add_argument("--global-ratios", type=float, nargs="*", default=[0.25, 0.5, 0.75], help="none: skip")
    ap.add_argument("--random-count", type=int, default=None, help="random plans (default: as many as --trials; 0: skip)")
    ap.add_argument("--proposals", action="store_true", help="also enqueue the greedy hardware-aware proposals")
    ap.add_argument("--no-warm-start", action="store_true")
    ap.add_argument("--max-drop", type=float, default=None,
                    help="the search's --max-drop (accuracy units): candidates worse than dense minus this are "
                         "infeasible for the sampler")
    ap.add_argument("--no-retime", action="store_true")
    ap.add_argument("--retime-rounds", type=int, default=3, help="rounds of timing every model alone")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    out = Path(args.out)
    t0 = time.perf_counter()
    workload = (build_workload("demo", "mnist-5k", args.search_space, run_dir=out, seed=args.seed)
                if args.model == "demo" else vgg_workload(out, args.search_space, args.seed, args.model))
    profile = load_profile(args.profile)
    cfg = SearchConfig(out_dir=out, trials=args.trials, seed=args.seed, sampler=args.sampler, progress=False,
                       proposals=args.proposals, warm_start=not args.no_warm_start, max_drop=args.max_drop)
    t1 = time.perf_counter()
    study = run_search(workload, [profile], cfg)
    t_search = time.perf_counter() - t1
    tables = write_results(study, workload, out)
    meter = meter_for_run(study, workload, out)
    t2 = time.perf_counter()
    done = {p.parent.name for p in out.glob("baselines/*/metrics.json")}
    if args.global_ratios:
        run_baselines(workload, meter, out, "global", args.global_ratios, seed=args.seed, existing=done)
    count = args.trials if args.random_count is None else args.random_count
    if count > 0:
        run_baselines(workload, meter, out, "random", count=count, seed=args.seed, existing=done)
    t_base = time.perf_counter() - t2
    summary = write_baseline_summary(study, out, tables)

    df, front = tables["trials"], tables["pareto"]
    dense = df[df.role == "dense"].iloc[0]
    lines = [
        f"`{args.model}` on MNIST-5k, profile `{profile.name}`, search space `{args.search_space}`, sampler "
        f"{args.sampler}, {len(df)} trials (warm start: {', '.join(study.user_attrs.get('warm_start') or []) or 'none'}; "
        f"proposals: {', '.join(study.user_attrs.get('proposals') or []) or 'none'}"
        f"{'' if args.max_drop is None else f'; --max-drop {args.max_drop:g}'}); "
        f"search {t_search / 60:.1f} min, global + random baselines {t_base / 60:.1f} min; model ready in "
        f"{t1 - t0:.0f} s.",
        f"Dense (trial 0, same recovery budget): accuracy {dense.accuracy:.4f}, {dense.macs / 1e6:.2f} M MACs.",
        "",
        f"In-search latencies; {summary['reference']}.",
        "",
        "| set | plans | hypervolume | front / set | best speedup within 0.5 / 1 / 2 pp |",
        "|---|---|---|---|---|",
    ]
    hv, best = summary["hypervolume"], summary["best_speedup_within_pp"]
    counts = pd.read_csv(out / "baselines.csv").method.value_counts().to_dict()
    for name in ["search", "uniform", "global", "random"]:
        if name not in hv:
            continue
        r = summary["relative"].get(name)
        rel = "" if name == "search" else (f"{r:.3f}x" if r else "baseline has no area")
        n = len(df) if name == "search" else counts.get(name, 0)
        b = " / ".join(f"{best[name][k]:.2f}x" for k in ("0.5", "1", "2"))
        lines.append(f"| {name} | {n} | {hv[name]:.4g} | {rel} | {b} |")
    lines += ["", f"Front without the warm-start trials: hypervolume {hv['search_without_warm_start']:.4g}. "
              f"Within 5% of the final hypervolume by trial {summary['trial_within_5pct_of_final_hypervolume']}.",
              ""] + [f"- {v}" for v in summary["verdict"]]

    if not args.no_retime:
        # Front models and the uniform plans, each timed alone in a fresh process (hwprune verify's ground truth).
        uniform_trials = [int(t) for t in pd.read_csv(out / "baselines.csv").query("method == 'uniform'").trial.dropna()]
        rows_ = pd.concat([front, df[df.trial.isin(uniform_trials) & ~df.trial.isin(front.trial)]])
        rows_ = rows_[rows_.role != "dense"]
        alone = retime_alone(workload, out, df, rows_, profile, rounds=args.retime_rounds)
        timed = []
        for _, r in rows_.iterrows():
            sp, lo, hi = alone[int(r.trial)]
            timed.append({"trial": int(r.trial), "set": "uniform" if int(r.trial) in uniform_trials else "search",
                          "on_front": int(r.trial) in set(front.trial), "plan": r.plan_summary[:50],
                          "accuracy": r.accuracy, "acc_delta_pp": 100 * (r.accuracy - dense.accuracy),
                          "speedup": sp, "speedup_range": f"{lo:.2f}-{hi:.2f}", "macs_reduction": dense.macs / r.macs})
        timed = pd.DataFrame(timed).sort_values("speedup")
        ref = Reference(1.0, float(dense.accuracy), summary["reference_point"]["max_accuracy_drop"])
        front_pts = [(1.0 / s, a) for s, a in zip(timed[timed.on_front].speedup, timed[timed.on_front].accuracy)]
        uni = timed[timed.set == "uniform"]
        uni_pts = [(1.0 / s, a) for s, a in zip(uni.speedup, uni.accuracy)]
        hv_f, hv_u = hypervolume(front_pts, ref), hypervolume(uni_pts, ref)
        bf, bu = best_speedup_within(front_pts, ref, 0.01), best_speedup_within(uni_pts, ref, 0.01)
        lines += ["", f"Re-timed after the search, every model ALONE in a fresh process, {args.retime_rounds} rounds in "
                  "rotating order (`hwprune.results.retime_alone`, hwprune verify's ground truth; speedup = median "
                  "over rounds of dense / model, with its range):", "",
                  timed.to_markdown(index=False, floatfmt=".4g"), "",
                  f"Re-timed hypervolume: front {hv_f:.4g} vs uniform {hv_u:.4g} "
                  f"({hv_f / hv_u:.3f}x)." if hv_u > 0 else f"Re-timed hypervolume: front {hv_f:.4g}, uniform 0.",
                  f"Best speedup within 1 pp of dense: front {bf:.2f}x vs best uniform {bu:.2f}x "
                  f"({bf / bu:.2f}x; goal >= 1.3x: {'MET' if bf / bu >= 1.3 else 'NOT MET'})."]
        summary["retimed"] = {"hypervolume_front": hv_f, "hypervolume_uniform": hv_u, "best_within_1pp_front": bf,
                              "best_within_1pp_uniform": bu}
        if hv_u > 0:
            floor = 1.0 / float(timed.speedup.max())  # the fastest model re-timed: where latency stops falling
            allowed = drop_allowed_at_floor(uni_pts, floor, ref, HEADROOM_TARGET)
            lines.append(f"Headroom, re-timed: the fastest model ran {1 / floor:.2f}x faster than dense; a lossless "
                         f"model that fast would make {ceiling_at_floor(uni_pts, floor, ref):.3f}x uniform's "
                         f"hypervolume, so {HEADROOM_TARGET:.2f}x " + ("is out of reach" if allowed is None else
                                                     f"needs a model that fast within {100 * allowed:.2f} pp") + ".")
    worst = min(((v, m) for m, v in summary["relative"].items() if v), default=(float("inf"), "no baseline"))
    lines.append(f"Goal front hypervolume >= {HEADROOM_TARGET:.2f}x the best baseline's (in-search latencies): "
                 f"{'MET' if worst[0] >= HEADROOM_TARGET else 'NOT MET'} ({worst[0]:.3f}x {worst[1]}'s).")
    (out / "bench_summary.json").write_text(json.dumps(summary, indent=2, default=float))
    text = "\n".join(lines)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
