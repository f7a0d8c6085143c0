"""Hardware-aware proposals (NetAdapt / HALP style): plans built from what each group costs and saves.

For every group and every ratio of the space's grid, prune that group alone and measure two things: the accuracy
drop with BN recalibration only (cheap: no fine-tuning) and the latency saved on the budget profile (the search's
own meter: interleaved with dense, cached by architecture). A greedy knapsack then raises, step by step, the group
ratio with the most latency saved per accuracy lost, assuming effects add up, and records a plan each time the
estimate crosses a latency target. The plans are enqueued as early trials (user attribute ``proposal``), so the
full pipeline, not the estimate, decides where they land.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import optuna
import pandas as pd

from hwprune.recover import recalibrate_bn
from hwprune.search import PARAM_PREFIX
from hwprune.workload import Workload

TARGETS = (0.5, 0.35, 0.25, 0.18)  # estimated latency relative to dense at which a plan is recorded
EPS_DROP = 1e-3  # 0.1 pp: keeps a free (or noisy, negative) drop from dividing by zero


@dataclass(frozen=True)
class GroupEffect:
    group: str
    ratio: float
    accuracy_drop: float  # dense accuracy - accuracy with only this group pruned (BN recalibrated, not fine-tuned)
    latency_saved_ms: float


def cheap_accuracy(workload: Workload, ratios: Dict[str, float], bn_batches: int = 10, seed: int = 0) -> float:
    """Validation accuracy of a plan after BN recalibration only: the cheap fidelity (no fine-tuning)."""
    model = workload.apply(workload.plan(ratios))[0]
    return _recalibrated_accuracy(workload, model, bn_batches, seed)


def _recalibrated_accuracy(workload: Workload, model, bn_batches: int, seed: int) -> float:
    """The run's maximised quality (accuracy, or a fidelity to the dense model on unlabelled data) after BN
    recalibration; with a fidelity objective every "accuracy" of this module means that figure."""
    from hwprune.fidelity import OBJECTIVE_COLUMN, quality

    recalibrate_bn(model, workload.data, bn_batches, workload.space.recovery.batch_size, seed)
    figures = quality(model, workload.model, workload.data, workload.objective)
    return figures[OBJECTIVE_COLUMN[workload.objective]]


def measure_effects(workload: Workload, meter, profile: str, workdir: Path, bn_batches: int = 10, seed: int = 0,
                    log: Callable[[str], None] = print) -> List[GroupEffect]:
    """One pruned model per (group, nonzero grid ratio): accuracy drop and latency saved."""
    base_acc = cheap_accuracy(workload, {}, bn_batches, seed)  # dense, treated like the candidates
    base_ms = meter.reference_ms[profile]
    effects = []
    workdir = Path(workdir)
    for g in workload.groups:
        for r in [r for r in workload.space.ratios if r > 0]:
            model = workload.apply(workload.plan({g.name: r}))[0]
            ms = meter.measure(model, workdir / "probe")[profile].median_ms
            acc = _recalibrated_accuracy(workload, model, bn_batches, seed)
            effects.append(GroupEffect(g.name, float(r), base_acc - acc, base_ms - ms))
    shutil.rmtree(workdir / "probe", ignore_errors=True)
    log(f"proposals: measured {len(effects)} single-group effects (accuracy with BN recalibration only, "
        f"latency on {profile})")
    return effects


def greedy_plans(effects: Sequence[GroupEffect], groups: Sequence[str], dense_ms: float,
                 targets: Sequence[float] = TARGETS) -> List[Tuple[str, Dict[str, float]]]:
    """Greedy knapsack over the measured effects: repeatedly take the ratio increase with the most latency saved
    per accuracy lost; record the plan when the estimated latency first falls under each target."""
    table = {(e.group, e.ratio): e for e in effects}
    ratios = {g: 0.0 for g in groups}
    zero = lambda g: GroupEffect(g, 0.0, 0.0, 0.0)  # noqa: E731
    plans, pending = [], sorted(targets, reverse=True)
    saved = 0.0
    while pending:
        best, best_score = None, 0.0
        for (g, r), e in table.items():
            if g not in ratios or r <= ratios[g]:
                continue
            cur = table.get((g, ratios[g]), zero(g))
            gain = e.latency_saved_ms - cur.latency_saved_ms
            if gain <= 0:
                continue
            score = gain / (max(e.accuracy_drop - cur.accuracy_drop, 0.0) + EPS_DROP)
            if score > best_score:
                best, best_score = (g, r, gain), score
        if best is None:
            break
        g, r, gain = best
        ratios[g] = r
        saved += gain
        while pending and dense_ms - saved <= pending[0] * dense_ms:
            plans.append((f"greedy@{pending.pop(0):g}", dict(ratios)))
    if pending and saved > 0 and (not plans or plans[-1][1] != ratios):  # targets out of reach: the furthest plan
        plans.append((f"greedy@{(dense_ms - saved) / dense_ms:.2g}", dict(ratios)))
    return plans


def enqueue_proposals(study: optuna.Study, workload: Workload, meter, profile: str, run_dir: Path, max_trials: int,
                      seed: int = 0, log: Callable[[str], None] = print) -> List[str]:
    """Measure the effects and enqueue the greedy plans once per study (user attribute ``proposal``)."""
    if study.user_attrs.get("proposals") is not None or workload.data is None or max_trials <= 0:
        return []
    effects = measure_effects(workload, meter, profile, Path(run_dir), seed=seed, log=log)
    pd.DataFrame([asdict(e) for e in effects]).to_csv(Path(run_dir) / "sensitivity.csv", index=False)
    tags, seen = [], set()
    for tag, ratios in greedy_plans(effects, [g.name for g in workload.groups], meter.reference_ms[profile]):
        key = tuple(sorted(ratios.items()))
        if key in seen or len(tags) >= max_trials:
            continue
        seen.add(key)
        study.enqueue_trial({PARAM_PREFIX + k: v for k, v in ratios.items()}, user_attrs={"proposal": tag})
        tags.append(tag)
    study.set_user_attr("proposals", tags)
    log(f"proposals: {', '.join(tags) or 'none'} enqueued (greedy latency saved per accuracy lost)")
    return tags
