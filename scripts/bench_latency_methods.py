"""Benchmark: which way of timing a candidate against the dense model reproduces the models timed alone?

Fixed files (the dense model and uniform prunes of it), one profile. Ground truth: each file alone in a fresh
process (``time_alone``), over rounds in rotating order. Methods, each giving the candidate/dense ratio of medians
measured in one window:
  inprocess  both ONNX Runtime sessions in the measuring process, own thread pools (the method before issue 7)
  global     both sessions in one process sharing ONNX Runtime's global thread pool (run in a child process,
             because the global pool must be set before any session exists)
  processes  each model in a worker process of its own, alternating blocks (hwprune's default now), each block
             after untimed calls lasting the profile's switch_warmup_ms
  processes_1call  the same with one untimed call per block only (switch_warmup_ms 0: hwprune before this)
Reported per method: the relative error of the ratio vs ground truth (worst over the candidates), and the dense
model's in-window median vs its median alone.

    python scripts/bench_latency_methods.py --model demo --profiles cpu,cpu-1thread --ratios 0.3,0.5,0.75 \
        --rounds 3 --report scripts/results/latency_methods.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_models(model: str, shape, ratios, folder: Path) -> dict:
    """Dense and uniformly pruned ONNX files (random weights: latency does not depend on their values here)."""
    from hwprune.export import to_onnx
    from hwprune.plan import apply_plan
    from hwprune.workload import build_workload

    ref = "hwprune.models:DemoNet" if model == "demo" else model
    w = build_workload(ref, "none", "demo" if model == "demo" else "filters", input_shape=shape, run_dir=folder,
                       log=lambda *_: None)
    files = {"dense": str(to_onnx(w.model, (1, *shape), folder / "dense.onnx"))}
    for r in ratios:
        m = apply_plan(w.model, w.uniform_plan(r), w.example_input)[0]
        files[f"r{r:g}"] = str(to_onnx(m, (1, *shape), folder / f"r{r:g}.onnx"))
    return files


def alone_round(profile, files: dict, shape, k: int) -> dict:
    """One round of ground truth: every file alone in a fresh process, in an order rotated by ``k``. Returns each
    candidate's ratio to dense, and the dense median (ms)."""
    from hwprune.latency.worker import time_alone

    names = list(files)
    k %= len(names)
    ms = {n: time_alone(profile, files[n], (1, *shape)).median_ms for n in names[k:] + names[:k]}
    return {**{n: ms[n] / ms["dense"] for n in names[1:]}, "dense_ms": ms["dense"]}


def switch_positions(profile, files: dict, shape, blocks: int = 25, calls: int = 12) -> list:
    """Why a block needs a warm-up: each model's latency at each call position after the switch from the other
    (no untimed call; median over ``blocks`` alternations), next to its steady state alone. Markdown lines."""
    import numpy as np

    from hwprune.latency.worker import ModelProcess

    out = ["| model | steady (ms) | call 1 | " + " | ".join(f"{i}" for i in range(2, calls + 1)) + " |",
           "|---|---:|" + "---:|" * calls]
    dense = files["dense"]
    for name in list(files)[1:]:
        with ModelProcess(profile, files[name], (1, *shape)) as c, ModelProcess(profile, dense, (1, *shape)) as d:
            d.pause()
            alone_c = float(np.median(c.block(50, untimed=10)))
            c.pause()
            alone_d = float(np.median(d.block(50, untimed=10)))
            pc, pd = [], []
            for _ in range(blocks):
                d.pause()
                pc.append(c.block(calls))
                c.pause()
                pd.append(d.block(calls))
        for label, alone, pos in ((name, alone_c, pc), (f"dense (switching with {name})", alone_d, pd)):
            med = np.median(np.asarray(pos), axis=0)
            out.append(f"| {label} | {alone:.3f} | " + " | ".join(f"{100 * (m / alone - 1):+.0f}%" for m in med) + " |")
    return out


