"""Benchmark: where does a candidate's in-pair slowdown on the 2-thread profile come from? (issue 7)

On the `cpu` profile, large resnet18 prunes sometimes ran 8-13% slower in their pair window than alone, in some
runs and not in others. Three suspects, told apart per fresh candidate process:
  alone     the candidate's worker timed with no other worker in existence (steady state, many calls)
  frozen    the same worker, while the dense model's worker exists (it ran, then was frozen with SIGSTOP)
  pair      the same worker in the search's protocol: alternating blocks with the dense worker, warm-up per switch
  again     alone again after the dense worker has ended
If `frozen`/`pair` differ from `alone` inside one process, the pair itself slows the candidate; if `alone` differs
from process to process while the ratios inside each stay near 1, the slowdown belongs to the process (where its
memory landed), and a single fresh process, in the search or in the ground truth, is a sample of it.

``--sandwich-rounds N`` tests a remedy for the ground truth's own noise instead: uniform prunes at 0.3/0.5/0.75,
each timed alone in a fresh process with the dense model timed alone right before and right after it (order rotated
per round); per round each speedup is computed against the first dense reading only (``hwprune verify``'s scheme)
and against the geometric mean of its two neighbours (the sandwich). The spread over rounds says which is steadier.

    python scripts/bench_pair_interference.py --model torchvision:resnet18 --ratio 0.3 --processes 8 \
        --report scripts/results/pair_interference_resnet18.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def steady(proc, calls: int) -> float:
    return statistics.median(proc.block(calls, untimed=5))


def one_process(profile, cand: str, dense: str, shape, calls: int, blocks: int) -> dict:
    from hwprune.latency.worker import ModelProcess

    out = {}
    with ModelProcess(profile, cand, shape) as c:
        out["alone"] = steady(c, calls)
        with ModelProcess(profile, dense, shape) as d:
            c.pause()
            out["dense_alone"] = steady(d, calls // 2)
            d.pause()
            out["frozen"] = steady(c, calls)
            cs, ds = [], []
            for _ in range(blocks):
                d.pause()
                cs.append(statistics.median(c.block(4, untimed=1, warm_ms=profile.measure.switch_warmup_ms)))
                c.pause()
                ds.append(statistics.median(d.block(4, untimed=1, warm_ms=profile.measure.switch_warmup_ms)))
            c.resume()
            out["pair"] = statistics.median(cs)
            out["dense_pair"] = statistics.median(ds)
        out["again"] = steady(c, calls)
    return out


def sandwich(profile, model: str, shape, rounds: int) -> list:
    """Markdown lines: per prune, the solo speedups per round with one dense reading per round vs sandwiched."""
    import math

    from bench_latency_methods import make_models

    from hwprune.latency.worker import time_alone

    with tempfile.TemporaryDirectory() as tmp:
        files = make_models(model, shape, [0.3, 0.5, 0.75], Path(tmp))
        names = [n for n in files if n != "dense"]
        first = {n: [] for n in names}
        both = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            dense = [time_alone(profile, files["dense"], (1, *shape)).median_ms]
            ms = {}
            for n in order:
                ms[n] = time_alone(profile, files[n], (1, *shape)).median_ms
                dense.append(time_alone(profile, files["dense"], (1, *shape)).median_ms)
            for i, n in enumerate(order):
                first[n].append(dense[0] / ms[n])
                both[n].append(math.sqrt(dense[i] * dense[i + 1]) / ms[n])
            print(f"round {r}: dense alone " + " ".join(f"{d:.3f}" for d in dense), flush=True)
    lines = ["| prune | truth scheme | speedup per round | spread (max-min)/median |", "|---|---|---|---:|"]
    for n in names:
        for label, v in (("one dense reading per round (verify)", first[n]), ("dense before and after (sandwich)", both[n])):
            med = statistics.median(v)
            lines.append(f"| {n} | {label} | {' '.join(f'{x:.3f}' for x in v)} | {100 * (max(v) - min(v)) / med:.1f}% |")
    return lines


def emit(lines: list, report) -> int:
    text = "\n".join(lines) + "\n"
    print(text)
    if report:
        Path(report).write_text(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--processes", type=int, default=8, help="fresh candidate processes (rounds)")
    ap.add_argument("--calls", type=int, default=60, help="timed calls per steady-state reading")
    ap.add_argument("--blocks", type=int, default=20, help="alternations in the pair reading")
    ap.add_argument("--sandwich-rounds", type=int, default=0,
                    help="instead: compare two ground-truth schemes over this many rounds (see the docstring)")
    ap.add_argument("--report")
    args = ap.parse_args(argv)

    from bench_latency_methods import make_models

    from hwprune.config import load_profile

    shape = (1, 28, 28) if args.model == "demo" else (3, 224, 224)
    profile = load_profile(args.profile)
    if args.sandwich_rounds:
        lines = [f"# Ground truth schemes, {args.model}, profile `{args.profile}`", "",
                 f"`python scripts/bench_pair_interference.py --model {args.model} --profile {args.profile} "
                 f"--sandwich-rounds {args.sandwich_rounds}`", "",
                 *sandwich(profile, args.model, shape, args.sandwich_rounds)]
        return emit(lines, args.report)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_models(args.model, shape, [args.ratio], Path(tmp))
        cand, dense = files[f"r{args.ratio:g}"], files["dense"]
        rows = []
        for k in range(args.processes):
            r = one_process(profile, cand, dense, (1, *shape), args.calls, args.blocks)
            rows.append(r)
            print(f"process {k}: " + ", ".join(f"{n} {v:.3f}" for n, v in r.items()), flush=True)
    alone = [r["alone"] for r in rows]
    lo = min(alone)
    lines = [f"# In-pair slowdown, {args.model} uniform {args.ratio:g}, profile `{args.profile}`", "",
             f"`python scripts/bench_pair_interference.py --model {args.model} --ratio {args.ratio:g} --profile "
             f"{args.profile} --processes {args.processes}`; medians in ms of {args.calls} calls (pair: of "
             f"{args.blocks} blocks).", "",
             "| process | alone | frozen dense beside / alone | pair / alone | alone again / alone | alone / fastest "
             "process's alone | dense pair / dense alone | ratio in pair | ratio alone |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in enumerate(rows):
        lines.append(f"| {k} | {r['alone']:.3f} | {r['frozen'] / r['alone']:.3f} | {r['pair'] / r['alone']:.3f} | "
                     f"{r['again'] / r['alone']:.3f} | {r['alone'] / lo:.3f} | {r['dense_pair'] / r['dense_alone']:.3f}"
                     f" | {r['pair'] / r['dense_pair']:.3f} | {r['alone'] / r['dense_alone']:.3f} |")
    spread = (max(alone) - lo) / lo
    lines += ["", f"Candidate alone across fresh processes: {lo:.3f}-{max(alone):.3f} ms (spread {100 * spread:.1f}%)."]
    return emit(lines, args.report)


if __name__ == "__main__":
    sys.exit(main())
