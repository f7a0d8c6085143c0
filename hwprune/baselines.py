"""What a practitioner gets by hand, measured in every run: uniform, global-magnitude and random pruning plans.

Baselines go through the same trial pipeline (``run_trial``: same latency meter and dense reference, same recovery
budget, same validation split) as the search's candidates. By default a search enqueues the uniform sweep and one
global-magnitude plan as its first trials (warm start, tagged with the user attribute ``baseline``), so they cost
no extra trials and the sampler starts from known-good plans. ``hwprune baseline`` adds more (other ratios, the
exact un-snapped global plans, random plans) under ``RUN/baselines/``. Every run then writes ``baselines.csv``,
``hypervolume.csv``/``.png`` and ``summary.json``: the front's hypervolume relative to each baseline's, and says
plainly when the search did not beat one.
"""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import optuna
import pandas as pd

from hwprune import graph, transformer_groups
from hwprune.errors import ConfigError
from hwprune.hypervolume import (DEFAULT_MAX_DROP, Reference, best_speedup_within, box_area, ceiling_at_floor,
                                 drop_allowed_at_floor, hypervolume, hypervolume_history,
                                 lossless_equivalent_speedup)
from hwprune.search import PARAM_PREFIX
from hwprune.workload import Workload

METHODS = ("uniform", "global", "random")
# The uniform sweep: the space's grid ratios from 0.25 up, the grid's largest included: a search whose grid goes
# beyond the sweep would otherwise own that corner of the front unopposed.
SWEEP_RANGE = (0.25, 1.0)
GLOBAL_WARM_RATIO = 0.5
FISHER_WARM_RATIOS = (0.3, 0.4, 0.5)  # fractions of the heads' and MLPs' MACs removed

WITHIN_PP = (0.5, 1.0, 2.0)  # quality drops (pp of accuracy or fidelity) at which the best speedups are reported
HEADROOM_TARGET = 1.10  # the lead over a baseline whose reachability each run reports (a 10% larger hypervolume)


def sweep_ratios(grid: Sequence[float], low: float = SWEEP_RANGE[0], high: float = SWEEP_RANGE[1]) -> List[float]:
    """The uniform sweep: every nonzero grid ratio in [low, high] (the largest grid ratio if none is)."""
    picked = sorted(r for r in grid if r > 0 and low - 1e-9 <= r <= high + 1e-9)
    return picked or [max(grid)]


def _snap(value: float, grid: Sequence[float]) -> float:
    return min(grid, key=lambda r: abs(r - value))


_UNIT_MACS: Dict[Tuple[int, Tuple[str, ...], object], Dict[str, float]] = {}


def unit_macs(workload: Workload, groups: Sequence) -> Dict[str, float]:
    """MACs one unit (head, MLP neuron) of each group costs, measured (fvcore): the group pruned alone at the grid's
    largest ratio, MACs saved divided by the units removed. Once per model, groups and input length."""
    from hwprune.costs import count_macs

    key = (id(workload.model), tuple(g.name for g in groups), json.dumps(workload.resolved_inputs.to_dict(), sort_keys=True))
    if key not in _UNIT_MACS:
        dense = count_macs(workload.model, workload.example_input)
        ratio = max(workload.space.ratios) or 0.5
        costs = {}
        for g in groups:
            model, recorded, _ = workload.apply(workload.plan({g.name: ratio}))
            if transformer_groups.kind_of(g.name) == transformer_groups.HEADS:
                units = len(recorded.removed.get(g.name, []))
            else:
                units = g.channels - dict(model.named_modules())[transformer_groups.module_of(g.name)].out_features
            if units > 0:
                costs[g.name] = (dense - count_macs(model, workload.example_input)) / units
        _UNIT_MACS[key] = costs
    return _UNIT_MACS[key]


