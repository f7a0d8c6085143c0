"""Results of a run: the trials table, the Pareto front, the plot, and exported models.

Everything is read back from the Optuna study, so the same functions serve a finished run, an interrupted one,
and a study shared by several workers.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import optuna
import pandas as pd
import torch

from hwprune.atomic import atomic_path, write_text
from hwprune.errors import RunError
from hwprune.export import save_torch
from hwprune.fidelity import LABELS, QUALITY_COLUMNS
from hwprune.plan import PruningPlan, replay_plan
from hwprune.storage import SAME_AS
from hwprune.workload import Workload

LAT_PREFIX = "latency_ms:"


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: plan, objectives, latency per profile with spread, costs, feasibility, state."""
    rows = []
    for t in study.trials:
        m = t.user_attrs.get("metrics", {})
        state = t.state.name.lower()
        if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("feasible", True):
            state = ("repeat" if t.user_attrs.get(SAME_AS) is not None
                     else "screened" if t.user_attrs.get("screened") else "infeasible")
        row = {
            "trial": t.number,
            "state": state,
            "role": t.user_attrs.get("role", "candidate"),
            "plan_summary": m.get("plan", ""),
            # accuracy, or the fidelity figures (agreement, cosine, kl, exp_neg_kl): whichever the run measured
            **{c: m.get(c) for c in QUALITY_COLUMNS if c in m},
            "macs": m.get("macs"),
            "params": m.get("params"),
            "bytes": m.get("bytes"),
            "macs_effective": m.get("macs_effective"),
            "bytes_deployed": m.get("bytes_deployed"),
            "feasible": bool(t.user_attrs.get("feasible", False)) if t.state.is_finished() else None,
            "reason": t.user_attrs.get("reason", ""),
            "predicted_ms": t.user_attrs.get("predicted_ms"),
            **({"cheap_score": t.user_attrs["cheap_score"]} if "cheap_score" in t.user_attrs else {}),
            "duration_s": t.duration.total_seconds() if t.duration else None,
            "plan": t.user_attrs.get("plan", ""),
        }
        for k, v in m.items():
            if k.startswith(("latency_", "seconds:")):
                row[k] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    dense = df[(df.role == "dense") & (df.state == "complete")]
    if not dense.empty:
        d = dense.iloc[0]
        for c in [c for c in df.columns if c.startswith(LAT_PREFIX)]:
            df["speedup:" + c[len(LAT_PREFIX):]] = d[c] / df[c]
        if d["macs"]:
            df["macs_reduction"] = d["macs"] / df["macs"]
    return df


def objective_columns(study: optuna.Study) -> List[str]:
    names = list(study.user_attrs.get("objectives", []))
    return [("macs" if n == "macs_kept" else n) for n in names]


def pareto_frame(df: pd.DataFrame, objectives: Sequence[str]) -> pd.DataFrame:
    """Feasible, completed trials that no other such trial dominates (accuracy/MACs-kept up, the rest down)."""
    if df.empty:
        return df
    ok = df[(df.state == "complete") & (df.feasible == True)].copy()  # noqa: E712
    if ok.empty:
        return ok
    # The first objective (accuracy, or MACs kept without data) is maximised; every other one is minimised.
    sign = np.array([-1.0] + [1.0] * (len(objectives) - 1))
    vals = ok[list(objectives)].to_numpy(dtype=float) * sign  # all minimised
    keep = []
    for i in range(len(vals)):
        dominated = np.any(np.all(vals <= vals[i], axis=1) & np.any(vals < vals[i], axis=1))
        keep.append(not dominated)
    front = ok[np.array(keep)]
    return front.sort_values(objectives[1] if len(objectives) > 1 else objectives[0])


