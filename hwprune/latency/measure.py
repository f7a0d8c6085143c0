"""The measurement method every backend uses: warm up, then time repeatedly until the median is known precisely
enough (its 95% confidence interval within a relative width) or a time cap is reached.

The confidence interval of the median is distribution-free (binomial order statistics), because latency samples
are skewed and often multi-modal on shared machines. No torch import: the remote agent uses this module.
"""
from __future__ import annotations

import math
import time
from typing import Callable, List, Sequence, Tuple

import numpy as np

from hwprune.latency.base import LatencyStats, MeasureSettings

_Z95 = 1.959963984540054


def median_ci(sorted_samples: Sequence[float], z: float = _Z95) -> Tuple[float, float]:
    """95% CI of the median from order statistics: ranks n/2 -+ z*sqrt(n)/2 (normal approx. to the binomial)."""
    n = len(sorted_samples)
    if n == 0:
        raise ValueError("no samples")
    half = z * math.sqrt(n) / 2.0
    lo = max(0, int(math.floor(n / 2.0 - half)))
    hi = min(n - 1, int(math.ceil(n / 2.0 + half)) - 1)
    hi = max(hi, lo)
    return float(sorted_samples[lo]), float(sorted_samples[hi])


def summarize(samples_ms: Sequence[float]) -> LatencyStats:
    """Statistics of a list of per-call latencies (ms)."""
    arr = np.sort(np.asarray(samples_ms, dtype=np.float64))
    if arr.size == 0:
        raise ValueError("no latency samples to summarize")
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    lo, hi = median_ci(arr)
    return LatencyStats(
        median_ms=float(np.median(arr)),
        p10_ms=float(np.percentile(arr, 10)),
        p90_ms=float(np.percentile(arr, 90)),
        mean_ms=mean,
        cv=std / mean if mean > 0 else 0.0,
        n=int(arr.size),
        ci_low_ms=lo,
        ci_high_ms=hi,
        samples_ms=tuple(float(x) for x in samples_ms),
    )


def precise_enough(samples_ms: Sequence[float], target_rel_ci: float) -> bool:
    """True when the median's 95% CI half-width is within ``target_rel_ci`` of the median."""
    arr = np.sort(np.asarray(samples_ms, dtype=np.float64))
    med = float(np.median(arr))
    lo, hi = median_ci(arr)
    return med > 0 and (hi - lo) / 2.0 <= target_rel_ci * med


def measure(
    run_once: Callable[[], object],
    settings: MeasureSettings = MeasureSettings(),
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Time ``run_once`` (which must block until its work is done) under the stopping rule in ``settings``."""
    for _ in range(settings.warmup):
        run_once()
    samples: List[float] = []
    started = clock()
    while len(samples) < settings.max_repeats:
        t0 = clock()
        run_once()
        samples.append((clock() - t0) * 1000.0)
        if len(samples) >= settings.min_repeats and (
            precise_enough(samples, settings.target_rel_ci) or clock() - started >= settings.time_cap_s
        ):
            break
    return summarize(samples)