def fisher_plan_ratios(workload: Workload, fraction: float) -> Dict[str, float]:
    """Kwon et al.'s global allocation for the heads: and mlp: groups: remove ``fraction`` of their MACs, the units
    with the least Fisher information per MAC first, wherever they are (``hwprune.fisher.allocate``). Per-group
    ratios = units removed / units (depth groups and channel groups: 0)."""
    from hwprune import fisher

    scores = workload.importance_scores() or {}
    groups = [g for g in workload.groups if g.name in scores]
    counts = fisher.allocate(scores, unit_macs(workload, groups), fraction,
                             keep_one=[g.name for g in groups if g.name.startswith(transformer_groups.HEADS)])
    out = {g.name: 0.0 for g in workload.groups}
    out.update({g: k / len(scores[g]) for g, k in counts.items()})
    return out


def global_plan_ratios(workload: Workload, ratio: float) -> Dict[str, float]:
    """Per-group ratios of torch-pruning's global magnitude pruning at ``ratio`` of all prunable channels.
    Transformer groups (heads:, mlp:, depth:) have no place in that channel ranking: they take ``ratio`` itself,
    except under the ``fisher`` criterion (with data), where heads and MLP neurons are ranked globally by Fisher per
    MAC (``fisher_plan_ratios``: ``ratio`` of their MACs removed)."""
    if workload.space.importance == "fisher" and workload.data is not None and any(
            transformer_groups.kind_of(g.name) in (transformer_groups.HEADS, transformer_groups.MLP)
            for g in workload.groups):
        out = fisher_plan_ratios(workload, ratio)
        channel = [g.name for g in workload.groups if not transformer_groups.kind_of(g.name)]
        if channel:
            out.update(graph.global_ratios(workload.model, workload.example_input, ratio, channel, "l1",
                                           workload.space.round_to, workload.ignored,
                                           max_group_ratio=max(workload.space.ratios)))
        return out
    out = {g.name: float(ratio) for g in workload.groups if transformer_groups.kind_of(g.name)}
    channel = [g.name for g in workload.groups if not transformer_groups.kind_of(g.name)]
    if channel:
        out.update(graph.global_ratios(workload.model, workload.example_input, ratio, channel,
                                       "l1" if workload.space.importance in ("taylor", "fisher")
                                       else workload.space.importance,
                                       workload.space.round_to, workload.ignored,
                                       max_group_ratio=max(workload.space.ratios)))
    return out


