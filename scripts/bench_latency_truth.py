"""Benchmark: do the speedups a search reports agree with the same models timed alone, each in a fresh process?

For each model, one latency-only search (``--data none``) on the given profiles, run exactly as a user runs it
(the ``hwprune search`` command), ending with its built-in verification (``--verify-rounds``): the dense model and
every front model timed alone in fresh processes over rotating rounds. Reported per model and profile: the worst
and median relative error of reported vs isolated speedup, the isolated timing's own spread (half the relative
range over rounds), how many errors exceed 5% yet lie inside the model's own alone range (the truth's noise) and how
many lie outside both, and the measurement seconds per trial. ``--inprocess`` adds, for every profile, a copy with
``isolation: none`` (both models in the measuring process: the method before issue 7) for a same-run comparison.

    python scripts/bench_latency_truth.py --models demo,torchvision:resnet18,torchvision:mobilenet_v2 \
        --profiles cpu,cpu-1thread --trials 12 --rounds 3 --out runs/truth --report scripts/results/latency_truth.md
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from hwprune.verify import DISAGREES, NOISY

REPO = Path(__file__).resolve().parents[1]


def profile_copies(names, out: Path, inprocess: bool):
    """YAML copies of the named shipped profiles (and in-process variants), so the run records what it used."""
    paths = []
    for name in names:
        data = yaml.safe_load((REPO / "device_profiles" / f"{name}.yaml").read_text())
        p = out / f"{name}.yaml"
        p.write_text(yaml.safe_dump(data))
        paths.append(p)
        if inprocess:
            data = dict(data, measure={**(data.get("measure") or {}), "isolation": "none"})
            q = out / f"{name}-inprocess.yaml"
            q.write_text(yaml.safe_dump(data))
            paths.append(q)
    return paths


def run_model(model: str, profiles, args, out: Path) -> dict:
    run = out / model.replace(":", "_")
    run.mkdir(parents=True, exist_ok=True)
    if model == "demo" and args.demo_cache and Path(args.demo_cache).is_file():
        shutil.copy(args.demo_cache, run / "demo_model.pt")  # the demo needs its trained weights only once
    cmd = [sys.executable, "-m", "hwprune.cli", "search", "--model", model, "--data", "none",
           "--search-space", "demo" if model == "demo" else "filters", "--trials", str(args.trials),
           "--out", str(run), "--no-progress", "--verify-rounds", str(args.rounds), "--seed", str(args.seed)]
    if model != "demo":
        cmd += ["--input-shape", args.input_shape]
    for p in profiles:
        cmd += ["--profile", str(p)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    (run / "bench.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{model}: search failed (exit {proc.returncode}); see {run / 'bench.log'}")
    return {"run": run, "wall_s": wall}


def summarize(model: str, run: Path) -> list:
    v = pd.read_csv(run / "verify.csv")
    trials = pd.read_csv(run / "trials.csv")
    rows = []
    for prof, g in v.groupby("profile", sort=False):
        sec = trials.get("seconds:measure")
        rows.append({
            "model": model,
            "profile": prof,
            "front models": len(g),
            "reported speedups": f"{g.reported_speedup.min():.2f}-{g.reported_speedup.max():.2f}x",
            "worst |error|": f"{100 * g.rel_error.abs().max():.1f}%",
            "median |error|": f"{100 * g.rel_error.abs().median():.1f}%",
            "alone spread (max)": f"{100 * g.isolated_spread.max():.1f}%",
            "within 5%": f"{int((g.rel_error.abs() <= 0.05).sum())}/{len(g)}",
            # off by more than 5% but inside the model's own alone range over the rounds (the truth's noise)
            "else inside alone range": int((g.verdict == NOISY).sum()),
            "outside both": int((g.verdict == DISAGREES).sum()),
            "measure s/trial": f"{sec.mean():.1f}" if sec is not None else "",
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,torchvision:resnet18,torchvision:mobilenet_v2")
    ap.add_argument("--profiles", default="cpu,cpu-1thread")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--input-shape", default="3,224,224")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inprocess", action="store_true", help="also run each profile with isolation: none")
    ap.add_argument("--demo-cache", help="a trained demo_model.pt to reuse")
    ap.add_argument("--out", default="runs/latency-truth")
    ap.add_argument("--report", help="markdown file to write")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profiles = profile_copies(args.profiles.split(","), out, args.inprocess)
    rows, details = [], []
    for model in args.models.split(","):
        r = run_model(model, profiles, args, out)
        rows += summarize(model, r["run"])
        v = pd.read_csv(r["run"] / "verify.csv")
        v.insert(0, "model", model)
        details.append(v)
        print(f"{model}: search + verify in {r['wall_s']:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    detail = pd.concat(details)
    text = ["# Reported vs isolated speedups", "",
            f"`python scripts/bench_latency_truth.py --models {args.models} --profiles {args.profiles} "
            f"--trials {args.trials} --rounds {args.rounds}{' --inprocess' if args.inprocess else ''}`", "",
            table.to_markdown(index=False), "", "## Every front model", "",
            detail.to_markdown(index=False, floatfmt=".3f"), ""]
    print(table.to_string(index=False))
    if args.report:
        Path(args.report).write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
