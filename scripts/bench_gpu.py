"""GPU benchmark (issue 12): does hwprune time what people deploy on a GPU, and precisely enough to rank plans?

Three parts, each appended to the markdown report as soon as it is done (a run cut short still reports):

1. spread: three separate ``hwprune profile`` runs (fresh processes) of resnet18 per batch-1 profile; the
   run-to-run spread of their medians (goal <= 2%).
2. capability: which structures accelerate each GPU variant: filter/channel (conv pair, CUDA graphs at batch 1),
   2:4 semi-structured (a 4096x4096 Linear in fp16 on sparse tensor cores), BSR (a 4096x4096 Linear, 16x16
   blocks, 75% of them empty) at batch 1 and 64; each realized layer timed interleaved with its dense layer.
3. front: for resnet18 and mobilenet_v2 at batch 1 (CUDA graphs) and 64, fp32 and fp16: a short latency-only
   search, then every model of its Pareto front and the dense model timed *alone*, each in a fresh subprocess;
   the search's reported speedup (1 / its paired latency ratio) against the alone one (goal: worst error <= 5%;
   resnet18 batch 1: a front model >= 1.5x faster than dense at the same precision).

On a GPU machine (about 7 minutes; ``--deadline-s`` skips what would not fit):

    python scripts/bench_gpu.py --report scripts/results/gpu_h200.md

``--cpu-smoke`` runs every code path on this machine's CPU in about a minute (torch-cpu variants, 3x32x32
inputs, 3 trials): the test suite runs it so the script cannot rot between GPU sessions.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hwprune.config import load_profile  # noqa: E402
from hwprune.errors import ModelError  # noqa: E402
from hwprune.latency.base import DeviceProfile, MeasureSettings  # noqa: E402

Variant = Tuple[str, DeviceProfile]


# ------------------------------------------------------------------------------------------------ profiles

def _derive(p: DeviceProfile, name: str, batch: Optional[int] = None, multiple: Optional[int] = None,
            measure: Optional[MeasureSettings] = None, **options: Any) -> DeviceProfile:
    return dataclasses.replace(
        p, name=name, batch_size=batch or p.batch_size, options={**p.options, **options},
        channel_multiple=multiple or p.channel_multiple, measure=measure or p.measure, source=None)


def variants(smoke: bool) -> List[Variant]:
    """(label, profile) per batch x precision. On the CPU smoke run: torch-cpu with the same option shapes."""
    if smoke:
        cpu = load_profile("torch-cpu")
        tiny = MeasureSettings(warmup=1, min_repeats=3, max_repeats=6, target_rel_ci=0.5, time_cap_s=0.3)
        steady = {"threads": 1, "warmup_until_steady": True, "steady_window": 2, "steady_max_s": 0.3}
        return [
            ("b1-fp32", _derive(cpu, "smoke-b1-fp32", 1, measure=tiny, **steady)),
            ("b1-bf16", _derive(cpu, "smoke-b1-bf16", 1, 8, tiny, dtype="bfloat16", channels_last=True, **steady)),
            ("b2-fp32", _derive(cpu, "smoke-b2-fp32", 2, measure=tiny, calls_per_sample=2, **steady)),
        ]
    b64 = load_profile("gpu-torch-cuda-b64")
    return [
        ("b1-fp32", load_profile("gpu-torch-cuda")),
        ("b1-fp16", load_profile("gpu-torch-cuda-fp16")),
        ("b64-fp32", b64),
        ("b64-fp16", _derive(b64, "gpu-torch-cuda-b64-fp16", multiple=8, dtype="float16", channels_last=True)),
    ]


def search_profile(p: DeviceProfile, smoke: bool) -> DeviceProfile:
    """The variant with the short measurements a search can afford (the alone timings use the full profile)."""
    if smoke:
        return p
    short = MeasureSettings(warmup=p.measure.warmup, min_repeats=10, max_repeats=100, target_rel_ci=0.01,
                            time_cap_s=1.0)
    return _derive(p, p.name, measure=short, steady_max_s=2.0)


def alone_profile(p: DeviceProfile, smoke: bool) -> DeviceProfile:
    """The full profile, capped so that timing one model alone takes a few seconds."""
    if smoke:
        return p
    return _derive(p, p.name, measure=dataclasses.replace(p.measure, time_cap_s=2.0), steady_max_s=3.0)


def spaced(rows, k: int):
    """At most ``k`` rows, evenly spaced (first and last kept)."""
    if len(rows) <= k:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
    return rows.iloc[idx]


def write_profile(p: DeviceProfile, path: Path) -> Path:
    data = {"name": p.name, "backend": p.backend, "batch_size": p.batch_size, "channel_multiple": p.channel_multiple,
            "options": dict(p.options), "measure": dataclasses.asdict(p.measure), "accelerates": list(p.accelerates)}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ report

class Report:
    def __init__(self, path: Optional[Path], deadline_s: float):
        self.path, self.deadline, self.t0, self.text = path, deadline_s, time.perf_counter(), ""

    def left_s(self) -> float:
        return self.deadline - (time.perf_counter() - self.t0)

    def add(self, text: str) -> None:
        self.text += text.rstrip() + "\n\n"
        print(text, flush=True)
        if self.path:
            self.path.write_text(self.text)


def _table(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _py_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ------------------------------------------------------------------------------------------------ 1. spread

def part_spread(vs: List[Variant], args, work: Path, rep: Report) -> None:
    rows = []
    shape = "3,32,32" if args.cpu_smoke else "3,224,224"
    for label, p in vs:
        if not label.startswith("b1"):
            continue
        prof = write_profile(p, work / f"{p.name}.yaml")
        medians, cvs, changed = [], [], 0
        for _ in range(3):
            if rep.left_s() < 30:
                break
            out = subprocess.run([sys.executable, "-m", "hwprune.cli", "profile", "--model", "torchvision:resnet18",
                                  "--input-shape", shape, "--profile", str(prof), "--json"],
                                 capture_output=True, text=True, env=_py_env(), timeout=max(30, rep.left_s()))
            if out.returncode != 0:
                rows.append({"variant": label, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]})
                break
            entry = json.loads(out.stdout)["profiles"][p.name]
            medians.append(entry["latency"]["median_ms"])
            cvs.append(entry["latency"]["cv"])
            changed += bool(entry.get("conditions", {}).get("clock_changed"))
        if len(medians) == 3:
            lo, hi = min(medians), max(medians)
            rows.append({"variant": label, "profile": p.name, "medians_ms": " / ".join(f"{m:.4g}" for m in medians),
                         "spread_%": 100 * (hi - lo) / lo, "max_cv_%": 100 * max(cvs),
                         "runs_with_clock_change": changed})
    rep.add("## Run-to-run spread: three separate `hwprune profile` runs, resnet18\n\n"
            + _table(rows, ["variant", "profile", "medians_ms", "spread_%", "max_cv_%", "runs_with_clock_change",
                            "error"]))


# ------------------------------------------------------------------------------------------------ 2. capability

def _capability_cases(smoke: bool) -> List[Tuple[str, Callable[[], Tuple[Any, Any, Tuple[int, ...]]], str]]:
    """(structure, builder of (dense, realized, shape), which variants)."""
    import torch
    from torch import nn

    from hwprune.structures import get_structure
    from hwprune.structures.capability import representative

    width = 256 if smoke else 4096

    def linear(seed: int = 0) -> nn.Linear:
        g = torch.Generator().manual_seed(seed)
        lin = nn.Linear(width, width)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
        return lin.eval()

    def block():
        dense = linear()
        return dense, get_structure("block").apply(dense, 0.75, {"b": 16})[0].eval(), (1, width)

    def semi():
        dense = linear()
        return dense, get_structure("nm").apply(dense, 1.0, {"execute": "semi_structured"})[0].eval(), (1, width)

    return [("filter", lambda: representative("filter"), "all"), ("channel", lambda: representative("channel"), "all"),
            ("block (BSR 16x16, 75%)", block, "all"), ("nm 2:4 semi-structured", semi, "fp16")]


def part_capability(vs: List[Variant], args, rep: Report) -> None:
    from hwprune.latency import make_backend

    rows = []
    for structure, build, where in _capability_cases(args.cpu_smoke):
        for label, p in vs:
            if where == "fp16" and "fp32" in label:
                continue
            if rep.left_s() < 20:
                rows.append({"structure": structure, "variant": label, "error": "skipped: out of time"})
                continue
            row: Dict[str, Any] = {"structure": structure, "variant": label}
            try:
                dense, new, shape = build()
                try:
                    pair = make_backend(p).measure_module_pair(new, dense, shape)
                except ModelError as e:  # e.g. a sparse kernel that cannot be captured: time it eagerly
                    if not p.option("cuda_graphs"):
                        raise
                    row["note"] = f"eager ({str(e)[:80]})"
                    pair = make_backend(_derive(p, p.name, cuda_graphs=False)).measure_module_pair(new, dense, shape)
                c, d = pair.candidate, pair.reference
                row.update(dense_ms=d.median_ms, pruned_ms=c.median_ms, speedup=d.median_ms / c.median_ms,
                           speedup_paired=1.0 / pair.pair_ratio_median,
                           accelerates="yes" if (d.median_ms / c.median_ms >= 1.1 and c.ci_high_ms < d.ci_low_ms)
                           else "no")
            except Exception as e:  # a structure this GPU or torch cannot run: a cell, not a crash
                row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
            rows.append(row)
    rep.add("## Capability matrix: realized layer vs its dense layer, interleaved\n\n"
            + _table(rows, ["structure", "variant", "dense_ms", "pruned_ms", "speedup", "speedup_paired",
                            "accelerates", "note", "error"]))


# ------------------------------------------------------------------------------------------------ 3. fronts

def time_alone(model_path: str, profile_path: str, input_shape: str) -> float:
    """Child process: one model, alone, with the full profile; prints its median (ms) as JSON."""
    import torch

    from hwprune.config import load_profile as load
    from hwprune.latency import make_backend

    model = torch.load(model_path, map_location="cpu", weights_only=False)
    shape = (1, *(int(v) for v in input_shape.split(",")))
    stats = make_backend(load(profile_path)).measure_module(model, shape)
    print(json.dumps({"median_ms": stats.median_ms, "cv": stats.cv, "n": stats.n}))
    return stats.median_ms


def _alone(model_path: Path, profile_path: Path, shape: str, timeout: float) -> float:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--time-alone", str(model_path),
                          str(profile_path), shape], capture_output=True, text=True, env=_py_env(), timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["child failed"])[-1])
    return float(json.loads(out.stdout.strip().splitlines()[-1])["median_ms"])


def part_fronts(vs: List[Variant], args, work: Path, rep: Report) -> None:
    import torch

    from hwprune.plan import PruningPlan
    from hwprune.results import rebuild_model, write_results
    from hwprune.search import SearchConfig, run_search
    from hwprune.workload import build_workload

    shape = (3, 32, 32) if args.cpu_smoke else (3, 224, 224)
    shape_arg = ",".join(map(str, shape))
    rows: List[Dict[str, Any]] = []
    best: Dict[str, float] = {}
    order = [(m, v) for v in vs for m in args.models]  # every model at batch 1 first: the headline figures
    for model_name, (label, full) in order:
        if rep.left_s() < 60:
            rows.append({"model": model_name, "variant": label, "note": "skipped: out of time"})
            continue
        out = work / f"{model_name}-{label}"
        prof = search_profile(full, args.cpu_smoke)
        workload = build_workload(f"torchvision:{model_name}", "none", "filters", input_shape=shape, seed=args.seed,
                                  log=lambda m: None)
        cfg = SearchConfig(out_dir=out, trials=args.trials, seed=args.seed, progress=False)
        t0 = time.perf_counter()
        study = run_search(workload, [prof], cfg, log=lambda m: None)
        search_s = time.perf_counter() - t0
        tables = write_results(study, workload, out, export=False, log=lambda m: None)
        df, front = tables["trials"], tables["pareto"]
        dense = df[df.role == "dense"].iloc[0]
        full_path = write_profile(alone_profile(full, args.cpu_smoke), out / "alone-profile.yaml")
        wl = workload.for_profiles([prof])
        chosen = spaced(front[front.role != "dense"].sort_values("macs"), args.max_front)
        paths = {}
        for _, r in [(None, dense)] + list(chosen.iterrows()):
            path = out / f"trial-{int(r.trial)}.pt"
            torch.save(rebuild_model(wl, PruningPlan.from_json(r.plan), None), path)
            paths[int(r.trial)] = path
        try:
            dense_alone = _alone(paths[int(dense.trial)], full_path, shape_arg, max(30, rep.left_s()))
        except Exception as e:
            rows.append({"model": model_name, "variant": label, "note": f"dense alone failed: {e}"[:200]})
            continue
        col = f"latency_ratio:{prof.name}"
        for _, r in chosen.iterrows():
            row = {"model": model_name, "variant": label, "trial": int(r.trial),
                   "macs_cut": dense.macs / r.macs, "reported_speedup": 1.0 / r[col], "search_s": search_s}
            if rep.left_s() < 20:
                row["note"] = "alone skipped: out of time"
            else:
                try:
                    alone = _alone(paths[int(r.trial)], full_path, shape_arg, max(30, rep.left_s()))
                    row.update(dense_alone_ms=dense_alone, alone_ms=alone, alone_speedup=dense_alone / alone)
                    row["error_%"] = 100 * (row["reported_speedup"] / row["alone_speedup"] - 1)
                    key = f"{model_name} {label}"
                    best[key] = max(best.get(key, 0.0), row["alone_speedup"])
                except Exception as e:
                    row["note"] = f"alone failed: {e}"[:200]
            rows.append(row)
        rep.add(f"(front: {model_name} {label} done, {len(front)} on the front, search {search_s:.0f} s; "
                f"{rep.left_s():.0f} s left)")
    errs = [abs(r["error_%"]) for r in rows if "error_%" in r]
    summary = (f"worst |reported / alone - 1| = {max(errs):.1f}% over {len(errs)} front models (goal <= 5%)"
               if errs else "no front model was timed alone")
    summary += "; best alone speedup per model and variant: " + ", ".join(f"{k} {v:.2f}x" for k, v in best.items())
    rep.add("## Pareto fronts of short latency-only searches: reported vs alone speedups\n\n"
            + _table(rows, ["model", "variant", "trial", "macs_cut", "reported_speedup", "alone_speedup",
                            "error_%", "dense_alone_ms", "alone_ms", "search_s", "note"]) + "\n\n" + summary)


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--time-alone"]:
        time_alone(*argv[1:4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on torch-cpu variants (tests the script)")
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--variants", nargs="+", help="labels of the variants to run (default: all)")
    ap.add_argument("--trials", type=int, help="trials per search (default 6 on a GPU, 3 in smoke mode)")
    ap.add_argument("--max-front", type=int, default=3, help="front models timed alone per search (evenly spaced)")
    ap.add_argument("--parts", nargs="+", default=["spread", "capability", "fronts"],
                    choices=["spread", "capability", "fronts"])
    ap.add_argument("--out", default="runs/bench-gpu", help="work directory (searches, models, profiles)")
    ap.add_argument("--report", help="markdown report, rewritten after every part")
    ap.add_argument("--deadline-s", type=float, default=450.0, help="skip what would start after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.trials = args.trials or (3 if args.cpu_smoke else 6)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    rep = Report(Path(args.report) if args.report else None, args.deadline_s)
    vs = [v for v in variants(args.cpu_smoke) if not args.variants or v[0] in args.variants]
    if not vs:
        ap.error(f"--variants {args.variants}: choose from {', '.join(v[0] for v in variants(args.cpu_smoke))}")
    from hwprune.errors import HwpruneError
    from hwprune.latency import make_backend

    try:
        fp = make_backend(vs[0][1]).fingerprint()
    except HwpruneError as e:  # no GPU here: say so in one line (and how to test the script anyway)
        print(f"bench_gpu: error: {e} (run with --cpu-smoke to test the script without a GPU)", file=sys.stderr)
        return 2
    rep.add(f"# GPU benchmark ({'CPU smoke run' if args.cpu_smoke else 'GPU'})\n\n"
            f"`python scripts/bench_gpu.py {' '.join(argv)}`\n\n"
            f"device: {fp.get('gpu', fp.get('cpu'))}; driver {fp.get('driver')}; torch {fp.get('torch')}; "
            f"CUDA {fp.get('cuda')}; variants: " + ", ".join(f"{lab} = {p.name}" for lab, p in vs))
    if "spread" in args.parts:
        part_spread(vs, args, work, rep)
    if "capability" in args.parts:
        part_capability(vs, args, rep)
    if "fronts" in args.parts:
        part_fronts(vs, args, work, rep)
    rep.add(f"total {time.perf_counter() - rep.t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