def baseline_plans(workload: Workload, method: str, ratios: Optional[Sequence[float]] = None, count: int = 10,
                   seed: int = 0, snap: bool = False) -> List[Tuple[str, Dict[str, float]]]:
    """(tag, per-group ratios) of a baseline method. ``snap`` puts global ratios on the space's grid (needed for
    enqueued trials, whose parameters are categorical)."""
    grid = list(workload.space.ratios)
    if method == "uniform":
        return [(f"uniform@{r:g}", {g.name: float(r) for g in workload.groups}) for r in ratios or sweep_ratios(grid)]
    if method == "global":
        out = []
        for r in ratios or [0.25, GLOBAL_WARM_RATIO, 0.75]:
            per_group = global_plan_ratios(workload, r)
            if snap:
                per_group = {k: _snap(v, grid) for k, v in per_group.items()}
            out.append((f"global@{r:g}", per_group))
        return out
    if method == "random":
        rng = random.Random(seed + 7919)  # a stream of its own, not the sampler's
        return [(f"random#{k}", {g.name: rng.choice(grid) for g in workload.groups}) for k in range(count)]
    raise ConfigError(f"unknown baseline method {method!r}; choose one of: {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------------------- warm start

def enqueue_warm_start(study: optuna.Study, workload: Workload, max_trials: int,
                       log: Callable[[str], None] = print) -> List[str]:
    """Enqueue the uniform sweep and the global plan(s) (snapped to the grid; magnitude, or Fisher per MAC at a few
    fractions under the fisher criterion) once per study, tagged with
    user attribute ``baseline``; at most ``max_trials`` of them. Returns the tags enqueued."""
    if study.user_attrs.get("warm_start") is not None:
        return []
    # under the fisher criterion the global plans are Kwon et al.'s allocation, strong enough to seed a few targets
    fisher = workload.space.importance == "fisher" and workload.data is not None
    plans = baseline_plans(workload, "uniform") + baseline_plans(
        workload, "global", FISHER_WARM_RATIOS if fisher else [GLOBAL_WARM_RATIO], snap=True)
    seen, tags = set(), []
    for tag, ratios in plans[:max(0, max_trials)]:
        key = tuple(sorted(ratios.items()))
        if key in seen:  # the snapped global plan can equal a uniform one
            continue
        seen.add(key)
        study.enqueue_trial({PARAM_PREFIX + k: v for k, v in ratios.items()}, user_attrs={"baseline": tag})
        tags.append(tag)
    study.set_user_attr("warm_start", tags)
    if tags:
        log(f"warm start: {', '.join(tags)} enqueued as the first trials after dense")
    return tags


# ---------------------------------------------------------------------------------------- hwprune baseline

def meter_for_run(study: optuna.Study, workload: Workload, run_dir: Path):
    """A latency meter on the run's profiles that scales by the study's own dense reference, like its trials."""
    from hwprune.config import load_profiles
    from hwprune.trial import LatencyMeter

    meter = LatencyMeter(load_profiles(study.user_attrs["profiles"]), workload.model, workload.inputs, run_dir)
    stored = study.user_attrs.get("reference_ms", {})
    meter.reference_ms.update({k: v for k, v in stored.items() if k in meter.reference_ms})
    return meter


def run_baselines(workload: Workload, meter, run_dir: Path, method: str, ratios: Optional[Sequence[float]] = None,
                  count: int = 10, seed: int = 0, budget_ms: Optional[float] = None,
                  budget_profile: Optional[str] = None, existing: Sequence[str] = (),
                  log: Callable[[str], None] = print) -> List[dict]:
    """Evaluate a baseline method's plans with the search's trial pipeline into ``RUN/baselines/TAG/``. Tags in
    ``existing`` (already recorded as warm-start trials or earlier baseline runs) are not evaluated again."""
    from hwprune.trial import run_trial

    rows = []
    for tag, ratios_ in baseline_plans(workload, method, ratios, count, seed):
        if tag in existing:
            log(f"{tag}: already recorded in this run; not evaluated again")
            continue
        workdir = Path(run_dir) / "baselines" / tag
        outcome, _ = run_trial(workload, workload.plan(ratios_), meter, workdir, budget_ms, budget_profile, seed=seed)
        for onnx in workdir.glob("*.onnx"):
            onnx.unlink()
        metrics = {**outcome.metrics(), "baseline": tag, "method": method}
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
        acc = outcome.describe_quality() if outcome.quality else outcome.reason or "not trained"
        lats = "  ".join(f"{k} {v.median_ms:.3f} ms" for k, v in outcome.latency.items())
        log(f"{tag}: {acc}  {lats}")
        rows.append(metrics)
    return rows


# ------------------------------------------------------------------------------------- tables and summary

def baselines_frame(study: optuna.Study, trials: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """Every baseline of the run: warm-start trials of the study and ``hwprune baseline`` results."""
    tags = {t.number: t.user_attrs["baseline"] for t in study.trials if "baseline" in t.user_attrs}
    rows = []
    if tags and not trials.empty:
        for _, r in trials[trials.trial.isin(list(tags))].iterrows():
            tag = tags[int(r.trial)]
            rows.append({"baseline": tag, "method": tag.split("@")[0].split("#")[0], "source": "warm-start trial",
                         **{k: v for k, v in r.items() if k not in ("role",)}})
    for path in sorted(Path(run_dir).glob("baselines/*/metrics.json")):
        m = json.loads(path.read_text())
        state = "complete" if m.get("feasible", True) else "infeasible"
        rows.append({"baseline": m["baseline"], "method": m["method"], "source": "hwprune baseline", "trial": None,
                     "state": state, "plan_summary": m.get("plan", ""),
                     **{k: v for k, v in m.items() if k not in ("baseline", "method", "plan")}})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["trial"] = frame["trial"].astype("Int64")  # empty for hwprune baseline rows
    return frame


def _points(frame: pd.DataFrame, col: str, quality: str = "accuracy") -> List[Tuple[float, float]]:
    if frame.empty or col not in frame.columns or quality not in frame.columns:
        return []
    ok = frame[(frame.state == "complete") & frame[quality].notna() & frame[col].notna()]
    if "feasible" in ok.columns:
        ok = ok[ok.feasible.astype(bool)]
    return list(zip(ok[col].astype(float), ok[quality].astype(float)))


def _fastest(trials: pd.DataFrame, col: str, baselines: pd.DataFrame) -> Optional[float]:
    """The lowest latency any completed plan of the run measured (search trials and baseline results), accurate or
    not: where this model's latency stops falling on this profile."""
    values = []
    for frame in (trials, baselines):
        if not frame.empty and col in frame.columns and "state" in frame.columns:
            v = pd.to_numeric(frame.loc[frame.state == "complete", col], errors="coerce")
            values.extend(float(x) for x in v if pd.notna(x) and x > 0)
    return min(values) if values else None


def compare(trials: pd.DataFrame, baselines: pd.DataFrame, profile: str,
            max_drop: float = DEFAULT_MAX_DROP, quality: str = "accuracy") -> Dict[str, object]:
    """The front's hypervolume against each baseline method's, on ``profile``; pure function of the tables.
    ``quality``: the maximised quality column (accuracy, agreement, cosine or exp_neg_kl)."""
    col = f"latency_ms:{profile}"
    dense = trials[(trials.role == "dense") & (trials.state == "complete")]
    if dense.empty or quality not in dense.columns or pd.isna(dense.iloc[0][quality]):
        return {"note": f"no completed dense trial with {quality}: no hypervolume"}
    d = dense.iloc[0]
    ref = Reference(float(d[col]), float(d[quality]), max_drop, quality)
    tagged = set(baselines.trial.dropna().astype(int)) if "trial" in baselines.columns and not baselines.empty else set()
    search_pts = _points(trials, col, quality)
    own = trials[~trials.trial.isin(tagged)]
    floor_ms = _fastest(trials, col, baselines)
    hv_front = hypervolume(search_pts, ref)
    summary: Dict[str, object] = {
        "profile": profile, "reference_point": ref.to_dict(), "reference": ref.describe(),
        "hypervolume": {"search": hv_front, "search_without_warm_start": hypervolume(_points(own, col, quality), ref)},
        "best_speedup_within_pp": {"search": {f"{p:g}": best_speedup_within(search_pts, ref, p / 100)
                                              for p in WITHIN_PP}},
        "relative": {}, "headroom": {}, "verdict": [],
    }
    for method in METHODS:
        sub = baselines[baselines.method == method] if not baselines.empty else baselines
        pts = _points(sub, col, quality)
        if not pts:
            continue
        hv = hypervolume(pts, ref)
        summary["hypervolume"][method] = hv
        summary["best_speedup_within_pp"][method] = {f"{p:g}": best_speedup_within(pts, ref, p / 100)
                                                     for p in WITHIN_PP}
        rel = hv_front / hv if hv > 0 else None
        summary["relative"][method] = rel
        if rel is None:
            line = f"{method}: its plans have no area inside the reference box; the search's is {hv_front:.4g}"
        elif rel > 1.0 + 1e-9:
            line = f"the search beat {method}: front hypervolume {rel:.3f}x {method}'s ({hv_front:.4g} vs {hv:.4g})"
        else:
            line = (f"the search did NOT beat {method}: front hypervolume {rel:.3f}x {method}'s "
                    f"({hv_front:.4g} vs {hv:.4g})")
        summary["verdict"].append(line)
        if hv > 0:
            # Headroom: how much of the box the baseline already covers bounds what any search can add.
            box = box_area(ref)
            # ceiling: the baseline plus a lossless model with no latency at all (its own area above dense kept)
            room = {"covers": hv / box, "lossless_equivalent_speedup": lossless_equivalent_speedup(hv, ref),
                    "ceiling": ceiling_at_floor(pts, 0.0, ref)}
            summary["headroom"][method] = room
            summary["verdict"].append(
                f"  {method} covers {100 * room['covers']:.0f}% of the reference box (as much as one model "
                f"{room['lossless_equivalent_speedup']:.1f}x faster than dense that loses nothing); a front whose other "
                f"models are no more accurate than dense can reach at most {room['ceiling']:.2f}x its hypervolume")
            if floor_ms is not None and floor_ms < ref.dense_ms:
                # The same bound where latency stops falling: the fastest model the run measured.
                allowed = drop_allowed_at_floor(pts, floor_ms, ref, HEADROOM_TARGET)
                room.update(floor_ms=floor_ms, floor_speedup=ref.dense_ms / floor_ms,
                            ceiling_at_floor=ceiling_at_floor(pts, floor_ms, ref),
                            target=HEADROOM_TARGET, drop_allowed_at_floor=allowed)
                reach = (f"{HEADROOM_TARGET:.2f}x needs a model that fast losing at most {100 * allowed:.2f} pp"
                         if allowed is not None else f"{HEADROOM_TARGET:.2f}x is out of reach for models no faster than that")
                summary["verdict"].append(
                    f"  at the fastest latency any plan reached ({room['floor_speedup']:.2f}x faster than dense) a "
                    f"lossless model would make {room['ceiling_at_floor']:.3f}x {method}'s hypervolume: {reach}")
    return summary


def write_baseline_summary(study: optuna.Study, run_dir: Path, tables: Dict[str, pd.DataFrame],
                           log: Callable[[str], None] = print, max_drop: float = DEFAULT_MAX_DROP) -> Dict[str, object]:
    """baselines.csv, hypervolume.csv/.png, summary.json and pareto.png with the baselines drawn; prints the
    verdict. Runs without data (no accuracy or fidelity) get no hypervolume."""
    from hwprune.fidelity import WORST
    from hwprune.results import objective_columns, plot_pareto

    run_dir = Path(run_dir)
    trials, front = tables["trials"], tables["pareto"]
    base = baselines_frame(study, trials, run_dir)
    base.to_csv(run_dir / "baselines.csv", index=False)
    objectives = objective_columns(study)
    if not objectives or objectives[0] not in WORST or trials.empty:
        return {}
    q = objectives[0]
    profile = study.user_attrs.get("budget_profile") or objectives[1].split(":", 1)[1]
    summary = compare(trials, base, profile, max_drop, q)
    if "reference_point" not in summary:
        log(summary.get("note", ""))
        return summary
    ref = Reference(summary["reference_point"]["latency_ms"], summary["reference_point"][f"dense_{q}"], max_drop, q)
    col = f"latency_ms:{profile}"
    ok = trials[(trials.state == "complete") & trials[q].notna()]
    ok = ok[ok.feasible.astype(bool)]
    history = pd.DataFrame(hypervolume_history(list(zip(ok.trial, ok[col], ok[q])), ref),
                           columns=["trial", "hypervolume"])
    final = float(history.hypervolume.iloc[-1]) if not history.empty else 0.0
    history["fraction_of_final"] = history.hypervolume / final if final > 0 else 0.0
    history.to_csv(run_dir / "hypervolume.csv", index=False)
    within5 = history[history.fraction_of_final >= 0.95]
    summary["trial_within_5pct_of_final_hypervolume"] = int(within5.trial.iloc[0]) if not within5.empty else None
    summary["trials"] = int(len(trials))
    summary["quality"] = q
    if study.user_attrs.get("fidelity_screen"):
        summary["fidelity_screen"] = study.user_attrs["fidelity_screen"]
    _plot_history(history, summary, run_dir / "hypervolume.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plot_pareto(trials, front, objectives, run_dir / "pareto.png", study.user_attrs.get("latency_budget_ms"),
                    profile, baselines=base)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    log(summary["reference"])
    hv = summary["hypervolume"]
    log(f"front hypervolume {hv['search']:.4g} (without the warm-start trials {hv['search_without_warm_start']:.4g})")
    for line in summary["verdict"]:
        log(line)
    return summary


def _plot_history(history: pd.DataFrame, summary: Dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.step(history.trial, history.hypervolume, where="post", c="#16a", label="search front")
    colors = {"uniform": "#e80", "global": "#4a4", "random": "#a4a"}
    for method in METHODS:
        if method in summary["hypervolume"]:
            ax.axhline(summary["hypervolume"][method], ls="--", c=colors[method], label=f"{method} baseline")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"hypervolume (relative latency x {summary.get('quality', 'accuracy')})")
    ax.set_title(summary["reference"].split(";")[0], fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
