"""Benchmark (d): a demo search with latency-lookup-table screening versus one that measures every trial, each
given the same wall time.

Both runs search the demo model on MNIST-5k under a latency budget on one device profile (default
``cpu-1thread``). The screened run skips measurement and training of every candidate the table predicts to be over
the budget by more than ``--margin``; such trials are recorded as infeasible with their predicted latency. Reported
per run: finished trials, trials measured / screened out / trained, trials per hour, and the hypervolume of the
feasible (accuracy, latency) front, with latency normalised by the budget and reference point (accuracy 0,
latency = budget). The table's build time is reported on its own (it is built once per model, space and device
and reused by every later search). Prints a markdown table and writes it to ``--out``.

Screening is used through ``SearchConfig(lut_path=..., screen_margin=...)`` when hwprune.search has those fields;
otherwise (``--mode direct``, the default until then) this script wraps ``hwprune.search.run_trial`` with the
screening itself: same study, same sampler, same trial code for every candidate that is measured.

  python scripts/bench_screening.py --minutes 10 --out screening.md
  python scripts/bench_screening.py --quick                  # 2 x 60 s searches, 10 recovery steps
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu-1thread")
    ap.add_argument("--space", default="demo")
    ap.add_argument("--data", default="mnist-5k")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall time of each search")
    ap.add_argument("--budget-frac", type=float, default=0.3,
                    help="latency budget as a fraction of the dense model's measured latency")
    ap.add_argument("--budget-ms", type=float, default=None, help="absolute budget (overrides --budget-frac)")
    ap.add_argument("--margin", type=float, default=0.1, help="screen out predictions over budget x (1 + margin)")
    ap.add_argument("--sampler", default="nsga2")
    ap.add_argument("--finetune-steps", type=int, default=None, help="override the space's recovery steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("auto", "config", "direct"), default="auto",
                    help="config: SearchConfig(lut_path, screen_margin); direct: wrap run_trial here; auto: config "
                         "when SearchConfig has the fields")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hwprune-bench-screening"),
                    help="run directories and the trained demo model (kept, so later runs skip training it)")
    ap.add_argument("--quick", action="store_true", help="60 s per search, 10 recovery steps, light LUT settings")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def hypervolume_2d(points: Sequence[Tuple[float, float]], ref: Tuple[float, float] = (0.0, 1.0)) -> float:
    """Area dominated by (accuracy up, latency down) points and bounded by ``ref`` = (accuracy, latency)."""
    pts = sorted((lat, acc) for acc, lat in points if acc > ref[0] and lat < ref[1])
    area, best_acc = 0.0, ref[0]
    # sweep latency from the budget downwards: each point adds the strip its accuracy gains over faster points
    front = []
    for lat, acc in pts:
        if acc > best_acc:
            front.append((lat, acc))
            best_acc = acc
    for k, (lat, acc) in enumerate(front):
        nxt = front[k + 1][0] if k + 1 < len(front) else ref[1]
        area += (nxt - lat) * (acc - ref[0])
    return area


def screened_run_trial(original, screen, profile_name: str):
    """A drop-in for hwprune.trial.run_trial that consults the table first (direct mode)."""
    from hwprune.costs import measure_costs
    from hwprune.plan import apply_plan
    from hwprune.trial import TrialOutcome

    def latency_entry(predicted_ms: float, reference_ms: float):
        try:  # the current trial module: drift-corrected pairs
            from hwprune.latency.measure import pair_from_samples
            from hwprune.trial import ProfileLatency

            return ProfileLatency(pair_from_samples([predicted_ms], [reference_ms], interleaved=False), reference_ms)
        except ImportError:  # older trial module: plain statistics
            from hwprune.latency.measure import summarize

            return summarize([predicted_ms])

    def run_trial(workload, plan, meter, workdir, budget_ms=None, budget_profile=None, *args, **kwargs):
        dense = kwargs.get("evaluate_over_budget", False)
        if dense or plan.structures:
            return original(workload, plan, meter, workdir, budget_ms, budget_profile, *args, **kwargs)
        if screen.reference_ms is None and getattr(meter, "reference_ms", None):
            screen.reference_ms = meter.reference_ms.get(profile_name)  # predict relative to the meter's dense
        ok, predicted = screen.should_measure_plan(plan)
        if ok:
            return original(workload, plan, meter, workdir, budget_ms, budget_profile, *args, **kwargs)
        t0 = time.perf_counter()
        model, plan2, *_ = apply_plan(workload.model, plan, workload.example_input)
        costs = measure_costs(model, workload.example_input)
        ref = getattr(meter, "reference_ms", {}).get(profile_name, predicted)
        outcome = TrialOutcome(plan2, costs, {profile_name: latency_entry(predicted, ref)}, feasible=False,
                               reason=screen.reason(predicted), seconds={"prune": time.perf_counter() - t0})
        return outcome, model

    return run_trial


def run_one(label, wl, profile, cfg_kwargs, screen, mode, log) -> dict:
    import optuna

    import hwprune.search as search

    cfg = search.SearchConfig(**cfg_kwargs)
    original = search.run_trial
    if screen is not None and mode == "direct":
        search.run_trial = screened_run_trial(original, screen, profile.name)
    t0 = time.perf_counter()
    try:
        study = search.run_search(wl, [profile], cfg, log=log)
    finally:
        search.run_trial = original
    wall = time.perf_counter() - t0
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    feasible = [t for t in done if t.user_attrs.get("feasible", True)]
    screened = [t for t in done if t.user_attrs.get("screened") or "not measured" in t.user_attrs.get("reason", "")]
    trained = [t for t in done if t.values and t.values[0] > 0]
    budget = cfg.latency_budget_ms
    points = [(t.values[0], t.values[1] / budget) for t in feasible if t.values]
    return {
        "run": label,
        "wall_s": wall,
        "finished": len(done),
        "measured": len(done) - len(screened),
        "screened": len(screened),
        "trained": len(trained),
        "feasible": len(feasible),
        "trials_per_hour": len(done) / wall * 3600,
        "feasible_per_hour": len(feasible) / wall * 3600,
        "hypervolume": hypervolume_2d(points),
        "best_acc": max((a for a, _ in points), default=float("nan")),
        "front": sorted(points, key=lambda p: p[1]),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    import torch

    import hwprune.search as search
    from hwprune.config import load_profile
    from hwprune.latency import MeasureSettings
    from hwprune.latency.lut import LutScreen, build_lut
    from hwprune.workload import build_workload

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    minutes = args.minutes
    entry_settings = None
    if args.quick:
        minutes = min(minutes, 1.0)
        args.finetune_steps = args.finetune_steps or 10
        entry_settings = MeasureSettings(warmup=3, min_repeats=10, max_repeats=60, target_rel_ci=0.03, time_cap_s=0.5)
    fields = {f.name for f in dataclasses.fields(search.SearchConfig)}
    mode = args.mode
    if mode == "auto":
        mode = "config" if {"lut_path", "screen_margin"} <= fields else "direct"
    if mode == "config" and not {"lut_path", "screen_margin"} <= fields:
        print("SearchConfig has no lut_path/screen_margin yet; use --mode direct", file=sys.stderr)
        return 2

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    log = lambda s: print("  " + s, flush=True)  # noqa: E731
    profile = load_profile(args.profile)
    wl = build_workload("demo", args.data, args.space, run_dir=root, seed=args.seed, log=log)
    if args.finetune_steps is not None:
        wl.space = dataclasses.replace(wl.space, recovery=dataclasses.replace(
            wl.space.recovery, finetune_steps=args.finetune_steps))

    print(f"== building the latency table for the demo model on {profile.name}", flush=True)
    table = build_lut(wl, profile, progress=False, settings=entry_settings, log=log)
    lut_path = table.save(root / f"lut-{profile.name}.json")
    budget = args.budget_ms or args.budget_frac * table.dense_ms
    print(f"   {len(table)} entries in {table.build_seconds:.1f} s; dense {table.dense_ms:.3f} ms; "
          f"budget {budget:.3f} ms; mode {mode}", flush=True)

    base = dict(trials=100000, timeout_s=minutes * 60, latency_budget_ms=budget, sampler=args.sampler, seed=args.seed,
                progress=False)
    rows = []
    for label in ("measure every trial", "LUT screening"):
        out = root / ("plain" if label.startswith("measure") else "screened")
        shutil.rmtree(out, ignore_errors=True)
        kw = dict(base, out_dir=out)
        screen = None
        if label == "LUT screening":
            screen = LutScreen(table, budget, args.margin)
            if mode == "config":
                kw.update(lut_path=str(lut_path), screen_margin=args.margin)
        print(f"== {label}: {minutes:g} min", flush=True)
        row = run_one(label, wl, profile, kw, screen, mode, log)
        rows.append(row)
        print(f"   {row['finished']} trials ({row['screened']} screened out, {row['trained']} trained), "
              f"hypervolume {row['hypervolume']:.4f}", flush=True)

    head = (f"LUT screening vs measuring every trial: demo model, {args.data}, space `{args.space}`, profile "
            f"`{profile.name}`, budget {budget:.3f} ms ({budget / table.dense_ms:.0%} of dense), margin "
            f"{args.margin:.0%}, sampler {args.sampler}, {minutes:g} min per search, mode {mode}"
            f"{', quick settings' if args.quick else ''}.\nLUT: {len(table)} entries, built in "
            f"{table.build_seconds:.1f} s (once; not counted in the searches' wall time).\n\n")
    lines = [
        "| run | wall s | finished | measured | screened out | trained | feasible | trials/h | feasible/h | "
        "hypervolume | best acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['wall_s']:.0f} | {r['finished']} | {r['measured']} | {r['screened']} | "
            f"{r['trained']} | {r['feasible']} | {r['trials_per_hour']:.0f} | {r['feasible_per_hour']:.0f} | "
            f"{r['hypervolume']:.4f} | {r['best_acc']:.4f} |"
        )
    text = head + "\n".join(lines) + (
        "\n\nHypervolume of the feasible (accuracy, latency / budget) front, reference point (0, 1): higher is "
        "better; 1.0 would be 100% accuracy at zero latency.\n")
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
