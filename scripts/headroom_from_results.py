"""How much lead over uniform the recorded search-vs-baselines runs could have shown at all.

Reads the re-timed tables of ``scripts/results/search_vs_baselines_*.md`` (each front model and uniform plan timed
after the search) and, per run, puts the uniform sweep's hypervolume beside two ceilings: the box ceiling (a
lossless model with no latency at all) and the floor ceiling (a lossless model as fast as the fastest plan the run
re-timed; latency stops falling with MACs on these small models). It also prints the largest accuracy drop a
model at that floor may have for the front to reach ``--target`` times uniform's hypervolume.

    python scripts/headroom_from_results.py [--target 1.10] [--out scripts/results/headroom_at_floor.md]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from hwprune.baselines import HEADROOM_TARGET
from hwprune.hypervolume import (DEFAULT_MAX_DROP, Reference, box_area, ceiling_at_floor, drop_allowed_at_floor,
                                 hypervolume)

RESULTS = Path(__file__).resolve().parent / "results"


def read_run(path: Path):
    """(dense accuracy, rows of (set, on_front, accuracy, speedup), whether timed alone, "model / space") or None
    without a table."""
    text = path.read_text()
    head = re.match(r"`([^`]+)` on [^,]+, profile `[^`]+`, search space `([^`]+)`", text)
    dense = re.search(r"Dense \(trial 0[^)]*\): accuracy ([0-9.]+)", text)
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = next((ln for ln in lines if re.match(r"\|\s*trial\s*\|\s*set", ln)), None)
    if dense is None or header is None:
        return None
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = []
    for ln in lines[lines.index(header) + 2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(cols) or not cells[0].isdigit():
            continue
        r = dict(zip(cols, cells))
        rows.append((r["set"], r["on_front"] == "True", float(r["accuracy"]), float(r["speedup"])))
    return float(dense.group(1)), rows, "speedup_range" in cols, f"{head.group(1)} / {Path(head.group(2)).stem}" if head else "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=float, default=HEADROOM_TARGET, help="the lead over uniform to test for reachability")
    ap.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP, help="accuracy floor of the reference box")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of search_vs_baselines_*.md reports")
    ap.add_argument("--latency-slack", type=float, default=0.0,
                    help="timing-noise allowance in the search's favour: every uniform plan taken this much slower "
                         "than measured and the floor this much faster (0.25: 25%%)")
    args = ap.parse_args(argv)

    out = [f"Reference box: relative latency 0..1 x accuracy from dense - {100 * args.max_drop:g} pp to dense; "
           f"latencies are the re-timed ones (alone in a fresh process where the table has speedup ranges)"
           + (f", uniform's {100 * args.latency_slack:g}% slower and the floor {100 * args.latency_slack:g}% faster "
              "than measured (--latency-slack; the lead column stays as timed)" if args.latency_slack else "") + ".", "",
           "| run | model / space | timing | uniform covers | front / uniform | fastest plan | box ceiling | floor ceiling | "
           f"drop allowed at the floor for {args.target:.2f}x |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for path in sorted(args.results.glob("search_vs_baselines_*.md")):
        run = read_run(path)
        if run is None or not run[1]:
            continue
        dense_acc, rows, alone, model = run
        ref = Reference(1.0, dense_acc, args.max_drop)  # latency relative to dense
        slow = 1.0 + args.latency_slack
        uniform = [(slow / s, a) for st, _, a, s in rows if st == "uniform"]
        front = [(1.0 / s, a) for st, on, a, s in rows if on]
        if not uniform:
            continue
        hv_u, hv_f = hypervolume(uniform, ref), hypervolume(front, ref)
        measured = hypervolume([(1.0 / s, a) for st, _, a, s in rows if st == "uniform"], ref)  # the lead as timed
        floor = 1.0 / max(s for *_, s in rows) / slow
        allowed = drop_allowed_at_floor(uniform, floor, ref, args.target)
        out.append(f"| {path.stem.replace('search_vs_baselines_', '')} | {model} | {'alone' if alone else 'interleaved'} | "
                   f"{100 * hv_u / box_area(ref):.0f}% | {hv_f / measured:.3f}x | {1 / floor:.2f}x | "
                   f"{ceiling_at_floor(uniform, 0.0, ref):.3f}x | {ceiling_at_floor(uniform, floor, ref):.3f}x | "
                   f"{'out of reach' if allowed is None else f'{100 * allowed:.2f} pp'} |")
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
