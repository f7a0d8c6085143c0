"""Coverage check (issues 4, 13): can hwprune filter-prune every torchvision classification model?

For every model in ``torchvision.models.list_models(module=torchvision.models)`` (random init, never a
download): remove 30% of every dependency group's channels through ``hwprune.graph.prune_groups`` (the
classifier's outputs are kept, via ``hwprune.models.output_layer_names``; layers the architecture adapters keep,
``hwprune.graph.auto_ignored``, are counted and reported with their reason), run the pruned model forward, export
it with ``hwprune.export.to_onnx`` and compare ONNX Runtime's output with PyTorch's, then time the dense and the
pruned ONNX model on a device profile (default ``cpu-1thread``), each alone in a fresh process
(``hwprune.latency.worker.time_alone``).

ONNX == PyTorch means max |ORT - torch| <= atol + rtol * max |torch output|. The tolerance scales with the output's
magnitude, not per element: float32 rounding error in a sum is relative to the magnitudes summed, and ORT and
PyTorch sum in different orders, so a random-init network whose logits reach 1e9 (inception_v3: no pretrained
weights keep its activations in range) differs by ~1e2 in absolute terms while agreeing to ~5e-7 of its scale;
a per-element rtol would instead fail near-zero logits of the same output for the same rounding.

Each model runs in its own subprocess (a crash, a memory blow-up or a time-out costs one row, not the run).
The markdown table is rewritten after every model, so a partial run leaves a usable report.

    python scripts/check_torchvision_coverage.py --out coverage.md [--models 'shufflenet*,vit_b_16,*']
        [--skip-larger-than-gmacs 20] [--timeout 1200] [--ratio 0.3] [--jsonl rows.jsonl [--resume]]
        [--profile cpu-1thread | --no-latency]

A second pass with ``--jsonl rows.jsonl --resume`` and a larger (or no) GMACs limit checks only the models the
first pass skipped and writes one table of all of them.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

RTOL, ATOL = 1e-4, 1e-4  # relative to max |output| (see above), absolute
STATUS_OK = "ok"


def input_size(name: str) -> int:
    """The input size a model is built for: 299 for Inception v3, 224 for everything else (ViTs need exactly 224)."""
    return 299 if name == "inception_v3" else 224


def estimated_gmacs(name: str, size: int):
    """GMACs at ``size`` from torchvision's weight metadata (its ``_ops`` at the weights' crop size); None if absent."""
    try:
        import torchvision

        w = torchvision.models.get_model_weights(name).DEFAULT
        ops, crop = w.meta.get("_ops"), w.transforms.keywords.get("crop_size")
        return float(ops) * (size / float(crop)) ** 2 if ops and crop else None
    except Exception:
        return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0].strip() if text else ""
    return f"{type(e).__name__}: {first}"[:300]


def timing_settings(gmacs: float):
    """Few rounds for big models: each run of a 100+ GMACs model takes seconds on one thread."""
    from hwprune.latency.base import MeasureSettings

    if gmacs > 20:
        return MeasureSettings(warmup=1, min_repeats=3, max_repeats=3, time_cap_s=0.0)
    if gmacs > 3:
        return MeasureSettings(warmup=2, min_repeats=5, max_repeats=20, time_cap_s=5.0)
    return MeasureSettings(warmup=5, min_repeats=10, max_repeats=100, time_cap_s=5.0)


def redraw_zero_layers(model) -> List[str]:
    """Draw every all-zero conv/linear weight at random (std 0.02). torchvision zero-initialises some classifiers
    (ViT's head): random-init outputs would then be all zero and the ONNX comparison would test nothing."""
    import torch

    from hwprune.graph import ROOT_TYPES

    names = []
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, ROOT_TYPES) and not m.weight.any():
                m.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
                names.append(n)
    return names


def _peak_rss_gib() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the timing workers (ONNX Runtime sessions)
    return round(max(own, kids) / 2**20, 2)  # Linux reports KiB


def _ignored_summary(reasons: Dict[str, str]) -> str:
    return "; ".join(dict.fromkeys(reasons.values()))  # each distinct reason once


