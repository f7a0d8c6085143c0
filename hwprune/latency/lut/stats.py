"""Statistics of a latency table against whole-model measurements: the calibration line that turns a sum of
entries into a latency, and the predictor's error and rank agreement (scipy.stats)."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple

import numpy as np
from scipy import stats

SCALE_RANGE = (0.2, 5.0)  # a fitted scale outside it is taken as a degenerate fit


def fit_calibration(points: Sequence[Mapping[str, float]]) -> Tuple[float, float]:
    """(scale, overhead_ms) of ``measured = scale * table_sum + overhead``, fitted robustly with Theil-Sen (the
    median of pairwise slopes, then the median intercept ``median(measured - scale * table_sum)``), so one
    calibration model caught by interference does not tilt the line. With one distinct table sum (or a scale
    outside ``SCALE_RANGE``) the scale is 1 and the overhead the median residual."""
    s = np.array([p["table_sum_ms"] for p in points], dtype=np.float64)
    m = np.array([p["measured_ms"] for p in points], dtype=np.float64)
    if len(np.unique(s)) > 1:
        fit = stats.theilslopes(m, s, method="joint")
        if SCALE_RANGE[0] <= fit.slope <= SCALE_RANGE[1]:
            return float(fit.slope), float(fit.intercept)
    return 1.0, float(np.median(m - s))


def _correlation(fn, a: Sequence[float], b: Sequence[float]) -> float:
    """A scipy rank correlation's statistic; nan where it is undefined (fewer than two points, a constant side)."""
    if len(a) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # constant input: nan, which is the answer
        return float(fn(a, b).statistic)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank)."""
    return _correlation(stats.spearmanr, a, b)


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b."""
    return _correlation(stats.kendalltau, a, b)


def predictor_error(table, models_and_measured: Iterable[Tuple[Any, float]]) -> Dict[str, float]:
    """The table's error against real measurements. Each item is (pruned model | plan | {group: ratio} |
    predicted ms, measured ms). Returns mape (%), max_ape (%), bias (% mean signed error), spearman, kendall, n."""
    pred, meas = [], []
    for item, measured in models_and_measured:
        if isinstance(item, (int, float)):
            p = float(item)
        elif isinstance(item, Mapping) or hasattr(item, "ratios"):
            p = table.predict_plan(item)
        else:
            p = table.predict(item)
        pred.append(p)
        meas.append(float(measured))
    p, m = np.asarray(pred), np.asarray(meas)
    if len(p) == 0:
        raise ValueError("predictor_error needs at least one (model, measured_ms) pair")
    rel = (p - m) / m * 100.0
    return {
        "n": int(len(p)),
        "mape": float(np.mean(np.abs(rel))),
        "max_ape": float(np.max(np.abs(rel))),
        "bias": float(np.mean(rel)),
        "spearman": spearman(p, m),
        "kendall": kendall(p, m),
    }
