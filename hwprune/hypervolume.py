"""Hypervolume of accuracy-latency fronts, computed with Optuna's own exact hypervolume code.

Fronts are compared in a normalised plane that does not depend on the machine's absolute speed: x = latency
relative to the dense model on one profile (minimised), y = validation accuracy (maximised). The reference point
is (x = 1.0: as slow as dense, y = dense accuracy - ``max_drop``): a point only counts where it is faster than
dense and loses less than ``max_drop`` of accuracy, which is the region a practitioner would deploy from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
from optuna._hypervolume import compute_hypervolume  # Optuna's exact (WFG / 2-D sweep) implementation

DEFAULT_MAX_DROP = 0.05  # accuracy (fraction) below dense at the reference point: 5 percentage points


@dataclass(frozen=True)
class Reference:
    dense_ms: float
    dense_accuracy: float  # the dense trial's figure of the quality objective (accuracy, or a fidelity)
    max_drop: float = DEFAULT_MAX_DROP
    quality: str = "accuracy"  # the quality objective's column name, used in every label

    @property
    def accuracy_floor(self) -> float:
        return self.dense_accuracy - self.max_drop

    def describe(self) -> str:
        q = self.quality
        return (f"reference point: latency = dense ({self.dense_ms:.4g} ms, relative 1.0), {q} = dense - "
                f"{100 * self.max_drop:g} pp ({self.accuracy_floor:.4f}); area in (relative latency x {q})")

    def to_dict(self) -> Dict[str, float]:
        q = self.quality
        return {"latency_relative": 1.0, "latency_ms": self.dense_ms, q: self.accuracy_floor,
                f"dense_{q}": self.dense_accuracy, f"max_{q}_drop": self.max_drop}


def hypervolume(points: Iterable[Tuple[float, float]], ref: Reference) -> float:
    """Area dominated by ``(latency_ms, accuracy)`` points and bounded by the reference point. Points outside the
    reference box (slower than dense, or below the accuracy floor) add nothing."""
    losses = [(ms / ref.dense_ms, -acc) for ms, acc in points
              if ms is not None and acc is not None and np.isfinite(ms) and np.isfinite(acc)
              and ms < ref.dense_ms and acc > ref.accuracy_floor]
    if not losses:
        return 0.0
    return float(compute_hypervolume(np.asarray(losses, dtype=float), np.array([1.0, -ref.accuracy_floor])))


def box_area(ref: Reference) -> float:
    """Area of the whole reference box: relative latency 0..1 times the quality span from the floor to dense. Only a
    front with models of higher quality than dense can dominate more."""
    return ref.max_drop


def lossless_equivalent_speedup(area: float, ref: Reference) -> float:
    """The speedup of ONE model that loses nothing against dense and dominates the same ``area`` on its own
    ((1 - 1/s) * max_drop = area): a scale for hypervolumes a practitioner can read. inf from the whole box up."""
    fraction = area / box_area(ref)
    return float("inf") if fraction >= 1.0 else 1.0 / (1.0 - fraction)


def ceiling_at_floor(baseline: Iterable[Tuple[float, float]], floor_ms: float, ref: Reference) -> float:
    """The hypervolume of ``baseline`` plus ONE model as fast as ``floor_ms`` that loses nothing, relative to the
    baseline's own. ``floor_ms`` is the fastest latency any plan of the run reached: on a small model latency stops
    falling with MACs (fixed per-operator cost). For the run's own front (its models no faster than that, none more
    accurate than dense beyond the baseline's) this is a strict bound; ``floor_ms = 0`` gives the looser one where
    latency could reach zero. The baseline's own area above dense accuracy
    stays counted; models more accurate than dense could add more. inf when the baseline has no area."""
    pts = list(baseline)
    hv = hypervolume(pts, ref)
    if hv <= 0:
        return float("inf")
    return hypervolume(pts + [(floor_ms, ref.dense_accuracy)], ref) / hv


def drop_allowed_at_floor(baseline: Iterable[Tuple[float, float]], floor_ms: float, ref: Reference,
                          target: float) -> float | None:
    """The largest accuracy drop (fraction) a model as fast as ``floor_ms`` may lose so that it, added to the
    baseline, reaches ``target`` times the baseline's hypervolume: what a goal of ``target`` asks of the fastest
    model the device allows. None when even a lossless model there falls short (the goal is out of reach)."""
    pts = list(baseline)
    hv = hypervolume(pts, ref)
    if hv <= 0:
        return ref.max_drop
    def gain(drop: float) -> float:
        return hypervolume(pts + [(floor_ms, ref.dense_accuracy - drop)], ref) / hv
    if gain(0.0) < target:
        return None
    lo, hi = 0.0, ref.max_drop  # gain falls as the drop grows; bisect to 1e-5 (0.001 pp)
    while hi - lo > 1e-5:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gain(mid) >= target else (lo, mid)
    return lo


def hypervolume_history(points: Sequence[Tuple[int, float, float]], ref: Reference) -> List[Tuple[int, float]]:
    """(trial, hypervolume of every point up to and including that trial), in trial order."""
    out, seen = [], []
    for trial, ms, acc in sorted(points, key=lambda p: p[0]):
        seen.append((ms, acc))
        out.append((trial, hypervolume(seen, ref)))
    return out


def best_speedup_within(points: Iterable[Tuple[float, float]], ref: Reference, drop: float) -> float:
    """The largest dense/candidate latency ratio among points within ``drop`` accuracy of dense (1.0 if none)."""
    best = 1.0
    for ms, acc in points:
        if ms and acc is not None and np.isfinite(ms) and acc >= ref.dense_accuracy - drop - 1e-12:
            best = max(best, ref.dense_ms / ms)
    return best
