"""Benchmark (a): how repeatable is a latency measurement over a run?

One model is measured N times spread over a run, with other work in between (other models measured, a CPU-heavy
numpy loop), as in a search. Reported: the CV of its absolute medians, and the CV of its ratio to a reference
model measured interleaved in the same window (what every search trial carries). Target: CV < 3% on CPU.

    python scripts/bench_latency_repeatability.py --out bench_repeatability.md [--profile cpu] [--rounds 10]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def make_conv_onnx(path: str, channels: int, layers: int = 3, in_channels: int = 3, seed: int = 0) -> str:
    """A small CNN as ONNX (dynamic batch and spatial size): `layers` x (3x3 conv + ReLU), global average pool."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev, cin = [], [], "x", in_channels
    for i in range(layers):
        w = (rng.standard_normal((channels, cin, 3, 3)) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}")]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        prev, cin = f"r{i}", channels
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "bench_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_channels, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def cv(xs) -> float:
    return statistics.stdev(xs) / statistics.mean(xs) if len(xs) > 1 else 0.0


def other_work(backend, others, shape, seconds: float) -> None:
    """What happens between two measurements of the same model in a search: other candidates, training."""
    for p in others:
        backend.measure_onnx(p, shape)
    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = np.tanh(a @ a.T / 256.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown file to write the table to")
    ap.add_argument("--profile", default="cpu", help="device profile (name or YAML path; default cpu)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--channels", type=int, default=32, help="width of the measured model")
    ap.add_argument("--reference-channels", type=int, default=48, help="width of the reference (dense) model")
    ap.add_argument("--size", type=int, default=56, help="input height and width")
    ap.add_argument("--work-s", type=float, default=2.0, help="seconds of CPU work between rounds")
    ap.add_argument("--time-cap-s", type=float, default=None, help="override the profile's measure.time_cap_s")
    ap.add_argument("--isolation", choices=["process", "none"], help="override the profile's measure.isolation")
    args = ap.parse_args(argv)

    from hwprune.config import load_profile
    from hwprune.latency import make_backend

    prof = load_profile(args.profile)
    if args.time_cap_s is not None:
        prof = dataclasses.replace(prof, measure=dataclasses.replace(prof.measure, time_cap_s=args.time_cap_s))
    if args.isolation is not None:
        prof = dataclasses.replace(prof, measure=dataclasses.replace(prof.measure, isolation=args.isolation))
    backend = make_backend(prof)
    shape = (1, 3, args.size, args.size)
    rows, pair_seconds = [], []
    with tempfile.TemporaryDirectory() as d:
        model = make_conv_onnx(os.path.join(d, "model.onnx"), args.channels)
        ref = make_conv_onnx(os.path.join(d, "reference.onnx"), args.reference_channels, seed=1)
        others = [make_conv_onnx(os.path.join(d, f"other{c}.onnx"), c, seed=c) for c in (8, 24)]
        t_start = time.perf_counter()
        for r in range(args.rounds):
            other_work(backend, others, shape, args.work_s)
            st = backend.measure_onnx(model, shape)
            t_pair = time.perf_counter()
            pair = backend.measure_onnx_pair(model, ref, shape)
            pair_seconds.append(time.perf_counter() - t_pair)
            rows.append((r + 1, time.perf_counter() - t_start, st, pair))
            print(f"round {r + 1}: median {st.median_ms:.4f} ms (n={st.n}), ratio {pair.ratio:.4f}", file=sys.stderr)

    med = [st.median_ms for _, _, st, _ in rows]
    ratio = [p.ratio for *_, p in rows]
    pratio = [p.pair_ratio_median for *_, p in rows]
    fp = backend.fingerprint()
    lines = [
        f"## Latency repeatability: profile `{prof.name}`, {args.rounds} rounds",
        "",
        f"Model: 3x conv3x3 width {args.channels}, input {list(shape)}; reference width {args.reference_channels}; "
        f"{args.work_s:g} s of other work between rounds. CPU: {fp.get('cpu')}, {fp.get('cores')} cores, "
        f"onnxruntime {fp.get('onnxruntime', '-')}. Settings: {dataclasses.asdict(prof.measure)}.",
        "",
        "| round | t (s) | median (ms) | p10 (ms) | p90 (ms) | n | ratio to reference (interleaved) | per-pair ratio median |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, t, st, p in rows:
        lines.append(
            f"| {i} | {t:.1f} | {st.median_ms:.4f} | {st.p10_ms:.4f} | {st.p90_ms:.4f} | {st.n} | {p.ratio:.4f} | "
            f"{p.pair_ratio_median:.4f} |"
        )
    lines += [
        "",
        "| quantity | mean | CV across rounds | min | max |",
        "|---|---:|---:|---:|---:|",
        f"| absolute median (ms) | {statistics.mean(med):.4f} | {100 * cv(med):.2f}% | {min(med):.4f} | {max(med):.4f} |",
        f"| ratio of medians (interleaved) | {statistics.mean(ratio):.4f} | {100 * cv(ratio):.2f}% | {min(ratio):.4f} | {max(ratio):.4f} |",
        f"| per-pair ratio median | {statistics.mean(pratio):.4f} | {100 * cv(pratio):.2f}% | {min(pratio):.4f} | {max(pratio):.4f} |",
        "",
        f"Seconds per interleaved pair measurement (isolation `{prof.measure.isolation}`): mean "
        f"{statistics.mean(pair_seconds):.2f} s, max {max(pair_seconds):.2f} s.",
        "",
        f"Target (issue 7): CV of the reported (ratio-based) latency <= 2%. Per-pair ratio median: "
        f"{'met' if cv(pratio) <= 0.02 else 'NOT met'}; ratio of medians: {'met' if cv(ratio) <= 0.02 else 'NOT met'}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