def plot_pareto(df: pd.DataFrame, front: pd.DataFrame, objectives: Sequence[str], path: Path,
                budget_ms: Optional[float] = None, budget_profile: Optional[str] = None,
                baselines: Optional[pd.DataFrame] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = objectives[0]
    x = budget_profile and f"{LAT_PREFIX}{budget_profile}" in df.columns and f"{LAT_PREFIX}{budget_profile}"
    x = x or next(o for o in objectives if o.startswith(LAT_PREFIX))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = df[df.state == "complete"]
    feas = done[done.feasible == True]  # noqa: E712
    infeas = df[df.state.isin(["infeasible", "screened"])]
    ax.scatter(feas[x], feas[y], s=18, c="#9ab", label="trials")
    if not infeas.empty:
        ax.scatter(infeas[x], [feas[y].min() if not feas.empty else 0] * len(infeas), marker="x", c="#c44",
                   s=18, label="over budget (not trained)")
    if not front.empty:
        f = front.sort_values(x)
        ax.plot(f[x], f[y], "-o", c="#16a", ms=5, label="Pareto front")
    dense = done[done.role == "dense"]
    if not dense.empty:
        ax.scatter(dense[x], dense[y], marker="*", s=220, c="#e80", edgecolors="k", zorder=5, label="dense")
    if baselines is not None and not baselines.empty and x in baselines.columns:
        marks = {"uniform": ("s", "#e80"), "global": ("D", "#4a4"), "random": ("^", "#a4a")}
        for method, (marker, color) in marks.items():
            b = baselines[(baselines.method == method) & (baselines.state == "complete")]
            if not b.empty:
                ax.scatter(b[x], b[y], marker=marker, facecolors="none", edgecolors=color, s=60, zorder=4,
                           label=f"{method} baseline")
    if budget_ms is not None:
        ax.axvline(budget_ms, ls="--", c="#c44", label=f"budget {budget_ms:g} ms")
    ax.set_xlabel(f"latency (ms, median) on {x[len(LAT_PREFIX):]}")
    ax.set_ylabel(LABELS.get(y, "MACs kept" if y == "macs" else y))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def rebuild_model(workload: Workload, plan: PruningPlan, weights_path: Optional[Path]) -> torch.nn.Module:
    """The trial's model from its stored plan, with its recovered weights where the trial saved them."""
    model = replay_plan(workload.model, plan, workload.example_input)
    if weights_path is not None and Path(weights_path).is_file():
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval()


def export_trial(workload: Workload, run_dir: Path, row: pd.Series, out_dir: Path,
                 batch_size: int = 1) -> Path:
    """Write ``model.onnx``, ``model.pt`` (whole pruned module) and ``metrics.json`` for one trial."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = PruningPlan.from_json(row["plan"])
    weights = Path(run_dir) / "trials" / f"trial-{int(row['trial'])}" / "state_dict.pt"
    model = rebuild_model(workload, plan, weights)
    workload.export_onnx(model, out_dir / "model.onnx", batch_size)
    save_torch(model, out_dir / "model.pt")
    metrics = {k: _jsonable(v) for k, v in row.items() if k != "plan"}
    metrics["plan"] = json.loads(row["plan"])
    trial_metrics = Path(run_dir) / "trials" / f"trial-{int(row['trial'])}" / "metrics.json"
    reports = json.loads(trial_metrics.read_text()).get("structures", []) if trial_metrics.is_file() else []
    if reports:
        metrics["structures"] = reports
        metrics["sparse_formats"] = write_sparse_weights(model, reports, out_dir / "sparse_weights.pt")
    metrics["input_shape"] = [batch_size, *workload.input_shape]
    if not workload.inputs.is_image:
        metrics["inputs"] = workload.resolved_inputs.to_dict()
    metrics["weights"] = "recovered (fine-tuned)" if weights.is_file() else "pruned from the dense weights, no recovery"
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    return out_dir


def write_sparse_weights(model: torch.nn.Module, reports: List[dict], path: Path) -> Dict[str, str]:
    """Mask-only structures keep dense (zeroed) weights in the ONNX file, because ONNX Runtime densifies sparse
    initializers anyway; their deployable sparse form goes here: {layer: sparse tensor in the report's format}
    (CSR or BSR via torch.sparse; N:M and unified blocks as COO values + indices). Returns {layer: format}."""
    modules = dict(model.named_modules())
    out, formats = {}, {}
    for r in reports:
        fmt, layer = r.get("format", "dense"), r.get("layer")
        w = getattr(modules.get(layer), "weight", None)
        if fmt == "dense" or w is None or w.layout != torch.strided:
            continue
        gemm = w.detach().reshape(w.shape[0], -1)
        b = int(r.get("params", {}).get("b", 0) or 0)  # block size of a `block` layer
        if fmt == "bsr" and b and gemm.shape[0] % b == 0 and gemm.shape[1] % b == 0:
            out[layer], formats[layer] = gemm.to_sparse_bsr((b, b)), "bsr"
        elif fmt in ("csr", "bsr"):
            out[layer], formats[layer] = gemm.to_sparse_csr(), "csr"
        else:
            out[layer], formats[layer] = gemm.to_sparse_coo().coalesce(), f"{fmt} (stored as coo)"
    if out:
        with atomic_path(path) as tmp:
            torch.save({"format": formats, "weights": out, "note": "GEMM view [out, in*kh*kw] of each layer's weight"},
                       tmp)
    return formats


def _jsonable(v):
    if isinstance(v, np.generic):  # numpy scalars (np.bool_ too: a row taken from a frame of mixed dtypes)
        v = v.item()
    if isinstance(v, float) and np.isnan(v):
        return None
    return v


def _exported(workload: Workload, run_dir: Path, rows: pd.DataFrame) -> Dict[int, Path]:
    """trial -> its exported ONNX file (exported now where the run did not export it)."""
    paths = {}
    for _, row in rows.iterrows():
        path = Path(run_dir) / "models" / f"trial-{int(row.trial)}" / "model.onnx"
        if not path.is_file():
            export_trial(workload, run_dir, row, path.parent)
        paths[int(row.trial)] = path
    return paths


def retime_front(workload: Workload, run_dir: Path, df: pd.DataFrame, front: pd.DataFrame, profile, settings):
    """Yield (row, PairedLatency) for every Pareto model timed interleaved with the dense trial's model, with
    ``settings`` (usually longer than the search's). Models are exported first where a run did not export them."""
    import dataclasses

    from hwprune.latency import make_backend

    backend = make_backend(dataclasses.replace(profile, measure=settings))
    dense = df[df.role == "dense"].iloc[0]
    # the files export_trial writes: the one image input at the profile's batch, or the workload's token inputs
    shape = workload.latency_inputs(profile) if workload.inputs.is_image else workload.resolved_inputs
    paths = _exported(workload, run_dir, pd.concat([dense.to_frame().T, front]))
    for _, row in front.iterrows():
        yield row, backend.measure_onnx_pair(str(paths[int(row.trial)]), str(paths[int(dense.trial)]), shape)


def retime_alone(workload: Workload, run_dir: Path, df: pd.DataFrame, rows: pd.DataFrame, profile, rounds: int = 3,
                 log=print) -> Dict[int, Tuple[float, float, float]]:
    """trial -> (median, min, max) over ``rounds`` of its speedup over the dense trial's model, every model timed
    ALONE in a fresh process in rotating order (``hwprune verify``'s ground truth), for any trials of a run
    (baselines too, not only the front). Batch-1 ONNX Runtime profiles."""
    from hwprune.verify import speedup_over_rounds, time_files_alone

    dense = df[df.role == "dense"].iloc[0]
    paths = _exported(workload, run_dir, pd.concat([dense.to_frame().T, rows]))
    times = time_files_alone(profile, {f"trial-{t}": p for t, p in paths.items()}, rounds, log)
    ref = times[f"trial-{int(dense.trial)}"]
    return {t: speedup_over_rounds(ref, times[f"trial-{t}"]) for t in paths}


def write_results(study: optuna.Study, workload: Workload, run_dir: Path, export: bool = True,
                  log=print) -> Dict[str, pd.DataFrame]:
    """trials.csv, pareto.csv, pareto.png and models/trial-N/ for every Pareto-optimal trial."""
    run_dir = Path(run_dir)
    df = trials_frame(study)
    if df.empty:
        raise RunError(f"study {study.study_name!r} has no trials yet; run hwprune search first")
    objectives = objective_columns(study)
    front = pareto_frame(df, objectives)
    write_text(run_dir / "trials.csv", df.to_csv(index=False))
    write_text(run_dir / "pareto.csv", front.to_csv(index=False))
    budget = study.user_attrs.get("latency_budget_ms")
    if not front.empty or not df[df.state == "complete"].empty:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plot_pareto(df, front, objectives, run_dir / "pareto.png", budget, study.user_attrs.get("budget_profile"))
    if export:
        import shutil

        keep = {f"trial-{int(t)}" for t in front.trial}
        for stale in (run_dir / "models").glob("trial-*"):  # from an earlier front of this run directory
            if stale.name not in keep:
                shutil.rmtree(stale)
        for _, row in front.iterrows():
            export_trial(workload, run_dir, row, run_dir / "models" / f"trial-{int(row['trial'])}")
    return {"trials": df, "pareto": front}


def load_results(run_dir: Path) -> Dict[str, pd.DataFrame]:
    """The trials and Pareto tables of a run directory as DataFrames (the Python API's view of a run)."""
    run_dir = Path(run_dir)
    out = {}
    for name in ("trials", "pareto"):
        p = run_dir / f"{name}.csv"
        if not p.is_file():
            raise RunError(f"{p} does not exist; is {run_dir} a hwprune run directory (hwprune search --out)?")
        try:
            out[name] = pd.read_csv(p)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise RunError(f"{p} is unreadable ({type(e).__name__}); rerun the same hwprune search command: it "
                           f"rewrites the results from the study, which holds every finished trial") from e
    return out
