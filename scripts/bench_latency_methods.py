"""Benchmark: which way of timing a candidate against the dense model reproduces the models timed alone?

Fixed files (the dense model and uniform prunes of it), one profile. Ground truth: each file alone in a fresh
process (``time_alone``), over rounds in rotating order. Methods, each giving the candidate/dense ratio of medians
measured in one window:
  inprocess  both ONNX Runtime sessions in the measuring process, own thread pools (the method before issue 7)
  global     both sessions in one process sharing ONNX Runtime's global thread pool (run in a child process,
             because the global pool must be set before any session exists)
  processes  each model in a worker process of its own, alternating blocks (hwprune's default now)
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


def ground_truth(profile, files: dict, shape, rounds: int) -> dict:
    from hwprune.latency.worker import time_alone

    names = list(files)
    times = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(time_alone(profile, files[n], (1, *shape)).median_ms)
    out = {}
    for n in names[1:]:
        per = [c / d for c, d in zip(times[n], times["dense"])]
        out[n] = {"ratio": statistics.median(per), "min": min(per), "max": max(per)}
    out["dense_ms"] = statistics.median(times["dense"])
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
    isolation = "process" if method == "processes" else "none"
    b = backend_cls(dataclasses.replace(profile, measure=dataclasses.replace(profile.measure, isolation=isolation)))
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
    with tempfile.TemporaryDirectory() as tmp:
        files = make_models(args.model, shape, [float(r) for r in args.ratios.split(",")], Path(tmp))
        for prof_name in args.profiles.split(","):
            prof = load_profile(prof_name)
            gt = ground_truth(prof, files, shape, args.rounds)
            lines += [f"## profile `{prof_name}` (dense alone: {gt['dense_ms']:.3f} ms)", "",
                      "| method | " + " | ".join(f"{n}: ratio (error)" for n in list(files)[1:])
                      + " | worst error | dense in window vs alone |", "|---|" + "---:|" * (len(files) + 1)]
            lines.append("| alone, fresh process (truth) | " + " | ".join(
                f"{gt[n]['ratio']:.3f} ({gt[n]['min']:.3f}-{gt[n]['max']:.3f})" for n in list(files)[1:]) + " | - | 1.00 |")
            for method in args.methods.split(","):
                child = json.dumps([method, prof_name, files])
                out = subprocess.run([sys.executable, __file__, "--model", args.model, "--input-shape",
                                      ",".join(map(str, shape)), "--_child", child],
                                     capture_output=True, text=True, cwd=str(REPO))
                if out.returncode != 0:
                    raise SystemExit(f"{method} failed: {out.stderr.strip().splitlines()[-1:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                errs = {n: res[n]["ratio"] / gt[n]["ratio"] - 1 for n in res}
                dense = statistics.median(res[n]["dense_ms"] for n in res) / gt["dense_ms"]
                lines.append(f"| {method} | " + " | ".join(
                    f"{res[n]['ratio']:.3f} ({100 * errs[n]:+.1f}%)" for n in res)
                    + f" | {100 * max(abs(e) for e in errs.values()):.1f}% | {dense:.2f} |")
                print(lines[-1], flush=True)
            lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
