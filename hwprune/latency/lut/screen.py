"""Screening search candidates with a latency table: skip measuring (and training) those predicted far over the
latency budget."""
from __future__ import annotations

from typing import Optional, Tuple

from hwprune.errors import ConfigError
from hwprune.latency.lut.table import LatencyTable


def screen(predicted_ms: float, budget_ms: float, margin: float = 0.1) -> bool:
    """True when a candidate should be measured: its prediction is not over the budget by more than ``margin``
    (relative: 0.1 lets predictions up to 1.1 x budget through to a real measurement)."""
    return predicted_ms <= budget_ms * (1.0 + margin)


class LutScreen:
    """Skips measurement (and training) of candidates the table predicts to be over the latency budget by more
    than ``margin``. Choose the margin above the table's measured error (``predictor_error``) so that a candidate
    near the budget is always measured."""

    def __init__(self, table: LatencyTable, budget_ms: float, margin: float = 0.1,
                 reference_ms: Optional[float] = None):
        """``reference_ms``: the dense model's latency as the search measures it now (e.g. a drift-corrected
        meter's reference). When given, predictions are relative to the table's own dense prediction and scaled to
        it (``predicted / table.dense_predicted_ms * reference_ms``), so a machine that is faster or slower than
        when the table was built shifts the prediction the same way as the measurements."""
        if budget_ms <= 0 or margin < 0:
            raise ConfigError(f"screening needs a positive budget and a margin >= 0, got {budget_ms!r}, {margin!r}")
        self.table = table
        self.budget_ms = float(budget_ms)
        self.margin = float(margin)
        self.reference_ms = reference_ms
        self._dense = table.dense_predicted_ms
        self.measured = 0
        self.skipped = 0

    def _decide(self, predicted: float) -> Tuple[bool, float]:
        if self.reference_ms is not None:
            predicted = predicted / self._dense * float(self.reference_ms)
        ok = screen(predicted, self.budget_ms, self.margin)
        if ok:
            self.measured += 1
        else:
            self.skipped += 1
        return ok, predicted

    def should_measure(self, model) -> Tuple[bool, float]:
        """(measure it?, predicted ms) for a pruned model."""
        return self._decide(self.table.predict(model))

    def should_measure_plan(self, plan) -> Tuple[bool, float]:
        """(measure it?, predicted ms) for a plan, before pruning (table arithmetic only)."""
        return self._decide(self.table.predict_plan(plan))

    def reason(self, predicted_ms: float) -> str:
        return (f"predicted latency {predicted_ms:.3f} ms on {self.table.profile} exceeds the budget "
                f"{self.budget_ms:g} ms by more than {self.margin:.0%} (not measured)")