def method_ratios(method: str, profile, files: dict, shape) -> dict:
    import dataclasses

    from hwprune.latency.onnxruntime_backend import OnnxRuntimeBackend

    if method == "global":
        import onnxruntime as ort

        threads = profile.option("threads", profile.option("intra_op_threads", 0)) or 0
        ort.set_global_thread_pool_sizes(int(threads), 1)

        class GlobalPool(OnnxRuntimeBackend):
            def session_options(self):
                so = super().session_options()
                so.use_per_session_threads = False
                return so

        backend_cls = GlobalPool
    else:
        backend_cls = OnnxRuntimeBackend
    isolation = "process" if method.startswith("processes") else "none"
    measure = dataclasses.replace(profile.measure, isolation=isolation)
    if method == "processes_1call":  # the switch absorbed by one untimed call only (before issue 7's warm-up)
        measure = dataclasses.replace(measure, switch_warmup_ms=0.0)
    b = backend_cls(dataclasses.replace(profile, measure=measure))
    out = {}
    try:
        for n in list(files)[1:]:
            p = b.measure_onnx_pair(files[n], files["dense"], (1, *shape))
            out[n] = {"ratio": p.ratio, "paired": p.pair_ratio_median, "dense_ms": p.reference.median_ms}
    finally:
        b.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--input-shape", default=None, help="C,H,W (default 1,28,28 for demo, 3,224,224 otherwise)")
    ap.add_argument("--profiles", default="cpu,cpu-1thread")
    ap.add_argument("--ratios", default="0.3,0.5,0.75")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default="inprocess,global,processes")
    ap.add_argument("--positions", action="store_true",
                    help="also trace each model's latency by call position after a switch (why blocks warm up)")
    ap.add_argument("--report")
    ap.add_argument("--_child", help=argparse.SUPPRESS)  # internal: one method in a fresh process
    args = ap.parse_args(argv)
    from hwprune.config import load_profile

    shape = tuple(int(x) for x in (args.input_shape or ("1,28,28" if args.model == "demo" else "3,224,224")).split(","))
    if args._child:
        method, prof, files = json.loads(args._child)
        print(json.dumps(method_ratios(method, load_profile(prof), files, shape)))
        return 0
    lines = [f"# In-search timing methods vs each model alone ({args.model}, input {list(shape)})", "",
             f"`python scripts/bench_latency_methods.py --model {args.model} --profiles {args.profiles} "
             f"--ratios {args.ratios} --rounds {args.rounds}`", ""]
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        files = make_models(args.model, shape, [float(r) for r in args.ratios.split(",")], Path(tmp))
        cands = list(files)[1:]
        for prof_name in args.profiles.split(","):
            prof = load_profile(prof_name)
            truth, got = [], {m: [] for m in methods}
            # rounds: the truth, then every method (each in a fresh child), in rotating order; a method's ratio is
            # compared with the truth of its own round, so slow drift of the machine between rounds cancels
            for r in range(args.rounds):
                truth.append(alone_round(prof, files, shape, r))
                k = r % len(methods)
                for method in methods[k:] + methods[:k]:
                    child = json.dumps([method, prof_name, files])
                    out = subprocess.run([sys.executable, __file__, "--model", args.model, "--input-shape",
                                          ",".join(map(str, shape)), "--_child", child],
                                         capture_output=True, text=True, cwd=str(REPO))
                    if out.returncode != 0:
                        raise SystemExit(f"{method} failed: {out.stderr.strip().splitlines()[-1:]}")
                    got[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{prof_name}: round {r + 1}/{args.rounds} done", flush=True)
            dense_ms = statistics.median(t["dense_ms"] for t in truth)
            lines += [f"## profile `{prof_name}` (dense alone: {dense_ms:.3f} ms, median of {args.rounds} rounds)", "",
                      "Ratio = candidate / dense (median over rounds); error = the method's ratio vs the truth of the "
                      "same round (median over rounds, and the worst round in brackets).", "",
                      "| method | " + " | ".join(f"{n}: ratio, error (worst)" for n in cands)
                      + " | worst median error | dense in window vs alone |", "|---|" + "---:|" * (len(cands) + 2)]
            lines.append("| alone, fresh process (truth) | " + " | ".join(
                f"{statistics.median(t[n] for t in truth):.3f} ({min(t[n] for t in truth):.3f}-"
                f"{max(t[n] for t in truth):.3f})" for n in cands) + " | - | 1.00 |")
            for method in methods:
                cells, worst = [], 0.0
                for n in cands:
                    errs = [g[n]["ratio"] / t[n] - 1 for g, t in zip(got[method], truth)]
                    med = statistics.median(errs)
                    worst = max(worst, abs(med))
                    far = max(errs, key=abs)
                    cells.append(f"{statistics.median(g[n]['ratio'] for g in got[method]):.3f}, "
                                 f"{100 * med:+.1f}% ({100 * far:+.1f}%)")
                dense = statistics.median(statistics.median(g[n]["dense_ms"] for n in cands) / t["dense_ms"]
                                          for g, t in zip(got[method], truth))
                lines.append(f"| {method} | " + " | ".join(cells) + f" | {100 * worst:.1f}% | {dense:.2f} |")
            lines.append("")
            if args.positions:
                lines += ["Latency by call position after switching models (no untimed call), vs the same model's "
                          "steady state in its worker:", ""] + switch_positions(prof, files, shape) + [""]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
