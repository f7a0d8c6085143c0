"""Benchmark (b): does measuring through the agent give the same numbers as measuring locally?

Starts `hwprune agent` on loopback in a subprocess (torch-free), then measures the same models locally and through
the agent, alternating, with the same ONNX Runtime options. Reports both medians and their ratio (ideally 1.0:
the agent times on the device, so HTTP costs nothing in the timing), plus the wall time of each call.

    python scripts/bench_agent_vs_local.py --out bench_agent.md [--profile cpu-1thread] [--widths 8 16 32 64]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_latency_repeatability import make_conv_onnx  # noqa: E402


def start_agent(token: str, cache_dir: str):
    cmd = [sys.executable, "-m", "hwprune.latency.agent", "--port", "0", "--token", token, "--cache-dir", cache_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "serving on " not in line:
        proc.kill()
        raise SystemExit(f"agent did not start: {line}{proc.stderr.read()}")
    return proc, line.split("serving on ")[1].split()[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown file to write the table to")
    ap.add_argument("--profile", default="cpu-1thread", help="an onnxruntime device profile (default cpu-1thread)")
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64], help="model widths to compare")
    ap.add_argument("--size", type=int, default=56, help="input height and width")
    ap.add_argument("--rounds", type=int, default=3, help="local/agent alternations per model")
    ap.add_argument("--time-cap-s", type=float, default=None, help="override the profile's measure.time_cap_s")
    args = ap.parse_args(argv)

    from hwprune.config import load_profile
    from hwprune.latency import DeviceProfile, make_backend

    prof = load_profile(args.profile)
    if prof.backend != "onnxruntime":
        raise SystemExit(f"--profile must use the onnxruntime backend, {prof.name!r} uses {prof.backend!r}")
    if args.time_cap_s is not None:
        prof = dataclasses.replace(prof, measure=dataclasses.replace(prof.measure, time_cap_s=args.time_cap_s))
    token = secrets.token_hex(16)
    shape = (1, 3, args.size, args.size)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        proc, url = start_agent(token, os.path.join(d, "agent"))
        try:
            local = make_backend(prof)
            remote = make_backend(
                DeviceProfile(
                    name=prof.name + "-via-agent",
                    backend="remote",
                    batch_size=prof.batch_size,
                    options={"url": url, "token": token, **prof.options},
                    measure=prof.measure,
                )
            )
            for w in args.widths:
                path = make_conv_onnx(os.path.join(d, f"w{w}.onnx"), w, seed=w)
                loc, rem, wall_l, wall_r = [], [], [], []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    loc.append(local.measure_onnx(path, shape).median_ms)
                    t1 = time.perf_counter()
                    rem.append(remote.measure_onnx(path, shape).median_ms)
                    t2 = time.perf_counter()
                    wall_l.append(t1 - t0)
                    wall_r.append(t2 - t1)
                lm, rm = statistics.median(loc), statistics.median(rem)
                rows.append((w, lm, rm, rm / lm, statistics.median(wall_l), statistics.median(wall_r)))
                print(f"width {w}: local {lm:.4f} ms, agent {rm:.4f} ms, ratio {rm / lm:.3f}", file=sys.stderr)
            fp = remote.fingerprint()
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    ratios = [r[3] for r in rows]
    lines = [
        f"## Agent on loopback vs local measurement: profile `{prof.name}`",
        "",
        f"Input {list(shape)}; 3x conv3x3 models of the given width; median of {args.rounds} alternating "
        f"measurements each. Agent fingerprint: {fp.get('cpu')}, onnxruntime {fp.get('onnxruntime')}, "
        f"provider {fp.get('provider')}, threads {fp.get('intra_op_threads')}.",
        "",
        "| width | local median (ms) | agent median (ms) | agent / local | local call wall (s) | agent call wall (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {w} | {lm:.4f} | {rm:.4f} | {q:.3f} | {a:.2f} | {b:.2f} |" for w, lm, rm, q, a, b in rows]
    lines += [
        "",
        f"agent / local: mean {statistics.mean(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
