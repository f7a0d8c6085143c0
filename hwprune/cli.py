"""Command line: thin commands over the Python API. Errors are one line and a non-zero exit; ``--debug`` shows
the traceback."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from hwprune.errors import HwpruneError, RunError

EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser, data_default: str = "mnist-5k") -> None:
    p.add_argument("--model", required=True,
                   help="demo | torchvision:NAME | FILE.pt | package.module:factory | hf:DIR | hf-package:PKG")
    p.add_argument("--weights", help="state_dict file for torchvision:NAME, package.module:factory or demo")
    p.add_argument("--data", default=data_default,
                   help=f"mnist-5k | digits | imagefolder:PATH | torchvision:CLASS:ROOT | images:PATH (unlabelled) | "
                   f"none (default {data_default})")
    p.add_argument("--input-shape", help="C,H,W of one sample when there is no data (default 3,224,224)")
    p.add_argument("--inputs", help="named model inputs, e.g. input_ids:int64:128,attention_mask:int64:128 "
                                    "(int64 without a length: the profile's sequence_length); with --data none")
    p.add_argument("--image-size", type=_num(int, 1), help="resize images of imagefolder/torchvision data to this size")
    p.add_argument("--seed", type=_num(int, 0, 2**32 - 1), default=0)
    _add_trust_arg(p)


def _add_objective_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", choices=["accuracy", "agreement", "cosine", "kl"],
                   help="what candidates are scored by: validation accuracy (needs labels), or fidelity to the dense "
                   "model on held-out inputs: top-1 agreement, cosine similarity, KL (default: the search space's, "
                   "else accuracy with labels; without: agreement for classifiers, cosine for embeddings)")


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow --model FILE.pt, a pickled whole module: loading it runs code from the file")


def _workload(args, space: str, run_dir: Optional[Path] = None):
    from hwprune.workload import build_workload, parse_shape

    from hwprune.inputs import InputSpec

    shape = parse_shape(args.input_shape) if getattr(args, "input_shape", None) else None
    inputs = InputSpec.parse(args.inputs) if getattr(args, "inputs", None) else None  # bad text: one line, first
    return build_workload(args.model, args.data, space, weights=args.weights, input_shape=shape,
                          run_dir=run_dir, seed=args.seed, image_size=args.image_size, log=_log,
                          trust_pickle=args.trust_pickle, inputs=inputs, objective=getattr(args, "objective", None))


# --------------------------------------------------------------------------------------------------- search

def cmd_search(args) -> int:
    from hwprune.config import load_profiles
    from hwprune.results import write_results
    from hwprune.search import SearchConfig, SearchInterrupted, check_search_config, run_search

    if args.verify_rounds < 0:
        raise HwpruneError(f"--verify-rounds {args.verify_rounds} must be 0 (skip) or more")
    out = Path(args.out)
    cfg = SearchConfig(out_dir=out, trials=args.trials, timeout_s=args.timeout, latency_budget_ms=args.latency_budget_ms,
                       budget_profile=args.budget_profile, storage=args.storage, study_name=args.study,
                       sampler=args.sampler, seed=args.seed, macs_objective=args.macs_objective,
                       progress=not args.no_progress, lut_path=args.lut, screen_margin=args.screen_margin,
                       allow_changed_config=args.allow_changed_config, heartbeat_s=args.heartbeat,
                       grace_s=args.grace, allow_device_change=args.allow_device_change,
                       warm_start=not args.no_warm_start, proposals=args.proposals,
                       screen_fidelity=args.screen_fidelity, screen_fidelity_margin=args.screen_fidelity_margin,
                       max_drop=args.max_drop)
    check_search_config(cfg)  # before any work
    out.mkdir(parents=True, exist_ok=True)
    profiles = load_profiles(args.profile or ["cpu"])
    workload = _workload(args, args.search_space, run_dir=out)
    _log(f"{len(workload.groups)} prunable groups in {args.model}; ratios {list(workload.space.ratios)}; "
         f"profiles {', '.join(p.name for p in profiles)}"
         + (f"; objective {workload.objective}" if workload.data is not None else ""))
    interrupted = None
    study = None
    try:
        study = run_search(workload, profiles, cfg, log=_log)
    except SearchInterrupted as e:
        interrupted = e
        _log(f"interrupted ({e}): finished trials are kept in the study; writing the results of what finished")
    if study is None:
        from hwprune.search import objective_names, open_study

        study = open_study(cfg, objective_names(workload, profiles, cfg.macs_objective), load_only=True)
    tables = write_results(study, workload, out, export=not args.no_export and interrupted is None, log=_log)
    _print_summary(tables, out)
    from hwprune.baselines import write_baseline_summary

    write_baseline_summary(study, out, tables, log=print)
    if interrupted is not None:
        _log(f"resume: run the same command again (same --out, --storage and --study); it continues up to "
             f"--trials {args.trials}" + ("" if args.no_export else "; models were not exported"))
        return interrupted.exit_code
    if not args.no_export and args.verify_rounds > 0 and not tables["pareto"].empty:
        _verify_front(out, args.verify_rounds, args.verify_tolerance)
    return 0


def _verify_front(out: Path, rounds: int, tolerance: float) -> bool:
    """Re-time the front alone (ground truth) and print reported vs isolated speedups; True when all agree."""
    from hwprune.verify import AGREES, format_rows, summary_line, verify_run

    _log(f"verifying the front: every model timed alone in a fresh process, {rounds} rounds "
         f"(skip with --verify-rounds 0)")
    rows = verify_run(out, rounds=rounds, tolerance=tolerance, log=_log)
    if not rows:
        return True
    print(format_rows(rows, tolerance))
    print(summary_line(rows, tolerance) + "; pareto.csv carries both figures (isolated_speedup:*)")
    return all(r.verdict(tolerance) == AGREES for r in rows)


def cmd_verify(args) -> int:
    if not 0 < args.tolerance < 1:
        raise HwpruneError(f"--tolerance {args.tolerance} must be a fraction in (0, 1), e.g. 0.05 for 5%")
    from hwprune.verify import AGREES, format_rows, summary_line, verify_run

    rows = verify_run(Path(args.run), profile_names=args.profile, rounds=args.rounds, tolerance=args.tolerance,
                      log=_log)
    if not rows:
        raise RunError(f"nothing to verify in {args.run}: no ONNX Runtime profile with front models")
    print(format_rows(rows, args.tolerance))
    print(f"{summary_line(rows, args.tolerance)}; wrote {Path(args.run) / 'verify.csv'}")
    return 0 if all(r.verdict(args.tolerance) == AGREES for r in rows) else EXIT_ERROR


def _print_summary(tables, out: Path) -> None:
    df, front = tables["trials"], tables["pareto"]
    counts = df.state.value_counts().to_dict()
    print(f"{len(df)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
          f"{len(front)} on the Pareto front; results in {out}")
    if not front.empty:
        cols = [c for c in ["trial", "accuracy", "agreement", "cosine", "kl", "macs"] if c in front.columns]
        cols += [c for c in front.columns if c.startswith(("latency_ms:", "speedup:"))]
        print(front[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    failed = df[df.state == "fail"]
    for _, r in failed.iterrows():
        print(f"trial {r.trial} failed: {r.reason}")


# -------------------------------------------------------------------------------------------------- profile

def cmd_profile(args) -> int:
    import tempfile

    from hwprune.config import load_profiles
    from hwprune.costs import measure_costs
    from hwprune.latency import make_backend
    from hwprune.latency.base import measure_candidate

    profiles = load_profiles(args.profile or ["cpu"])
    workload = _workload(args, args.search_space, run_dir=Path(args.run_dir))
    if args.build_lut:
        return _build_lut(args, workload, profiles)
    workload = workload.for_profiles(profiles[:1])  # token inputs: MACs at the first profile's sequence length
    costs = measure_costs(workload.model, workload.example_input)
    report = {"model": args.model, "input_shape": list(workload.input_shape), **costs.to_dict(), "profiles": {}}
    if not workload.inputs.is_image:
        report["inputs"] = workload.resolved_inputs.to_text()
    with tempfile.TemporaryDirectory() as tmp:
        for k, p in enumerate(profiles):
            backend = make_backend(p)
            shape = workload.latency_inputs(p)
            onnx_path = workload.export_onnx(workload.model, Path(tmp) / f"model-{k}.onnx", p.batch_size, profile=p)
            stats = measure_candidate(backend, str(onnx_path), workload.model, shape)
            entry = {"latency": stats.to_dict(), "fingerprint": backend.fingerprint()}
            if getattr(backend, "last_conditions", None):  # GPU clock and temperature around the timing
                entry["conditions"] = backend.last_conditions
            if hasattr(backend, "session") and not args.no_layers:
                from hwprune.layer_profile import ort_layer_breakdown

                entry["layers"] = ort_layer_breakdown(backend, str(onnx_path), shape)
            report["profiles"][p.name] = entry
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    shown = tuple(workload.input_shape) if workload.inputs.is_image else workload.resolved_inputs.describe(1)
    print(f"{args.model}  input {shown}  MACs {costs.macs / 1e6:.2f} M  "
          f"params {costs.params / 1e6:.3f} M  bytes {costs.bytes / 1e6:.2f} MB")
    for name, e in report["profiles"].items():
        s = e["latency"]
        print(f"[{name}] latency median {s['median_ms']:.3f} ms  p10 {s['p10_ms']:.3f}  p90 {s['p90_ms']:.3f}  "
              f"CV {100 * s['cv']:.1f}%  n {s['n']}")
        c = e.get("conditions")
        if c:
            print(f"    SM clock {c['sm_clock_mhz_before']} -> {c['sm_clock_mhz_after']} MHz  temperature "
                  f"{c['temperature_c_before']} -> {c['temperature_c_after']} C"
                  f"{'  CLOCK CHANGED' if c['clock_changed'] else ''}")
        for r in e.get("layers", [])[: args.top]:
            print(f"    {r['mean_ms']:8.4f} ms  {100 * r['share']:5.1f}%  {r['op_type']:<18} {r['node']}")
    return 0


def _build_lut(args, workload, profiles) -> int:
    """Per-layer lookup table for the first profile, then its error on plans it was not calibrated on."""
    import random
    import tempfile

    from hwprune.latency import make_backend
    from hwprune.latency.base import measure_candidate
    from hwprune.latency.lut import build_lut, predictor_error

    profile = profiles[0]
    workload = workload.for_profiles([profile])
    table = build_lut(workload, profile, progress=True, log=_log)
    table.save(args.build_lut)
    print(f"wrote {args.build_lut}: {len(table.entries)} entries for {workload.space.name!r} on {profile.name} "
          f"(built in {table.build_seconds:.0f} s)")
    if args.lut_check > 0:
        rng = random.Random(args.seed + 1)  # plans the table was not calibrated on
        backend = make_backend(profile)
        pairs = []
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(args.lut_check):
                plan = workload.plan({g.name: rng.choice(workload.space.ratios) for g in workload.groups})
                model = workload.apply(plan)[0]
                shape = workload.latency_inputs(profile)
                onnx_path = workload.export_onnx(model, Path(tmp) / f"check-{k}.onnx", profile.batch_size, profile)
                pairs.append((plan, measure_candidate(backend, str(onnx_path), model, shape).median_ms))
        err = predictor_error(table, pairs)
        print(f"predictor error on {err['n']} random plans it was not calibrated on: MAPE {err['mape']:.1f}%  "
              f"max {err['max_ape']:.1f}%  bias {err['bias']:+.1f}%  Spearman {err['spearman']:.2f}  "
              f"Kendall {err['kendall']:.2f}")
    return 0


# ---------------------------------------------------------------------------------------------------- prune

def cmd_prune(args) -> int:
    from hwprune.config import load_profiles
    from hwprune.export import save_torch
    from hwprune.trial import LatencyMeter, run_trial

    if not 0.0 <= args.ratio < 1.0:
        raise HwpruneError(f"--ratio {args.ratio} must be in [0, 1): the fraction of each group's channels removed")
    if args.recovery_method:
        from hwprune.recovery import get_method

        get_method(args.recovery_method)  # a typo fails here, before any work
    out = Path(args.out)
    profiles = load_profiles(args.profile or ["cpu"])
    workload = _workload(args, args.search_space, run_dir=out).for_profiles(profiles)
    meter = LatencyMeter(profiles, workload.model, workload.inputs, out, cache=False)
    plan = workload.uniform_plan(args.ratio)
    plan.recovery_method = args.recovery_method
    try:
        outcome, model = run_trial(workload, plan, meter, out, train=not args.no_recover, seed=args.seed)
    finally:
        meter.close()
    for f in list(out.glob("model-b*.onnx")) + list(out.glob("reference/*.onnx")):
        f.unlink()
    if (out / "reference").is_dir():
        (out / "reference").rmdir()
    workload.export_onnx(model, out / "model.onnx")
    save_torch(model, out / "model.pt")
    m = outcome.metrics()
    acc = f"{outcome.describe_quality()}  " if outcome.quality else ""
    lats = "  ".join(f"{k.split(':', 1)[1]} {v:.3f} ms" for k, v in m.items() if k.startswith("latency_ms:"))
    print(f"pruned {args.ratio:g} of every group: {acc}MACs {m['macs'] / 1e6:.2f} M  params {m['params']}  {lats}")
    print(f"wrote {out / 'model.onnx'}, {out / 'model.pt'}, {out / 'metrics.json'}, {out / 'plan.json'}")
    return 0


# --------------------------------------------------------------------------------------------------- export

def _open_run(args):
    """(run directory, its study, the workload rebuilt from the study's attributes) of ``--run``."""
    from hwprune.search import SearchConfig, open_study
    from hwprune.workload import build_workload

    run = Path(args.run)
    if not run.is_dir():
        raise RunError(f"run directory {args.run!r} does not exist; give the --out of a hwprune search")
    cfg = SearchConfig(out_dir=run, storage=args.storage, study_name=args.study)
    if args.storage is None and not (run / "study.db").is_file():
        raise RunError(f"{run} has no study.db; give --storage URL if the search used another storage")
    study = open_study(cfg, [], load_only=True)
    a = study.user_attrs
    from hwprune.provenance import stored_search_space

    space = stored_search_space(a) or a["search_space"]  # the study's own copy: the file may be elsewhere or edited
    workload = build_workload(a["model"], a["data"], space, weights=a.get("weights"), image_size=a.get("image_size"),
                              input_shape=a.get("input_shape"), inputs=a.get("inputs"), run_dir=run,
                              seed=a.get("seed", 0), log=_log,
                              trust_pickle=args.trust_pickle, objective=a.get("objective"))
    workload = workload.with_sequence_length(a.get("sequence_length"))  # token inputs: the search's length
    return run, study, workload


def cmd_export(args) -> int:
    from hwprune.results import export_trial, objective_columns, pareto_frame, trials_frame

    run, study, workload = _open_run(args)
    a = study.user_attrs
    df = trials_frame(study)
    if args.trial is not None:
        rows = df[df.trial == args.trial]
        if rows.empty or rows.iloc[0].state not in ("complete", "infeasible"):
            have = ", ".join(str(t) for t in df[df.state == "complete"].trial.tolist()[:20])
            raise RunError(f"trial {args.trial} is not a finished trial of {run}; finished trials: {have}")
    else:
        front = pareto_frame(df, objective_columns(study))
        rows = front
        if args.best_under_ms is not None:
            prof = args.budget_profile or a.get("budget_profile")
            col = f"latency_ms:{prof}"
            rows = front[front[col] <= args.best_under_ms]
            if rows.empty:
                best = front[col].min() if not front.empty else float("nan")
                raise RunError(f"no Pareto-optimal trial is under {args.best_under_ms:g} ms on {prof} "
                               f"(fastest: {best:.3f} ms); raise the limit or search longer")
            rows = rows.sort_values(objective_columns(study)[0], ascending=False).head(1)
    out = Path(args.out) if args.out else run / "models"
    for _, row in rows.iterrows():
        dest = out / f"trial-{int(row.trial)}"
        export_trial(workload, run, row, dest)
        print(f"exported trial {int(row.trial)} to {dest}")
    return 0


# ------------------------------------------------------------------------------------ baseline, finetune

def cmd_baseline(args) -> int:
    from hwprune.baselines import baselines_frame, meter_for_run, run_baselines, write_baseline_summary
    from hwprune.results import write_results

    if args.ratios and args.method == "random":
        raise HwpruneError("--ratios does not apply to --method random; give --count N instead")
    bad = [r for r in args.ratios or [] if not 0.0 < r < 1.0]
    if bad:
        raise HwpruneError(f"--ratios {bad[0]} must be in (0, 1): the fraction of channels removed")
    run, study, workload = _open_run(args)
    a = study.user_attrs
    meter = meter_for_run(study, workload, run)
    tables = write_results(study, workload, run, export=False, log=_log)
    existing = set(baselines_frame(study, tables["trials"], run).get("baseline", []))
    run_baselines(workload, meter, run, args.method, args.ratios, args.count, a.get("seed", 0),
                  a.get("latency_budget_ms"), a.get("budget_profile"), existing, log=print)
    write_baseline_summary(study, run, tables, log=print)
    return 0


def cmd_finetune(args) -> int:
    from hwprune.finetune import finetune_trials
    from hwprune.results import objective_columns, pareto_frame, trials_frame

    run, study, workload = _open_run(args)
    df = trials_frame(study)
    if args.trial is not None:
        rows = df[(df.trial == args.trial) & (df.state == "complete")]
        if rows.empty:
            have = ", ".join(str(t) for t in df[df.state == "complete"].trial.tolist()[:20])
            raise RunError(f"trial {args.trial} is not a completed, trained trial of {run}; completed: {have}")
    else:
        rows = pareto_frame(df, objective_columns(study))
    table = finetune_trials(workload, run, df, rows, args.steps, args.distill, args.lr, seed=args.seed, log=_log,
                            resume=args.resume, progress=args.progress)
    col = workload.objective
    delta = [c for c in table.columns if c.startswith("delta_vs_dense")]
    print(table[["trial", "role", f"{col}_search", f"{col}_finetuned"] + delta
                + [c for c in table.columns if c.startswith("speedup:")]].to_string(
        index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {run / 'finetune.csv'} and models/trial-N/finetuned/ for trials {', '.join(map(str, table.trial))}")
    return 0


# ---------------------------------------------------------------------------------------------- structures

def cmd_structures(args) -> int:
    from hwprune.config import load_profiles
    from hwprune.structures import structures_table

    print(structures_table(load_profiles(args.profile or ["cpu"]), measure=args.measure))
    return 0


def cmd_agent(argv: List[str]) -> int:
    from hwprune.latency.agent import main as agent_main

    return agent_main(argv) or 0


# ----------------------------------------------------------------------------------------------------- main

def _num(kind, low=None, high=None, low_open=False):
    from hwprune.config import arg_number

    return arg_number(kind, low, high, low_open)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (``hwprune: error: ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"hwprune: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="hwprune",
        description="Hardware-aware pruning search: per-layer structure and ratio chosen with Optuna, scored by "
                    "latency measured on device profiles, MACs and validation accuracy.",
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="search pruning plans; write trials, the Pareto front and its models")
    _add_model_args(s)
    _add_objective_arg(s)
    s.add_argument("--search-space", default="demo", help="a file in search_spaces/ by stem, or a YAML path")
    s.add_argument("--profile", action="append", help="device profile (repeatable); default: cpu")
    s.add_argument("--trials", type=_num(int, 1), default=30,
                   help="finished trials wanted in the study (resumes up to it)")
    s.add_argument("--timeout", type=_num(float, 0, low_open=True), help="stop starting trials after this many seconds")
    s.add_argument("--latency-budget-ms", type=_num(float, 0, low_open=True),
                   help="latency budget on the budget profile (a constraint)")
    s.add_argument("--budget-profile", help="profile the budget applies to (default: the first)")
    s.add_argument("--max-drop", type=_num(float, 0, low_open=True), metavar="D",
                   help="largest loss of the quality objective vs the dense model worth searching, in its units "
                        "(0.02 = 2 pp of accuracy): a constraint that steers the sampler away from worse candidates")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--storage", help="Optuna storage URL (default: sqlite file in the run directory)")
    s.add_argument("--study", default="hwprune", help="study name; rerun with the same name to resume")
    s.add_argument("--sampler", default="nsga2", choices=["nsga2", "tpe", "gp", "random"])
    s.add_argument("--macs-objective", action="store_true", help="also minimise MACs")
    s.add_argument("--lut", help="latency lookup table (hwprune profile --build-lut) to screen candidates with")
    s.add_argument("--screen-margin", type=_num(float, 0), default=0.1,
                   help="with --lut: skip candidates predicted over the budget by more than this fraction")
    s.add_argument("--heartbeat", type=_num(int, 1, 3600), default=5, metavar="S",
                   help="a running trial records a heartbeat every S seconds (default 5)")
    s.add_argument("--grace", type=_num(int, 2, 86400), default=30, metavar="S",
                   help="a running trial without a heartbeat for S seconds belongs to a dead worker: it is failed "
                   "and run again (default 30)")
    s.add_argument("--allow-changed-config", action="store_true",
                   help="resume although the search space or a profile changed since the study was created")
    s.add_argument("--no-export", action="store_true", help="do not export the Pareto models")
    s.add_argument("--verify-rounds", type=int, default=3,
                   help="re-time the exported front alone, each model in a fresh process, this many rounds (0: skip)")
    s.add_argument("--verify-tolerance", type=float, default=0.05, help="relative error reported as a disagreement")
    s.add_argument("--allow-device-change", action="store_true",
                   help="resume or join a study measured on a device with another fingerprint")
    s.add_argument("--no-warm-start", action="store_true",
                   help="do not enqueue the uniform sweep and the global-magnitude plan as the first trials")
    s.add_argument("--proposals", action="store_true",
                   help="measure each group's accuracy drop and latency saved, enqueue greedy knapsack plans")
    s.add_argument("--screen-fidelity", action="store_true",
                   help="score each candidate right after pruning (BN recalibration only) and fully train only those "
                        "no trained, faster trial beats by --screen-fidelity-margin; the cheap/full rank agreement "
                        "(Kendall tau) is checked as it goes and screening falls back when it is poor")
    s.add_argument("--screen-fidelity-margin", type=float, default=0.01, metavar="M",
                   help="in the objective's units (0.01 = 1 pp of accuracy; default 0.01)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_search)

    p = sub.add_parser("profile", help="latency (median, spread), MACs, params and per-layer time of a model")
    _add_model_args(p, data_default="none")
    p.add_argument("--profile", action="append", help="device profile (repeatable); default: cpu")
    p.add_argument("--search-space", default="filters", help="search space whose channel counts --build-lut covers")
    p.add_argument("--build-lut", metavar="FILE", help="measure every prunable layer at every channel count the "
                   "search space can produce on the first profile, save the lookup table to FILE")
    p.add_argument("--lut-check", type=_num(int, 0), default=5,
                   help="with --build-lut: random plans measured to report "
                   "the predictor's error (default 5; 0 skips)")
    p.add_argument("--run-dir", default=".", help="where the demo model is cached (default: .)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer breakdown")
    p.add_argument("--top", type=_num(int, 0), default=10, help="layers shown in the breakdown")
    p.set_defaults(func=cmd_profile)

    q = sub.add_parser("prune", help="apply one uniform ratio to every group and export it like a trial")
    _add_model_args(q, data_default="none")
    _add_objective_arg(q)
    q.add_argument("--search-space", default="filters")
    q.add_argument("--ratio", type=_num(float, 0, 0.99), required=True,
                   help="fraction of every group's channels removed")
    q.add_argument("--profile", action="append", help="device profile to measure on (default: cpu)")
    q.add_argument("--no-recover", action="store_true", help="skip BN recalibration and fine-tuning")
    q.add_argument("--recovery-method", help="how the recovery budget is spent: finetune, iterative, dpu, admm, "
                   "cdp_dtc, reconstruct (default: the search space's recovery.method)")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_prune)

    e = sub.add_parser("export", help="rebuild trials of a run from their plans and write model files")
    e.add_argument("--run", required=True, help="run directory of a search")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--trial", type=_num(int, 0))
    g.add_argument("--pareto", action="store_true", help="every Pareto-optimal trial")
    g.add_argument("--best-under-ms", type=_num(float, 0, low_open=True),
                   help="the most accurate Pareto trial under this latency")
    e.add_argument("--budget-profile", help="profile for --best-under-ms (default: the run's budget profile)")
    e.add_argument("--out", help="output directory (default: RUN/models)")
    e.add_argument("--storage")
    e.add_argument("--study", default="hwprune")
    _add_trust_arg(e)
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("verify", help="re-time a run's dense and front models alone, each in a fresh process, and "
                                      "compare with the speedups the search reported")
    v.add_argument("--run", required=True, help="run directory of a search")
    v.add_argument("--profile", action="append", help="only this profile (repeatable; default: every profile)")
    v.add_argument("--rounds", type=int, default=3, help="rounds, in rotating order (default 3)")
    v.add_argument("--tolerance", type=float, default=0.05, help="largest relative error accepted (default 0.05)")
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("baseline", help="evaluate uniform / global / random plans with the run's trial pipeline")
    b.add_argument("--run", required=True, help="run directory of a search")
    b.add_argument("--method", required=True, choices=["uniform", "global", "random"])
    b.add_argument("--ratios", type=float, nargs="+",
                   help="uniform: ratio of every group; global: fraction of all channels (default: the sweep)")
    b.add_argument("--count", type=int, default=10, help="random: number of random plans")
    b.add_argument("--storage")
    b.add_argument("--study", default="hwprune")
    b.add_argument("--trust-pickle", action="store_true", help="the run's --model is a pickled module you trust")
    b.set_defaults(func=cmd_baseline)

    f = sub.add_parser("finetune", help="longer fine-tune of chosen trials, the dense trial alike")
    f.add_argument("--run", required=True, help="run directory of a search")
    fg = f.add_mutually_exclusive_group(required=True)
    fg.add_argument("--trial", type=int)
    fg.add_argument("--pareto", action="store_true", help="every Pareto-optimal trial")
    f.add_argument("--steps", type=int, required=True, help="extra fine-tuning steps for each model and dense")
    f.add_argument("--distill", action="store_true",
                   help="distil from the dense model (always so on unlabelled data)")
    f.add_argument("--lr", type=float, help="learning rate (default: the search space's recovery lr)")
    f.add_argument("--continue", dest="resume", action="store_true",
                   help="start from each model's previous finish instead of the search's weights (steps add up)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar over the steps")
    f.add_argument("--storage")
    f.add_argument("--study", default="hwprune")
    f.add_argument("--trust-pickle", action="store_true", help="the run's --model is a pickled module you trust")
    f.set_defaults(func=cmd_finetune)

    t = sub.add_parser("structures", help="the sparse-structure catalog and which structures speed up each profile")
    t.add_argument("--profile", action="append")
    t.add_argument("--measure", action="store_true", help="measure a representative layer per structure")
    t.set_defaults(func=cmd_structures)

    sub.add_parser("agent", help="serve latency measurements on this device (see hwprune agent --help)",
                   add_help=False)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if argv and argv[0] == "agent" or argv[:2] == ["--debug", "agent"]:
        return cmd_agent(argv[argv.index("agent") + 1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its one line already printed)
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return args.func(args)
    except HwpruneError as e:
        if debug:
            raise
        print(f"hwprune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hwprune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug or an unexpected library failure: still one line unless --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"hwprune: error: {type(e).__name__}: {msg} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
