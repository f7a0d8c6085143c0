"""The measurement method every backend uses: warm up, then time repeatedly until the median is known precisely
enough (its 95% confidence interval within a relative width) or a time cap is reached.

The confidence interval of the median is distribution-free (binomial order statistics), because latency samples
are skewed and often multi-modal on shared machines.

``measure_interleaved`` times a candidate and a reference model alternately in the same time window and reports
the ratio of their medians: drift of the machine (thermal state, other processes, frequency scaling) affects both
alike, so the ratio is far more repeatable across a long search than either absolute number.

No torch import: the remote agent uses this module.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from hwprune.latency.base import LatencyStats, MeasureSettings, PairedLatency

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


def _timer(run: Callable[[], object], clock: Callable[[], float], returns_ms: bool) -> Callable[[], float]:
    """A call that runs ``run`` once and returns its latency in ms (timed by ``clock``, or reported by ``run``)."""
    if returns_ms:
        return lambda: float(run())  # type: ignore[arg-type]

    def timed() -> float:
        t0 = clock()
        run()
        return (clock() - t0) * 1000.0

    return timed


def measure(
    run_once: Callable[[], object],
    settings: MeasureSettings = MeasureSettings(),
    clock: Callable[[], float] = time.perf_counter,
    returns_ms: bool = False,
) -> LatencyStats:
    """Time ``run_once`` (which must block until its work is done) under the stopping rule in ``settings``.

    Warm-up calls are not timed. Then calls are timed until at least ``min_repeats`` samples exist and either the
    median is precise enough or ``time_cap_s`` has passed since timing began, and never more than ``max_repeats``.
    With ``returns_ms=True`` the call reports its own latency in ms (e.g. from CUDA events) instead of being
    timed with ``clock``.
    """
    for _ in range(settings.warmup):
        run_once()
    timed = _timer(run_once, clock, returns_ms)
    samples: List[float] = []
    started = clock()
    while len(samples) < settings.max_repeats:
        samples.append(timed())
        if len(samples) >= settings.min_repeats and (
            precise_enough(samples, settings.target_rel_ci) or clock() - started >= settings.time_cap_s
        ):
            break
    return summarize(samples)


def pair_from_samples(cand_ms: Sequence[float], ref_ms: Sequence[float], interleaved: bool = True) -> PairedLatency:
    """Candidate and reference statistics plus their ratio. When the samples were taken in alternation, the
    per-pair ratios give a second, paired estimate with its own 95% CI."""
    cand, ref = summarize(cand_ms), summarize(ref_ms)
    ratio = cand.median_ms / ref.median_ms if ref.median_ms > 0 else float("nan")
    if interleaved and len(cand_ms) == len(ref_ms):
        r = np.sort(np.asarray(cand_ms, dtype=np.float64) / np.maximum(np.asarray(ref_ms, dtype=np.float64), 1e-12))
        lo, hi = median_ci(r)
        pr = float(np.median(r))
    else:
        pr, lo, hi = ratio, float("nan"), float("nan")
    return PairedLatency(
        candidate=cand,
        reference=ref,
        ratio=ratio,
        pair_ratio_median=pr,
        pair_ratio_ci_low=lo,
        pair_ratio_ci_high=hi,
        interleaved=interleaved,
    )


def warm_up(run: Callable[[], object], calls: int, warm_s: float = 0.0,
            clock: Callable[[], float] = time.perf_counter) -> None:
    """Untimed calls after switching models: ``calls`` of them, then more (if at least one ran) until ``warm_s``
    has passed since the first began. Shared by the in-process blocks and the worker processes."""
    until = clock() + warm_s
    done = 0
    while done < calls or (done and clock() < until):
        run()
        done += 1


def _block_timer(run: Callable[[], object], timed: Callable[[], float], block: int,
                 warm_s: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """One sample of an interleaved measurement: with ``block`` > 1, untimed calls that absorb the cost of
    switching models (one, then more until ``warm_s`` has passed), then the median of ``block`` timed calls."""
    if block == 1:
        return timed

    def sample() -> float:
        warm_up(run, 1, warm_s, clock)
        return float(np.median([timed() for _ in range(block)]))

    return sample


def measure_interleaved(
    run_candidate: Callable[[], object],
    run_reference: Callable[[], object],
    settings: MeasureSettings = MeasureSettings(),
    clock: Callable[[], float] = time.perf_counter,
    returns_ms: bool = False,
) -> PairedLatency:
    """Time a candidate and a reference alternately in the same window (order swapped every pair: C R, R C, ...).

    Stops when both medians are precise enough, at ``max_repeats`` pairs, or when ``2 * time_cap_s`` has passed
    (the cap is per model, and there are two), but never before ``min_repeats`` pairs. Returns both statistics,
    the ratio of medians (candidate / reference) and the median of per-pair ratios with its 95% CI.
    """
    for _ in range(settings.warmup):
        run_candidate()
        run_reference()
    block = max(1, int(getattr(settings, "interleave_block", 1)))
    warm_s = float(getattr(settings, "switch_warmup_ms", 0.0)) / 1000.0
    tc = _block_timer(run_candidate, _timer(run_candidate, clock, returns_ms), block, warm_s, clock)
    tr = _block_timer(run_reference, _timer(run_reference, clock, returns_ms), block, warm_s, clock)
    cand: List[float] = []
    ref: List[float] = []
    started = clock()
    cap = 2.0 * settings.time_cap_s
    while len(cand) < settings.max_repeats:
        if len(cand) % 2 == 0:
            cand.append(tc())
            ref.append(tr())
        else:
            ref.append(tr())
            cand.append(tc())
        if len(cand) >= settings.min_repeats and (
            (precise_enough(cand, settings.target_rel_ci) and precise_enough(ref, settings.target_rel_ci))
            or clock() - started >= cap
        ):
            break
    return pair_from_samples(cand, ref, interleaved=True)


# ---------------------------------------------------------------------------------------------------------------
# Environment fingerprint: what identifies "the same device and software" for caching and reporting. It names no
# host, path or time, so a cache made on one machine is reused after a restart or on an identical machine.


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                low = line.lower()
                # x86: "model name"; many ARM kernels: "Model" (board) or "Hardware"; keep the first useful one
                if low.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def nvidia_gpu_names() -> Tuple[str, ...]:
    """GPU names from nvidia-smi, without importing any GPU library; empty when there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    if out.returncode != 0:
        return ()
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip())


def environment_fingerprint(**extra: Any) -> Dict[str, Any]:
    """CPU model, usable cores, architecture, OS, Python and numpy versions, plus whatever the backend adds
    (library versions, provider, threads, device). Hostname-independent by construction."""
    fp: Dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "machine": platform.machine(),
        "system": platform.system(),
        "python": "%d.%d" % sys.version_info[:2],
        "numpy": np.__version__,
    }
    fp.update(extra)
    return fp


def fingerprint_hash(fingerprint: Dict[str, Any]) -> str:
    """Short stable hash of a fingerprint (canonical JSON), for cache keys and file names."""
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def settings_to_dict(settings: MeasureSettings) -> Dict[str, Any]:
    return settings.to_dict()


def settings_from_dict(d: Optional[Dict[str, Any]], default: MeasureSettings = MeasureSettings()) -> MeasureSettings:
    """MeasureSettings from a plain mapping (unknown keys and bad values raise ConfigError, a ValueError kind
    callers already catch)."""
    return MeasureSettings.from_dict(d, base=default)
