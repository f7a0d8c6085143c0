"""One candidate, start to finish: plan -> physically smaller model -> costs -> ONNX -> latency on every
profile -> (stop here if over the latency budget: no training is spent on it) -> recovery -> quality (accuracy, or
fidelity to the dense model on held-out inputs: hwprune.fidelity)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from hwprune.atomic import atomic_path, write_text
from hwprune.costs import Costs, measure_costs
from hwprune.export import to_onnx
from hwprune.inputs import InputSpec, measured_inputs
from hwprune.latency import (
    DeviceProfile,
    LatencyCache,
    LatencyStats,
    PairedLatency,
    cached_measure,
    cached_measure_pair,
    cache_key,
    file_sha256,
    make_backend,
    onnx_architecture_hash,
)
from hwprune.plan import PruningPlan
from hwprune.fidelity import OBJECTIVE_COLUMN, quality
from hwprune.recover import recalibrate_bn, recover
from hwprune.structures.delivered import PHYSICAL_FORMS, delivered_reports
from hwprune.workload import Workload


# Structures whose speed depends on weight VALUES (which entries are zero), not only on the architecture: where a
# profile accelerates one of them, two exports of one architecture may differ in latency, so the cache keys on the
# file's bytes rather than on the architecture.
_SHAPE_ONLY_STRUCTURES = {"filter", "channel", "depth", "strided"}


def weights_matter(profile: DeviceProfile) -> bool:
    return any(s not in _SHAPE_ONLY_STRUCTURES for s in profile.accelerates)


class LatencyMeter:
    """Measures candidates on every profile, each interleaved with the dense reference in the same time window.

    On ONNX Runtime profiles each model runs in a worker process of its own (``measure.isolation``), as it would
    deployed. A candidate's reported latency is drift-corrected: (candidate/reference ratio, measured in one
    window) x (the reference's latency, timed alone in a fresh process when the meter was created, with its CI);
    the raw candidate median is kept beside it. A speedup larger than the MACs cut allows is re-measured and, if
    it persists, flagged. Results are cached by model identity, device fingerprint, shape and measurement
    settings, so a repeated architecture is measured once (across resumes too). Backends are created here: a
    profile whose backend is missing fails before any trial runs.
    """

    def __init__(self, profiles: Sequence[DeviceProfile], reference: nn.Module,
                 input_shape: "Sequence[int] | InputSpec", workdir: Path, cache: bool = True):
        self.profiles = list(profiles)
        self.backends = {p.name: make_backend(p) for p in self.profiles}
        # a plain shape is the one image input of one sample (C, H, W); an InputSpec names every input
        self.inputs = input_shape if isinstance(input_shape, InputSpec) else InputSpec.image(input_shape)
        self.workdir = Path(workdir)
        self.reference = reference
        self.cache = LatencyCache(self.workdir / "latency_cache.sqlite") if cache else None
        ref_dir = self.workdir / "reference"
        self.reference_onnx = self._export(reference, ref_dir)
        self.reference_stats = {p.name: self._reference_stats(p) for p in self.profiles}
        self.reference_ms = {name: s.median_ms for name, s in self.reference_stats.items()}

    def _export_key(self, p: DeviceProfile) -> str:
        """One ONNX file per batch size (and sequence length, for token inputs)."""
        if self.inputs.is_image:
            return f"b{p.batch_size}"
        return f"b{p.batch_size}-s{self.inputs.for_profile(p).shapes(1)[self.inputs.names[0]][-1]}"

    def _export(self, model: nn.Module, workdir: Path) -> Dict[str, Path]:
        out = {}
        for p in self.profiles:
            key = self._export_key(p)
            if key not in out:
                path = Path(workdir) / f"model-{key}.onnx"
                if self.inputs.is_image:
                    out[key] = to_onnx(model, self._shape(p), path)
                else:
                    out[key] = to_onnx(model, self.inputs.for_profile(p), path, batch=p.batch_size)
        return out

    def _shape(self, p: DeviceProfile):
        return measured_inputs(self.inputs, p)

    def _hash(self, p: DeviceProfile, path: str) -> str:
        return file_sha256(path) if weights_matter(p) else onnx_architecture_hash(path)

    def _reference_stats(self, p: DeviceProfile) -> LatencyStats:
        path = str(self.reference_onnx[self._export_key(p)])
        return cached_measure(self.cache, self.backends[p.name], path, self.reference, self._shape(p),
                              model_hash=self._hash(p, path), settings=p.measure.to_dict())

    def fingerprints(self) -> Dict[str, Dict[str, Any]]:
        return {name: b.fingerprint() for name, b in self.backends.items()}

    def dense_macs(self, example_input: torch.Tensor) -> int:
        if getattr(self, "_dense_macs", None) is None:
            from hwprune.costs import count_macs

            self._dense_macs = count_macs(self.reference, example_input)
        return self._dense_macs

    def measure(self, model: nn.Module, workdir: Path, macs_cut: Optional[float] = None) -> Dict[str, "ProfileLatency"]:
        """Latency on every profile. ``macs_cut`` (dense MACs / the candidate's effective MACs) arms the
        plausibility guard: a speedup above ``macs_cut * (1 + measure.plausible_margin)`` is measured again,
        uncached, and flagged if it persists."""
        onnx = self._export(model, workdir)
        out = {}
        for p in self.profiles:
            key = self._export_key(p)
            path, ref_path = str(onnx[key]), str(self.reference_onnx[key])

            def pair(cache):
                return cached_measure_pair(
                    cache, self.backends[p.name], path, model, ref_path, self.reference, self._shape(p),
                    model_hash=self._hash(p, path), reference_hash=self._hash(p, ref_path),
                    settings=p.measure.to_dict(),
                )

            lat = ProfileLatency(pair(self.cache), self.reference_stats[p.name])
            limit = None if not macs_cut else macs_cut * (1.0 + p.measure.plausible_margin)
            if limit is not None and lat.speedup > limit:
                first = lat.speedup
                lat = ProfileLatency(pair(None), self.reference_stats[p.name])  # again, bypassing the cache
                if lat.speedup > limit:
                    lat.flag = (f"implausible: {lat.speedup:.2f}x faster (measured twice: {first:.2f}x, "
                                f"{lat.speedup:.2f}x) with only {macs_cut:.2f}x fewer MACs")
                elif self.cache is not None:  # the first reading was the outlier: keep the sane one
                    self.cache.put(cache_key(self._hash(p, path), self.backends[p.name].fingerprint(),
                                             self._shape(p), self._hash(p, ref_path), p.measure.to_dict()),
                                   lat.pair)
            out[p.name] = lat
        return out

    def close(self) -> None:
        """Stop worker processes the backends hold."""
        for b in self.backends.values():
            b.close()


@dataclass
class ProfileLatency:
    """A candidate's latency on one profile: the interleaved pair and the drift-corrected median."""

    pair: PairedLatency
    reference: LatencyStats  # the reference timed alone when the meter was created (median and CI)
    flag: str = ""  # non-empty when the plausibility guard flagged the measurement

    @property
    def reference_ms(self) -> float:
        return self.reference.median_ms

    @property
    def ratio(self) -> float:
        """Candidate median / reference median in one window: the estimator the ground truth uses (medians of
        each model alone). The median of per-pair ratios is kept beside it (``latency_ratio_paired``): on the demo
        front it strayed up to 19% from the models timed alone where this one stayed within 2%."""
        return self.pair.ratio

    @property
    def speedup(self) -> float:
        return 1.0 / self.ratio if self.ratio > 0 else float("inf")

    @property
    def median_ms(self) -> float:
        """Drift-corrected latency: the same-window ratio to the reference times the reference's latency."""
        return self.ratio * self.reference_ms

    @property
    def raw(self) -> LatencyStats:
        return self.pair.candidate


@dataclass
class TrialOutcome:
    plan: PruningPlan
    costs: Costs
    latency: Dict[str, ProfileLatency]
    objective: str = "accuracy"  # what ``quality`` was measured for
    quality: Dict[str, float] = field(default_factory=dict)  # accuracy, or the fidelity figures; empty: not trained
    feasible: bool = True
    reason: str = ""
    seconds: Dict[str, float] = field(default_factory=dict)
    structures: List[Dict[str, Any]] = field(default_factory=list)  # per-layer catalog structure reports
    recovery: Optional[str] = None  # the recovery method that trained the delivered weights
    recovery_notes: List[str] = field(default_factory=list)  # e.g. layers a method did not apply to
    cheap_score: Optional[float] = None  # the objective right after pruning, BN recalibrated only (screening)
    screened: bool = False  # ruled out by the cheap-fidelity screen: never trained
    realized: Optional[str] = None  # PruningPlan.realized_key of the model the plan built
    same_as: Optional[int] = None  # an earlier trial that built the same model (nothing was measured again)

    @property
    def score(self) -> Optional[float]:
        """The value the search maximises (accuracy, agreement, cosine or exp(-kl)); None when not trained."""
        return self.quality.get(OBJECTIVE_COLUMN[self.objective])

    @property
    def accuracy(self) -> Optional[float]:
        return self.quality.get("accuracy")

    def quality_metrics(self) -> Dict[str, Optional[float]]:
        """The objective's own columns (None when not trained) and every other figure measured."""
        cols = {"accuracy": ["accuracy"], "kl": ["kl", "exp_neg_kl"]}.get(self.objective, [self.objective])
        return {**{c: None for c in cols}, **self.quality}

    def describe_quality(self) -> str:
        """One line of the measured quality figures, e.g. 'agreement 0.9812  cosine 0.9950  kl 0.0213'."""
        return "  ".join(f"{k} {v:.4f}" for k, v in self.quality.items() if k != "exp_neg_kl")

    def _stored_as_dense(self) -> List[Dict[str, Any]]:
        """Reports of layers the cost count saw at full size: masked forms (zeros held in dense tensors, maybe
        skipped when executed). Physically realized forms (a dropped block, a gather-conv) are already smaller in
        the counted model; subtracting their savings again counted them twice (negative MACs, issue 11's run)."""
        return [r for r in self.structures if r.get("executed") not in PHYSICAL_FORMS]

    @property
    def macs_effective(self) -> int:
        """MACs the executed forms really run: the counted model's MACs minus what masked forms skip."""
        saved = sum((r["macs_dense"] or 0) - (r["macs_effective"] or 0) for r in self._stored_as_dense()
                    if r.get("macs_dense") is not None and r.get("macs_effective") is not None)
        return int(self.costs.macs - saved)

    @property
    def bytes_deployed(self) -> int:
        """Bytes with every structured layer stored in its deployed format (CSR, BSR, N:M, unified blocks)."""
        return int(self.costs.bytes - sum(r["bytes_dense"] - r["bytes_deployed"] for r in self._stored_as_dense()))

    def metrics(self) -> Dict[str, Any]:
        """Flat, JSON-ready metrics (units in the names)."""
        m: Dict[str, Any] = {
            **self.quality_metrics(),
            "objective": self.objective,
            "feasible": self.feasible,
            "reason": self.reason,
            **self.costs.to_dict(),
            "macs_effective": self.macs_effective,
            "bytes_deployed": self.bytes_deployed,
            "plan": self.plan.summary(),
            "recovery_method": self.recovery,
        }
        if self.cheap_score is not None:
            m["cheap_score"] = self.cheap_score
        for name, lat in self.latency.items():
            raw = lat.raw
            m[f"latency_ms:{name}"] = lat.median_ms
            m[f"latency_ratio:{name}"] = lat.ratio
            m[f"latency_ratio_paired:{name}"] = lat.pair.pair_ratio_median
            m[f"latency_ratio_paired_ci_low:{name}"] = lat.pair.pair_ratio_ci_low
            m[f"latency_ratio_paired_ci_high:{name}"] = lat.pair.pair_ratio_ci_high
            m[f"latency_raw_ms:{name}"] = raw.median_ms
            m[f"latency_p10_ms:{name}"] = raw.p10_ms
            m[f"latency_p90_ms:{name}"] = raw.p90_ms
            m[f"latency_cv:{name}"] = raw.cv
            m[f"latency_n:{name}"] = raw.n
            m[f"latency_reference_ms:{name}"] = lat.pair.reference.median_ms  # the dense model in the same window
            m[f"latency_flag:{name}"] = lat.flag
        m.update({f"seconds:{k}": v for k, v in self.seconds.items()})
        return m


def dense_cache_dir(workdir: Path) -> Path:
    """Where a run keeps the dense model's held-out outputs: the run directory (trials live in RUN/trials/trial-N,
    baselines in RUN/baselines/TAG; a single ``prune`` uses its own --out)."""
    workdir = Path(workdir)
    return workdir.parent.parent if workdir.parent.name in ("trials", "baselines") else workdir


def run_trial(
    workload: Workload,
    plan: PruningPlan,
    meter: LatencyMeter,
    workdir: Path,
    budget_ms: Optional[float] = None,
    budget_profile: Optional[str] = None,
    train: bool = True,
    seed: int = 0,
    evaluate_over_budget: bool = False,
    screen: Optional[Callable[[float, Dict[str, float]], Optional[str]]] = None,
    same_model: Optional[Callable[[str], Optional[int]]] = None,
) -> "tuple[TrialOutcome, nn.Module]":
    """Evaluate one plan. Returns the outcome and the (recovered) pruned model. A plan over the latency budget
    stops before any training, unless ``evaluate_over_budget`` (the dense baseline is always evaluated).
    ``screen`` (cheap-fidelity screening, hwprune.fidelity_screen): given the score right after pruning (BN
    recalibrated only) and the latency per profile, a reason not to train this candidate, or None to train it.
    ``same_model``: given the realized plan's key, the number of an earlier trial that built the same model; then
    the trial stops right after pruning (``outcome.same_as``), as measuring and training it again adds nothing."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, plan, reports = workload.apply(plan)
    write_text(workdir / "plan.json", plan.to_json())
    t1 = time.perf_counter()
    costs = measure_costs(model, workload.example_input)
    outcome = TrialOutcome(plan, costs, {}, objective=workload.objective, seconds={"prune": t1 - t0},
                           structures=delivered_reports(model, [r.to_dict() for r in reports]),
                           realized=plan.realized_key())
    outcome.same_as = same_model(outcome.realized) if same_model is not None else None
    if outcome.same_as is not None:
        outcome.feasible = False
        outcome.reason = f"same model as trial {outcome.same_as} (the plan realizes the same pruning); its results stand"
        return outcome, model
    dense_macs = meter.dense_macs(workload.example_input)
    macs_cut = dense_macs / outcome.macs_effective if outcome.macs_effective > 0 and dense_macs else None
    latency = outcome.latency = meter.measure(model, workdir, macs_cut=macs_cut)
    t2 = time.perf_counter()
    outcome.seconds["measure"] = t2 - t1
    if budget_ms is not None:
        name = budget_profile or meter.profiles[0].name
        if latency[name].median_ms > budget_ms:
            outcome.feasible = False
            outcome.reason = f"latency {latency[name].median_ms:.3f} ms on {name} exceeds the budget {budget_ms:g} ms"
            if not evaluate_over_budget:
                return outcome, model
    if train and workload.data is not None and screen is not None:
        recalibrate_bn(model, workload.data, workload.space.recovery.bn_recalibration_batches,
                       workload.space.recovery.batch_size, seed)
        cheap = quality(model, workload.model, workload.data, workload.objective, cache_dir=dense_cache_dir(workdir))
        outcome.cheap_score = cheap.get(OBJECTIVE_COLUMN[workload.objective])
        outcome.seconds["cheap"] = time.perf_counter() - t2
        reason = screen(outcome.cheap_score, {k: v.median_ms for k, v in latency.items()})
        if reason:
            outcome.screened, outcome.feasible, outcome.reason = True, False, reason
            write_text(workdir / "metrics.json", json.dumps(outcome.metrics(), indent=2, sort_keys=True, default=str))
            return outcome, model
        t2 = time.perf_counter()
    if train and workload.data is not None:
        # the dense model goes to every method: the budget decides whether it is distilled from (always on
        # unlabelled data), and reconstruct refits layers against it either way
        notes: List[str] = []
        model = recover(model, workload.data, workload.space.recovery, teacher=workload.model, seed=seed,
                        method=plan.recovery_method, log=notes.append)
        outcome.recovery = plan.recovery_method or workload.space.recovery.method[0]
        outcome.recovery_notes = notes
        outcome.quality = quality(model, workload.model, workload.data, workload.objective,
                                  cache_dir=dense_cache_dir(workdir))
        outcome.structures = delivered_reports(model, outcome.structures)  # what recovery delivered, not the plan
        outcome.seconds["recover"] = time.perf_counter() - t2
        with atomic_path(workdir / "state_dict.pt") as tmp:
            torch.save(model.state_dict(), tmp)
    metrics = {**outcome.metrics(), "structures": outcome.structures, "recovery_notes": outcome.recovery_notes}
    write_text(workdir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return outcome, model
