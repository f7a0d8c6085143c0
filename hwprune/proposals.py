"""Hardware-aware proposals (NetAdapt / HALP style): plans built from what each group costs and saves.

For every group and every ratio of the space's grid, prune that group alone and measure two things: the accuracy
drop with BN recalibration only (cheap: no fine-tuning) and the latency saved on the budget profile (the search's
own meter: interleaved with dense, cached by architecture). A greedy knapsack then raises, step by step, the group
ratio with the most latency saved per accuracy lost, assuming effects add up, and records a plan each time the
estimate crosses a latency target. The plans are enqueued as early trials (user attribute ``proposal``), so the
full pipeline, not the estimate, decides where they land.

Where the space may drop residual blocks (``depth`` on every structure layer), each block's removal is one more
item of the knapsack, measured the same way; dropping a block releases the channel groups that live inside it
(their ratios go back to 0: the block's removal takes them along), so their savings are not counted twice.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import optuna
import pandas as pd

from hwprune.recover import recalibrate_bn
from hwprune.search import PARAM_PREFIX, STRUCTURES_ENQUEUED
from hwprune.structures import get_structure
from hwprune.structures.model import normalize_spec
from hwprune.workload import Workload

TARGETS = (0.5, 0.35, 0.25, 0.18)  # estimated latency relative to dense at which a plan is recorded
EPS_DROP = 1e-3  # 0.1 pp: keeps a free (or noisy, negative) drop from dividing by zero


@dataclass(frozen=True)
class GroupEffect:
    group: str
    ratio: float
    accuracy_drop: float  # dense accuracy - accuracy with only this group pruned (BN recalibrated, not fine-tuned)
    latency_saved_ms: float
    kind: str = "channels"  # or "depth": ``group`` is then a residual block dropped whole (ratio 1.0)


def depth_layers(workload: Workload, offered: Sequence[str]) -> List[str]:
    """The structure layers the proposals may drop whole: all of them when ``depth`` is offered (``offered``: the
    structures the search offers) and applies to every one (so an enqueued proposal fixes every layer's structure
    parameters), none otherwise."""
    if not workload.structure_layers or "depth" not in offered:
        return []
    modules = dict(workload.model.named_modules())
    depth = get_structure("depth")
    layers = list(workload.structure_layers)
    return layers if all(depth.applies_to(modules[n]) for n in layers) else []


def inner_groups(workload: Workload, blocks: Sequence[str]) -> Dict[str, List[str]]:
    """For each block, the channel groups whose every member lives inside it (they vanish with the block)."""
    return {b: [g.name for g in workload.groups if all(m.startswith(b + ".") for m in g.members)] for b in blocks}




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
                    log: Callable[[str], None] = print, blocks: Sequence[str] = ()) -> List[GroupEffect]:
    """One pruned model per (group, nonzero grid ratio), and per droppable block: accuracy drop and latency saved."""
    base_acc = cheap_accuracy(workload, {}, bn_batches, seed)  # dense, treated like the candidates
    base_ms = meter.reference_ms[profile]
    workdir = Path(workdir)

    def probe(name: str, ratio: float, plan, kind: str = "channels") -> GroupEffect:
        model = workload.apply(plan)[0]
        ms = meter.measure(model, workdir / "probe")[profile].median_ms
        acc = _recalibrated_accuracy(workload, model, bn_batches, seed)
        return GroupEffect(name, float(ratio), base_acc - acc, base_ms - ms, kind)

    effects = [probe(g.name, r, workload.plan({g.name: r}))
               for g in workload.groups for r in workload.space.ratios if r > 0]
    for block in blocks:
        plan = workload.dense_plan()
        plan.structures[block] = normalize_spec(block, {"structure": "depth", "ratio": 1.0, "params": {}})
        effects.append(probe(block, 1.0, plan, kind="depth"))
    shutil.rmtree(workdir / "probe", ignore_errors=True)
    removals = sum(e.kind == "depth" for e in effects)
    log(f"proposals: measured {len(effects) - removals} single-group effects"
        + (f" and {removals} block removals" if removals else "")
        + f" (accuracy with BN recalibration only, latency on {profile})")
    return effects


def greedy_plans(effects: Sequence[GroupEffect], groups: Sequence[str], dense_ms: float,
                 targets: Sequence[float] = TARGETS,
                 inside: Optional[Dict[str, Sequence[str]]] = None) -> List[Tuple[str, Dict[str, float]]]:
    """Greedy knapsack over the measured effects: repeatedly take the ratio increase with the most latency saved
    per accuracy lost; record the plan when the estimated latency first falls under each target.

    Depth effects (a block's name at ratio 1.0) join the same race; ``inside`` maps each block to the groups it
    contains: a block's gain is net of what those groups already saved, and once it is dropped they are reset
    to 0 and frozen. Plans map every group and every block to its ratio."""
    inside = {b: list(gs) for b, gs in (inside or {}).items()}
    table = {(e.group, e.ratio): e for e in effects}
    ratios = {g: 0.0 for g in groups}
    ratios.update({e.group: 0.0 for e in effects if e.kind == "depth"})
    frozen: set = set()
    zero = lambda g: GroupEffect(g, 0.0, 0.0, 0.0)  # noqa: E731
    current = lambda g: table.get((g, ratios[g]), zero(g))  # noqa: E731
    plans, pending = [], sorted(targets, reverse=True)
    saved = 0.0
    while pending:
        best, best_score = None, 0.0
        for (g, r), e in table.items():
            if g not in ratios or g in frozen or r <= ratios[g]:
                continue
            released = [current(x) for x in inside.get(g, ()) if e.kind == "depth"]
            cur = current(g)
            gain = e.latency_saved_ms - cur.latency_saved_ms - sum(x.latency_saved_ms for x in released)
            if gain <= 0:
                continue
            drop = e.accuracy_drop - cur.accuracy_drop - sum(x.accuracy_drop for x in released)
            score = gain / (max(drop, 0.0) + EPS_DROP)
            if score > best_score:
                best, best_score = (g, r, gain), score
        if best is None:
            break
        g, r, gain = best
        if table[(g, r)].kind == "depth":
            for x in inside.get(g, ()):
                ratios[x] = 0.0
                frozen.add(x)
        ratios[g] = r
        saved += gain
        while pending and dense_ms - saved <= pending[0] * dense_ms:
            plans.append((f"greedy@{pending.pop(0):g}", dict(ratios)))
    if pending and saved > 0 and (not plans or plans[-1][1] != ratios):  # targets out of reach: the furthest plan
        plans.append((f"greedy@{(dense_ms - saved) / dense_ms:.2g}", dict(ratios)))
    return plans


def trial_params(workload: Workload, ratios: Dict[str, float], blocks: Sequence[str],
                 offered: Sequence[str]) -> Dict[str, object]:
    """The Optuna parameters that make ``plan_from_trial`` build this plan: every group's ratio and, where blocks
    may be dropped, every structure layer's choice (depth, dropped or kept), so the sampler draws none of them."""
    params: Dict[str, object] = {PARAM_PREFIX + g.name: ratios.get(g.name, 0.0) for g in workload.groups}
    if blocks:
        modules = dict(workload.model.named_modules())
        for b in blocks:
            if sum(get_structure(s).applies_to(modules[b]) for s in offered) > 1:
                params[f"{b}.structure"] = "depth"
            params[f"{b}.depth.ratio"] = 1.0 if ratios.get(b, 0.0) > 0 else 0.0
    return params


def enqueue_proposals(study: optuna.Study, workload: Workload, meter, profile: str, run_dir: Path, max_trials: int,
                      seed: int = 0, log: Callable[[str], None] = print,
                      offered: Optional[Sequence[str]] = None) -> List[str]:
    """Measure the effects and enqueue the greedy plans once per study (user attribute ``proposal``); ``offered``:
    the layer structures the search offers (blocks are proposed for removal where it includes ``depth``)."""
    if study.user_attrs.get("proposals") is not None or workload.data is None or max_trials <= 0:
        return []
    if offered is None:  # the space's structures, as depth_layers reads them
        offered = list(workload.space.structures.allowed) if workload.space.structures is not None else []
    blocks = depth_layers(workload, offered)
    effects = measure_effects(workload, meter, profile, Path(run_dir), seed=seed, log=log, blocks=blocks)
    pd.DataFrame([asdict(e) for e in effects]).to_csv(Path(run_dir) / "sensitivity.csv", index=False)
    tags, seen = [], set()
    for tag, ratios in greedy_plans(effects, [g.name for g in workload.groups], meter.reference_ms[profile],
                                    inside=inner_groups(workload, blocks)):
        key = tuple(sorted(ratios.items()))
        if key in seen or len(tags) >= max_trials:
            continue
        seen.add(key)
        attrs = {"proposal": tag}
        if blocks:
            attrs[STRUCTURES_ENQUEUED] = True
        study.enqueue_trial(trial_params(workload, ratios, blocks, offered), user_attrs=attrs)
        tags.append(tag)
    study.set_user_attr("proposals", tags)
    log(f"proposals: {', '.join(tags) or 'none'} enqueued (greedy latency saved per accuracy lost)")
    return tags
