"""Benchmark (issue 11, cheap fidelities): the same search with and without cheap-fidelity screening.

Two runs of ``hwprune search`` on one model, data, space, profile, seed and trial count; the second with
``--screen-fidelity`` (candidates scored right after pruning, BN recalibration only; trained only when no faster
trained trial beats them cheaply). Reported per run: wall time, trials trained / screened, the front's hypervolume
(``summary.json``: latency relative to dense x quality, reference point dense latency and dense - 5 pp), its ratio to
the uniform baseline's, the best speedup within 1 pp of dense, and the cheap/full rank agreement (Kendall tau).
Latencies are the in-search ones (both runs measured the same way); verification is off (not the subject here).

    python scripts/bench_fidelity_screen.py --trials 24 --out runs/screen \\
        --report scripts/results/fidelity_screen_demo.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def run(out: Path, args, screened: bool) -> dict:
    cmd = [sys.executable, "-m", "hwprune.cli", "search", "--model", args.model, "--data", args.data,
           "--search-space", args.search_space, "--profile", args.profile, "--trials", str(args.trials),
           "--seed", str(args.seed), "--out", str(out), "--verify-rounds", "0", "--no-progress"]
    if screened:
        cmd += ["--screen-fidelity", "--screen-fidelity-margin", str(args.margin)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    minutes = (time.time() - t0) / 60
    trials = pd.read_csv(out / "trials.csv")
    summary = json.loads((out / "summary.json").read_text())
    screen = summary.get("fidelity_screen", {})
    return {
        "minutes": minutes,
        "trained": int((trials.state == "complete").sum()),
        "screened": int((trials.state == "screened").sum()),
        "hypervolume": summary["hypervolume"]["search"],
        "vs_uniform": summary.get("relative", {}).get("uniform"),
        "within_1pp": summary.get("best_speedup_within_pp", {}).get("search", {}).get("1"),
        "tau": screen.get("kendall_tau"),
        "pairs": screen.get("pairs"),
        "recover_s": float(trials.get("seconds:recover", pd.Series(dtype=float)).fillna(0).sum()),
    }


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="mnist-5k")
    ap.add_argument("--search-space", default="demo")
    ap.add_argument("--profile", default="cpu-1thread")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margin", type=float, default=0.01)
    ap.add_argument("--out", default="runs/screen")
    ap.add_argument("--report")
    args = ap.parse_args()
    out = Path(args.out)
    rows = {"every candidate trained": run(out / "full", args, False),
            f"--screen-fidelity (margin {args.margin:g})": run(out / "screened", args, True)}
    lines = ["# Cheap-fidelity screening: the same search with and without it", "",
             f"Command: `python scripts/bench_fidelity_screen.py --model {args.model} --data {args.data} "
             f"--search-space {args.search_space} --profile {args.profile} --trials {args.trials} --seed {args.seed} "
             f"--margin {args.margin:g}`", "",
             "Hypervolume: latency relative to dense (in-search) x quality, reference point (1.0, dense - 5 pp); "
             "'vs uniform': the front's hypervolume over the uniform warm-start plans'.", "",
             "| run | wall (min) | trained | screened | recovery time (s) | hypervolume | vs uniform | "
             "best speedup within 1 pp | cheap/full Kendall tau (pairs) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['minutes']:.1f} | {r['trained']} | {r['screened']} | {r['recover_s']:.0f} | "
                     f"{fmt(r['hypervolume'], '.4g')} | {fmt(r['vs_uniform'], '.3f')}x | "
                     f"{fmt(r['within_1pp'], '.2f')}x | {fmt(r['tau'], '.2f')} ({r['pairs'] or 'n/a'}) |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        Path(args.report).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
