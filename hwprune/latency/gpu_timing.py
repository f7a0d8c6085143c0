"""Timing pieces for fast accelerators, where one call is shorter than the noise of timing it: samples of K
back-to-back calls, warm-up until the clocks are steady, and an optional cache flush between samples.

Torch-free (plain callables) so the arithmetic is unit-tested with fake clocks; the torch backend supplies CUDA
events and the flush buffer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median
from typing import Callable, List, Optional, Protocol


class Stopwatch(Protocol):
    """Brackets a timed region: ``start()`` before it, ``stop_ms()`` after it returns the elapsed ms (and blocks
    until the timed work is done)."""

    def start(self) -> None: ...

    def stop_ms(self) -> float: ...


class ClockStopwatch:
    """A host clock; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock stops."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sync: Optional[Callable[[], None]] = None):
        self.clock, self.sync, self._t0 = clock, sync, 0.0

    def start(self) -> None:
        self._t0 = self.clock()

    def stop_ms(self) -> float:
        if self.sync is not None:
            self.sync()
        return (self.clock() - self._t0) * 1000.0


def sampler(call: Callable[[], object], calls_per_sample: int, stopwatch: Stopwatch,
            before: Optional[Callable[[], None]] = None) -> Callable[[], float]:
    """One sample = the time of ``calls_per_sample`` back-to-back calls / ``calls_per_sample`` (ms per call).

    ``before`` (an L2 flush, say) runs ahead of the stopwatch, outside the timed region; with K > 1 only the first
    of the K calls meets the flushed cache."""
    k = int(calls_per_sample)
    if k < 1:
        raise ValueError(f"calls_per_sample must be >= 1, got {calls_per_sample!r}")

    def sample() -> float:
        if before is not None:
            before()
        stopwatch.start()
        for _ in range(k):
            call()
        return stopwatch.stop_ms() / k

    return sample


@dataclass(frozen=True)
class WarmUp:
    samples: int  # samples taken while warming up
    steady: bool  # False: stopped by the cap before two windows agreed
    median_ms: float  # median of the last window
    seconds: float


def warm_until_steady(sample: Callable[[], float], window: int = 10, tolerance: float = 0.01,
                      max_s: float = 10.0, min_samples: int = 0,
                      clock: Callable[[], float] = time.perf_counter) -> WarmUp:
    """Take untimed-for-the-result samples until the median of the last ``window`` samples differs from the
    median of the ``window`` before them by at most ``tolerance`` (relative), at least ``min_samples`` samples
    and at most ``max_s`` seconds. GPUs raise their clocks (and fill caches, autotune) over the first tens of
    milliseconds to seconds of work: timing before that measures the ramp, not the model."""
    if window < 1 or tolerance < 0 or max_s <= 0:
        raise ValueError("window >= 1, tolerance >= 0 and max_s > 0 are required")
    t0 = clock()
    samples: List[float] = []
    while True:
        samples.append(float(sample()))
        n = len(samples)
        if n >= max(2 * window, min_samples):
            prev, last = median(samples[-2 * window:-window]), median(samples[-window:])
            if abs(last - prev) <= tolerance * prev:
                return WarmUp(n, True, last, clock() - t0)
        if clock() - t0 >= max_s and n >= min_samples:
            return WarmUp(n, False, median(samples[-window:]), clock() - t0)
