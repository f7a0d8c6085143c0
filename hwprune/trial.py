"""One candidate, start to finish: plan -> physically smaller model -> costs -> ONNX -> latency on every
profile -> (stop here if over the latency budget: no training is spent on it) -> recovery -> accuracy."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from hwprune.costs import Costs, measure_costs
from hwprune.export import to_onnx
from hwprune.latency import DeviceProfile, LatencyStats, make_backend
from hwprune.latency.base import measure_candidate
from hwprune.plan import PruningPlan, apply_plan
from hwprune.recover import evaluate, recover
from hwprune.workload import Workload


class LatencyMeter:
    """Measures a model on every profile. Backends are created once (a profile whose backend is missing fails
    here, before any trial runs)."""

    def __init__(self, profiles: Sequence[DeviceProfile]):
        self.profiles = list(profiles)
        self.backends = {p.name: make_backend(p) for p in self.profiles}

    def fingerprints(self) -> Dict[str, Dict[str, Any]]:
        return {name: b.fingerprint() for name, b in self.backends.items()}

    def measure(self, model: nn.Module, input_shape: Sequence[int], workdir: Path) -> Dict[str, LatencyStats]:
        """Latency per profile. One ONNX file per batch size in use, written under ``workdir``."""
        out: Dict[str, LatencyStats] = {}
        onnx_by_batch: Dict[int, Path] = {}
        for p in self.profiles:
            shape = (p.batch_size, *input_shape)
            if p.batch_size not in onnx_by_batch:
                onnx_by_batch[p.batch_size] = to_onnx(model, shape, Path(workdir) / f"model-b{p.batch_size}.onnx")
            out[p.name] = measure_candidate(self.backends[p.name], str(onnx_by_batch[p.batch_size]), model, shape)
        return out


@dataclass
class TrialOutcome:
    plan: PruningPlan
    costs: Costs
    latency: Dict[str, LatencyStats]
    accuracy: Optional[float] = None
    feasible: bool = True
    reason: str = ""
    seconds: Dict[str, float] = field(default_factory=dict)

    def metrics(self) -> Dict[str, Any]:
        """Flat, JSON-ready metrics (units in the names)."""
        m: Dict[str, Any] = {
            "accuracy": self.accuracy,
            "feasible": self.feasible,
            "reason": self.reason,
            **self.costs.to_dict(),
            "plan": self.plan.summary(),
        }
        for name, s in self.latency.items():
            m[f"latency_ms:{name}"] = s.median_ms
            m[f"latency_p10_ms:{name}"] = s.p10_ms
            m[f"latency_p90_ms:{name}"] = s.p90_ms
            m[f"latency_cv:{name}"] = s.cv
            m[f"latency_n:{name}"] = s.n
        m.update({f"seconds:{k}": v for k, v in self.seconds.items()})
        return m


def run_trial(
    workload: Workload,
    plan: PruningPlan,
    meter: LatencyMeter,
    workdir: Path,
    budget_ms: Optional[float] = None,
    budget_profile: Optional[str] = None,
    train: bool = True,
    seed: int = 0,
) -> "tuple[TrialOutcome, nn.Module]":
    """Evaluate one plan. Returns the outcome and the (recovered) pruned model."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    calibration = workload.calibration_batch() if plan.criterion == "taylor" else None
    model, plan = apply_plan(workload.model, plan, workload.example_input, calibration)
    (workdir / "plan.json").write_text(plan.to_json())
    t1 = time.perf_counter()
    costs = measure_costs(model, workload.example_input)
    latency = meter.measure(model, workload.input_shape, workdir)
    t2 = time.perf_counter()
    outcome = TrialOutcome(plan, costs, latency, seconds={"prune": t1 - t0, "measure": t2 - t1})
    if budget_ms is not None:
        name = budget_profile or meter.profiles[0].name
        if latency[name].median_ms > budget_ms:
            outcome.feasible = False
            outcome.reason = f"latency {latency[name].median_ms:.3f} ms on {name} exceeds the budget {budget_ms:g} ms"
            return outcome, model
    if train and workload.data is not None:
        teacher = workload.model if workload.space.recovery.distill else None
        model = recover(model, workload.data, workload.space.recovery, teacher=teacher, seed=seed)
        outcome.accuracy = evaluate(model, workload.data)
        outcome.seconds["recover"] = time.perf_counter() - t2
        torch.save(model.state_dict(), workdir / "state_dict.pt")
    (workdir / "metrics.json").write_text(json.dumps(outcome.metrics(), indent=2, sort_keys=True))
    return outcome, model
