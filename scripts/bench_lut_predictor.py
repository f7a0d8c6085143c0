"""Benchmark (c): how well a per-layer latency lookup table predicts the measured latency of pruned models.

For each model (torchvision resnet18 and mobilenet_v2 at 3x224x224 by default) on one device profile (ONNX
Runtime CPU, profile ``cpu``): build the table over the ``filters`` search space, sample random pruned variants
(an independent ratio per dependency group, drawn from the space's ratios), measure every variant for real on the
same profile, and report the predictor's MAPE (target < 10%), Spearman and Kendall rank correlation, the build
time and the number of entries. Prints a markdown table and writes it to ``--out``.

  python scripts/bench_lut_predictor.py --out lut_predictor.md
  python scripts/bench_lut_predictor.py --quick            # resnet18 only, 3 ratios, 8 variants (~2-3 min)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2", help="torchvision model names, comma-separated")
    ap.add_argument("--profile", default="cpu", help="device profile (name in device_profiles/ or YAML path)")
    ap.add_argument("--space", default="filters", help="search space")
    ap.add_argument("--variants", type=int, default=30, help="random pruned variants per model")
    ap.add_argument("--ratios", default=None, help="override the space's ratios, e.g. 0,0.3,0.6")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--calibrate", type=int, default=3, help="uniform plans (dense first) measured whole for the fit")
    ap.add_argument("--calibrate-random", type=int, default=3,
                    help="random plans measured whole for the fit (their own seeded stream, not the variants')")
    ap.add_argument("--entry-repeats", type=int, default=None,
                    help="min repeats per table entry (default: the profile's settings)")
    ap.add_argument("--passes", type=int, default=1, help="measure every table entry this many times (lowest kept)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="measure every variant this many times, round-robin (lowest median kept: interference from "
                         "other processes only adds time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dir", default=None, help="keep the tables (JSON) here")
    ap.add_argument("--quick", action="store_true", help="resnet18, ratios 0,0.3,0.6, 8 variants, light settings")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from hwprune import graph
    from hwprune.config import load_profile
    from hwprune.export import to_onnx
    from hwprune.latency import MeasureSettings, make_backend, measure_candidate
    from hwprune.latency.lut import build_lut, predictor_error
    from hwprune.workload import build_workload

    torch.set_num_threads(1)
    profile = load_profile(args.profile)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else None
    entry_settings = None
    if args.quick:
        models = models if args.models != "resnet18,mobilenet_v2" else ["resnet18"]
        ratios = ratios or [0.0, 0.3, 0.6]
        args.variants = min(args.variants, 8)
        entry_settings = MeasureSettings(warmup=3, min_repeats=10, max_repeats=60, target_rel_ci=0.03, time_cap_s=0.5)
        profile = dataclasses.replace(profile, measure=MeasureSettings(
            warmup=5, min_repeats=15, max_repeats=100, target_rel_ci=0.02, time_cap_s=1.5))
    if args.entry_repeats:
        entry_settings = dataclasses.replace(entry_settings or profile.measure, min_repeats=args.entry_repeats)
    backend = make_backend(profile)
    rows = []
    details = {}
    for name in models:
        print(f"== {name} on {profile.name}", flush=True)
        wl = build_workload(f"torchvision:{name}", data_ref="none", space=args.space,
                            input_shape=(3, args.image_size, args.image_size), log=lambda s: None)
        table = build_lut(wl, profile, ratios=ratios, progress=sys.stderr.isatty(), calibrate=args.calibrate,
                          calibration_random=args.calibrate_random,
                          passes=args.passes,
                          settings=entry_settings, log=lambda s: print("  " + s, flush=True))
        print(f"  built {len(table)} entries in {table.build_seconds:.0f} s; scale {table.scale:.3f}, "
              f"overhead {table.overhead_ms:.3f} ms, dense {table.dense_ms:.3f} ms", flush=True)
        if args.save_dir:
            table.save(Path(args.save_dir) / f"lut-{name}-{profile.name}.json")
        choices = table.ratios
        rng = np.random.default_rng(1000 + args.seed)  # test variants: a stream apart from the calibration plans
        pairs = []
        tmp = Path(tempfile.mkdtemp(prefix="bench-lut-"))
        t_meas = time.perf_counter()
        try:
            variants = []
            for v in range(args.variants):
                ratios_v = {g.name: float(rng.choice(choices)) for g in wl.groups}
                model, _ = graph.prune_groups(wl.model, wl.example_input, ratios_v, "l1", wl.space.round_to,
                                              wl.ignored)
                shape = (profile.batch_size, *wl.input_shape)
                path = to_onnx(model, shape, tmp / f"v{v}.onnx")
                predicted = table.predict(model)
                from_plan = table.predict_plan(ratios_v)
                assert abs(from_plan - predicted) < 1e-9 * max(1.0, predicted), (from_plan, predicted)
                variants.append((model, path, shape, predicted))
            measured = [float("inf")] * len(variants)
            for _ in range(max(1, args.rounds)):
                for v, (model, path, shape, _) in enumerate(variants):
                    measured[v] = min(measured[v], measure_candidate(backend, str(path), model, shape).median_ms)
            for v, ((_, _, _, predicted), m) in enumerate(zip(variants, measured)):
                pairs.append((predicted, m))
                print(f"  variant {v + 1:2d}/{args.variants}: measured {m:8.3f} ms, predicted {predicted:8.3f} ms"
                      f" ({(predicted - m) / m:+.1%})", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        err = predictor_error(table, pairs)
        rows.append({
            "model": name, "entries": len(table), "build_s": table.build_seconds, "dense_ms": table.dense_ms,
            "variants": err["n"], "mape": err["mape"], "max_ape": err["max_ape"], "bias": err["bias"],
            "spearman": err["spearman"], "kendall": err["kendall"], "scale": table.scale,
            "overhead_ms": table.overhead_ms, "measure_s": time.perf_counter() - t_meas,
        })
        details[name] = {"pairs": pairs, "calibration": table.calibration, **rows[-1]}

    head = (f"LUT latency predictor, profile `{profile.name}` ({profile.backend}, batch {profile.batch_size}), "
            f"space `{args.space}`{' ratios ' + ','.join(f'{r:g}' for r in ratios) if ratios else ''}, "
            f"{args.image_size}x{args.image_size}{' (quick settings)' if args.quick else ''}\n\n")
    lines = [
        "| model | entries | build s | dense ms | variants | MAPE % | max APE % | bias % | Spearman | Kendall | scale "
        "| overhead ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['entries']} | {r['build_s']:.0f} | {r['dense_ms']:.2f} | {r['variants']} | "
            f"{r['mape']:.1f} | {r['max_ape']:.1f} | {r['bias']:+.1f} | {r['spearman']:.3f} | {r['kendall']:.3f} | "
            f"{r['scale']:.3f} | {r['overhead_ms']:+.2f} |"
        )
    text = head + "\n".join(lines) + (
        "\n\nTarget: MAPE < 10%. Prediction = scale x sum(per-layer entries) + overhead, fitted on the dense model, "
        "uniform plans and seeded random calibration plans (none of them among the test variants).\n")
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(details, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