def check_model(name: str, ratio: float, skip_gmacs: float, threads: int = 1, profile_name: str = "cpu-1thread",
                time_latency: bool = True) -> Dict[str, object]:
    """Run the whole check for one model in this process; returns one row of the report."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from hwprune import graph
    from hwprune.costs import count_macs, count_params
    from hwprune.export import to_onnx
    from hwprune.models import load_model, output_layer_names

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    row: Dict[str, object] = {"model": name, "status": "", "reason": "", "macs_before": None, "macs_after": None,
                              "params_before": None, "params_after": None, "groups": None, "input": None,
                              "auto_ignored": 0, "auto_ignored_reasons": "", "max_abs_diff": None,
                              "rel_diff": None, "dense_ms": None, "pruned_ms": None, "latency_note": "",
                              "commit": _commit()}

    def done(status: str, reason: str = "") -> Dict[str, object]:
        row.update(status=status, reason=reason, time_s=round(time.perf_counter() - t0, 1),
                   peak_rss_gib=_peak_rss_gib())
        return row

    torch.manual_seed(0)
    size = input_size(name)
    row["input"] = f"3x{size}x{size}"
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    if skip_gmacs:
        # Building and tracing a 100+ GMACs model costs minutes on a small machine: torchvision's weight metadata
        # (no download) estimates MACs at our input size first; only clear cases are skipped on the estimate.
        est = estimated_gmacs(name, size)
        if est is not None and est > 1.5 * skip_gmacs:
            return done("skipped", f"~{est:.0f} GMACs (torchvision metadata, scaled to {size}) > "
                                   f"--skip-larger-than-gmacs {skip_gmacs:g}")
    try:
        model = load_model(f"torchvision:{name}")
        row["zero_init_redrawn"] = redraw_zero_layers(model)
        with torch.no_grad():
            y_dense = model(x)
        row["macs_before"] = count_macs(model, x)
        row["params_before"] = count_params(model)
    except Exception as e:
        return done("build failed", _one_line(e))
    if skip_gmacs and row["macs_before"] > skip_gmacs * 1e9:
        return done("skipped", f"{row['macs_before'] / 1e9:.1f} GMACs > --skip-larger-than-gmacs {skip_gmacs:g}")

    tmp = tempfile.TemporaryDirectory()
    dense_path = os.path.join(tmp.name, f"{name}_dense.onnx")
    if time_latency:  # exported before pruning in place: one copy of a 600M-parameter model in memory, not two
        try:
            to_onnx(model, tuple(x.shape), dense_path)
        except Exception as e:
            row["latency_note"] = f"dense export: {_one_line(e)}"
            dense_path = None

    # prune 30% of every group, keeping the classifier's outputs
    try:
        ignored = output_layer_names(model, int(y_dense.shape[1]))
        if not ignored:
            raise RuntimeError(f"no classifier layer with {int(y_dense.shape[1])} outputs found")
        auto = graph.auto_ignored(model)
        row["auto_ignored"] = len([n for n in auto if n not in ignored])
        row["auto_ignored_reasons"] = _ignored_summary({n: r for n, r in auto.items() if n not in ignored})
        # Every conv/linear layer named: torch-pruning applies a module's ratio to the group it belongs to, so this
        # is every group at `ratio` with one dependency-graph build instead of two (list_groups + prune).
        layers = [n for n, m in model.named_modules()
                  if isinstance(m, graph.ROOT_TYPES) and n not in ignored and n not in auto]
        pruned, history = graph.prune_groups(model, x, {n: ratio for n in layers}, ignored=ignored, inplace=True)
        row["groups"] = len({h[0] for h in history if h[1]})  # groups that lost output channels
        if not history:
            raise RuntimeError("no prunable dependency group found")
        row["params_after"] = count_params(pruned)
        del model  # pruned in place: the same object
        if row["params_after"] >= row["params_before"]:
            raise RuntimeError(f"pruning removed nothing ({row['params_after']} params before and after)")
    except Exception as e:
        return done("prune failed", _one_line(e))

    try:
        with torch.no_grad():
            y = pruned(x)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(y_dense.shape):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise RuntimeError(f"output {shape} differs from the dense model's {tuple(y_dense.shape)}")
        if not torch.isfinite(y).all():
            raise RuntimeError("the pruned model's output is not finite")
        row["macs_after"] = count_macs(pruned, x)
    except Exception as e:
        return done("forward failed", _one_line(e))

    path = os.path.join(tmp.name, f"{name}.onnx")
    try:
        to_onnx(pruned, tuple(x.shape), path)
        del pruned
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        (y_ort,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        del sess
    except Exception as e:
        return done("export failed", _one_line(e))
    y_pt = y.numpy()
    if y_ort.shape != y_pt.shape:
        return done("mismatch", f"ORT output shape {y_ort.shape} != torch {y_pt.shape}")
    diff, scale = float(np.max(np.abs(y_ort - y_pt))), float(np.max(np.abs(y_pt)))
    row.update(max_abs_diff=diff, rel_diff=diff / scale if scale else None)
    if diff > ATOL + RTOL * scale:
        return done("mismatch", f"max |ORT - torch| = {diff:.3g} > {ATOL:g} + {RTOL:g} * max |output| ({scale:.3g})")
    if time_latency and dense_path:
        try:
            from hwprune.config import load_profile
            from hwprune.latency.worker import time_alone

            profile = load_profile(profile_name)
            settings = timing_settings(row["macs_before"] / 1e9)
            import gc

            gc.collect()
            row["dense_ms"] = time_alone(profile, dense_path, list(x.shape), settings).median_ms
            row["pruned_ms"] = time_alone(profile, path, list(x.shape), settings).median_ms
            row["latency_note"] = f"{profile.name}, n={settings.min_repeats}-{settings.max_repeats} alone each"
        except Exception as e:
            row["latency_note"] = f"timing: {_one_line(e)}"
    tmp.cleanup()
    return done(STATUS_OK)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:
        return ""


def _fmt_macs(v) -> str:
    return "" if v is None else f"{v / 1e9:.3f}"


def write_table(rows: List[Dict[str, object]], path: str, args) -> None:
    counts: Dict[str, int] = {}
    for r in rows:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    lines = [
        "# torchvision coverage: filter pruning, forward, ONNX export, latency",
        "",
        f"Every torchvision classification model (random init), {args.ratio:g} of every dependency group's channels "
        f"removed through `hwprune.graph.prune_groups` (l1 importance, classifier outputs kept, layers that "
        f"hwprune/adapters keep counted in *auto-ignored* with their reason), forward at 224 (299 for inception_v3), "
        f"`hwprune.export.to_onnx` + ONNX Runtime CPU compared with PyTorch (ONNX == PyTorch: max abs difference "
        f"<= {ATOL:g} + {RTOL:g} x max |output|; *rel diff* = max abs difference / max |output|). Latency: dense "
        f"and pruned ONNX each timed alone in a fresh process on `{args.profile}` (median ms). *peak RSS*: the "
        f"model's process or its timing workers, whichever is larger. Each row records the commit it ran at. All-zero "
        f"conv/linear weights (torchvision's zero-initialised ViT heads) are drawn at random first, so that outputs "
        f"depend on the whole network.",
        "",
        f"Command: `python scripts/check_torchvision_coverage.py {' '.join(sys.argv[1:])}`",
        "",
        "Summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" ({len(rows)} models)",
        "",
        "| model | input | groups pruned | pruned OK | ONNX OK | ONNX == PyTorch (rel diff) | GMACs dense | MACs cut "
        "| dense ms | pruned ms | latency cut | auto-ignored | params dense | params pruned | peak RSS GiB | time s "
        "| commit | status / reason |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    stage = {"build failed": 0, "skipped": 0, "prune failed": 0, "crashed": 0, "timeout": 0,
             "forward failed": 1, "export failed": 1, "mismatch": 2, STATUS_OK: 3}
    for r in rows:
        st = stage.get(str(r["status"]), 0)
        cut = lat = ""
        if r.get("macs_before") and r.get("macs_after"):
            cut = f"{1 - r['macs_after'] / r['macs_before']:.2f}"
        if r.get("dense_ms") and r.get("pruned_ms"):
            lat = f"{1 - r['pruned_ms'] / r['dense_ms']:.2f}"
        rel = f" ({r['rel_diff']:.1e})" if r.get("rel_diff") is not None else ""
        ign = f"{r.get('auto_ignored', 0)}" + (f": {r['auto_ignored_reasons']}" if r.get("auto_ignored_reasons") else "")
        note = str(r.get("reason", "") or r.get("latency_note", "")).replace("|", "\\|")
        status = str(r["status"]) + (f": {note}" if note else "")
        ms = lambda v: f"{v:.1f}" if v else ""
        lines.append(
            f"| {r['model']} | {r.get('input') or ''} | {r.get('groups') or ''} | {'yes' if st >= 1 else 'no'} "
            f"| {'yes' if st >= 2 else 'no'} | {('yes' if st >= 3 else 'no') + rel if st >= 2 else 'no'} "
            f"| {_fmt_macs(r.get('macs_before'))} | {cut} | {ms(r.get('dense_ms'))} | {ms(r.get('pruned_ms'))} | {lat} "
            f"| {ign} | {r.get('params_before') or ''} | {r.get('params_after') or ''} | {r.get('peak_rss_gib', '')} "
            f"| {r.get('time_s', '')} | {r.get('commit', '')} | {status} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="torchvision_coverage.md", help="markdown report to write")
    ap.add_argument("--models", default="*", help="comma-separated glob patterns on model names (default: all)")
    ap.add_argument("--skip-larger-than-gmacs", type=float, default=0.0,
                    help="skip models above this many GMACs at their input size (0 = run all)")
    ap.add_argument("--ratio", type=float, default=0.3, help="fraction of every group's channels removed")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads per model (default 1: on a busy machine more threads spin and wait)")
    ap.add_argument("--profile", default="cpu-1thread", help="device profile the latency columns are timed on")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency columns (much faster)")
    ap.add_argument("--jsonl", help="also append every row as JSON to this file")
    ap.add_argument("--resume", action="store_true",
                    help="with --jsonl: keep the rows already in it (except 'skipped' ones) and check only the rest")
    ap.add_argument("--table-only", action="store_true",
                    help="with --jsonl: write the table (and failures) from the rows already there; check nothing")
    ap.add_argument("--single", help=argparse.SUPPRESS)  # internal: check one model, print its row as JSON
    args = ap.parse_args(argv)

    if args.single:
        row = check_model(args.single, args.ratio, args.skip_larger_than_gmacs, args.threads, args.profile,
                          not args.no_latency)
        print("ROW " + json.dumps(row), flush=True)
        return 0

    import torchvision

    patterns = [p.strip() for p in args.models.split(",") if p.strip()]
    # in the order of the patterns (e.g. 'shufflenet*,vit*,*': failures first), each model once
    every = torchvision.models.list_models(module=torchvision.models)
    names: List[str] = []
    for p in patterns:
        names += [n for n in every if fnmatch.fnmatchcase(n, p) and n not in names]
    if not names:
        print(f"no torchvision model matches --models {args.models!r}", file=sys.stderr)
        return 2
    previous: Dict[str, Dict[str, object]] = {}
    if (args.resume or args.table_only) and args.jsonl and os.path.isfile(args.jsonl):
        with open(args.jsonl) as f:
            for ln in f:
                if ln.strip():
                    r = json.loads(ln)
                    previous[r["model"]] = r
    rows: List[Dict[str, object]] = []
    for i, name in enumerate(names, 1):
        if name in previous and (previous[name]["status"] != "skipped" or args.table_only):
            rows.append(previous[name])
            continue
        if args.table_only:
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--single", name, "--ratio", str(args.ratio),
               "--skip-larger-than-gmacs", str(args.skip_larger_than_gmacs), "--threads", str(args.threads),
               "--profile", args.profile] + (["--no-latency"] if args.no_latency else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            out = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            if out:
                row = json.loads(out[-1][4:])
            else:
                tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
                row = {"model": name, "status": "crashed", "reason": tail[0][:300]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "status": "timeout", "reason": f"over --timeout {args.timeout:g} s"}
        row.setdefault("time_s", round(time.perf_counter() - t0, 1))
        rows.append(row)
        print(f"[{i}/{len(names)}] {name}: {row['status']} ({row['time_s']} s) {row.get('reason', '')}", flush=True)
        write_table(rows, args.out, args)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")

    write_table(rows, args.out, args)
    bad = [r for r in rows if r["status"] not in (STATUS_OK, "skipped")]
    skipped = [r for r in rows if r["status"] == "skipped"]
    print(f"\n{len(rows) - len(bad) - len(skipped)} ok, {len(bad)} failed, {len(skipped)} skipped; table in {args.out}")
    for r in bad:
        print(f"FAILED {r['model']}: {r['status']}: {r.get('reason', '')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
