"""The latency backend interface: every device profile names a backend, and every backend measures an ONNX
file (or a PyTorch module, where it runs PyTorch) and returns the same statistics.

Kept free of torch imports so that the remote agent (which imports only onnxruntime, numpy and the standard
library) can share these types.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, Tuple


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model on one profile, in milliseconds per batch."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    cv: float  # coefficient of variation (std / mean) of the samples
    n: int  # timed repetitions
    ci_low_ms: float  # 95% confidence interval of the median
    ci_high_ms: float
    samples_ms: Tuple[float, ...] = field(default=(), repr=False)

    @property
    def spread_ms(self) -> float:
        """p90 - p10: the spread reported next to every median."""
        return self.p90_ms - self.p10_ms

    def to_dict(self, with_samples: bool = False) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if not with_samples:
            d.pop("samples_ms")
        else:
            d["samples_ms"] = list(self.samples_ms)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LatencyStats":
        d = dict(d)
        d["samples_ms"] = tuple(d.get("samples_ms", ()))
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass(frozen=True)
class PairedLatency:
    """A candidate and a reference (the dense model) measured in the same time window, alternately."""

    candidate: LatencyStats
    reference: LatencyStats
    ratio: float  # candidate median / reference median
    pair_ratio_median: float  # median of per-pair ratios (paired estimate; equals ratio when not interleaved)
    pair_ratio_ci_low: float  # 95% CI of the per-pair ratio median (nan when not interleaved)
    pair_ratio_ci_high: float
    interleaved: bool = True  # False when the backend could only measure the two one after the other

    def __iter__(self):
        """``cand, ref = pair`` unpacks the two statistics."""
        return iter((self.candidate, self.reference))

    def to_dict(self, with_samples: bool = False) -> Dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(with_samples),
            "reference": self.reference.to_dict(with_samples),
            "ratio": self.ratio,
            "pair_ratio_median": self.pair_ratio_median,
            "pair_ratio_ci_low": self.pair_ratio_ci_low,
            "pair_ratio_ci_high": self.pair_ratio_ci_high,
            "interleaved": self.interleaved,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PairedLatency":
        nan = float("nan")
        return cls(
            candidate=LatencyStats.from_dict(d["candidate"]),
            reference=LatencyStats.from_dict(d["reference"]),
            ratio=float(d["ratio"]),
            pair_ratio_median=float(d.get("pair_ratio_median", d["ratio"])),
            pair_ratio_ci_low=float(nan if d.get("pair_ratio_ci_low") is None else d["pair_ratio_ci_low"]),
            pair_ratio_ci_high=float(nan if d.get("pair_ratio_ci_high") is None else d["pair_ratio_ci_high"]),
            interleaved=bool(d.get("interleaved", True)),
        )


@dataclass(frozen=True)
class MeasureSettings:
    """How long and how precisely to measure (shared by every backend)."""

    warmup: int = 10
    min_repeats: int = 20
    max_repeats: int = 300
    target_rel_ci: float = 0.02  # stop when the median's 95% CI is within +-2% of the median
    time_cap_s: float = 5.0
    # Interleaved pairs alternate blocks of this many timed calls, each after one untimed call: the first call
    # after switching models pays for the switch (cold caches, the other session's still-spinning threads).
    interleave_block: int = 4


class LatencyBackend(Protocol):
    """What a device profile's backend provides.

    Optional, used when present: ``input_kind`` ("onnx" by default, "torch" for backends that time PyTorch
    modules with ``measure_module(module, input_shape)`` and ``measure_module_pair(module, reference, shape)``),
    and ``measure_onnx_pair(candidate_path, reference_path, input_shape) -> PairedLatency`` (interleaved timing).
    Backends set the batch dimension of ``input_shape`` to the profile's ``batch_size`` (``batched_shape``).
    """

    name: str

    def fingerprint(self) -> Dict[str, Any]:
        """Stable description of the device and software (CPU model, versions, provider, threads)."""

    def measure_onnx(self, onnx_path: str, input_shape: Sequence[int]) -> LatencyStats:
        """Latency of one ONNX model at the given input shape (batch included)."""


# Backend factories by name; each takes the profile and returns a backend or raises BackendUnavailable.
BackendFactory = Callable[["DeviceProfile"], LatencyBackend]
_BACKENDS: Dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    def deco(factory: BackendFactory) -> BackendFactory:
        _BACKENDS[name] = factory
        return factory

    return deco


def backend_names() -> Tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


def make_backend(profile: "DeviceProfile") -> LatencyBackend:
    from hwprune.errors import ConfigError

    factory = _BACKENDS.get(profile.backend)
    if factory is None:
        raise ConfigError(
            f"device profile {profile.name!r}: unknown backend {profile.backend!r}; "
            f"valid backends: {', '.join(backend_names())}"
        )
    return factory(profile)


@dataclass(frozen=True)
class DeviceProfile:
    """A target device: which backend measures it and how. Loaded from ``device_profiles/*.yaml``."""

    name: str
    backend: str
    batch_size: int = 1
    channel_multiple: int = 1  # kept channel counts the search rounds to (e.g. 8 for fp16 tensor cores)
    options: Dict[str, Any] = field(default_factory=dict)  # backend-specific (threads, provider, url, ...)
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    accelerates: Tuple[str, ...] = ("filter", "channel", "depth")  # structures that speed this target up
    source: Optional[str] = None  # the YAML file it came from

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


def measure_candidate(backend: LatencyBackend, onnx_path: str, module: Any, input_shape: Sequence[int]) -> LatencyStats:
    """Measure a candidate with whatever form the backend consumes: a PyTorch module for backends that run
    PyTorch (they define ``measure_module``), the ONNX file otherwise."""
    if getattr(backend, "input_kind", "onnx") == "torch":
        return backend.measure_module(module, input_shape)  # type: ignore[attr-defined]
    return backend.measure_onnx(onnx_path, input_shape)


def measure_candidate_pair(
    backend: LatencyBackend,
    onnx_path: str,
    module: Any,
    reference_onnx_path: str,
    reference_module: Any,
    input_shape: Sequence[int],
) -> PairedLatency:
    """Measure a candidate and the reference (dense) model interleaved in the same time window, with whatever
    form the backend consumes. A backend without a pair method gets the two measured one after the other
    (``interleaved=False`` in the result)."""
    if getattr(backend, "input_kind", "onnx") == "torch":
        return backend.measure_module_pair(module, reference_module, input_shape)  # type: ignore[attr-defined]
    pair = getattr(backend, "measure_onnx_pair", None)
    if pair is not None:
        return pair(onnx_path, reference_onnx_path, input_shape)
    from hwprune.latency.measure import pair_from_samples

    cand = backend.measure_onnx(onnx_path, input_shape)
    ref = backend.measure_onnx(reference_onnx_path, input_shape)
    return pair_from_samples(cand.samples_ms, ref.samples_ms, interleaved=False)


def check_options(profile: "DeviceProfile", valid: Sequence[str]) -> None:
    """Reject option keys a backend does not know (a typo must never silently become a default)."""
    from hwprune.errors import ConfigError

    for key in profile.options:
        if key not in valid:
            raise ConfigError(
                f"device profile {profile.name!r} ({profile.source or 'no file'}): unknown {profile.backend} option "
                f"{key!r}; valid options: {', '.join(valid)}"
            )


def batched_shape(profile: "DeviceProfile", input_shape: Sequence[int]) -> Tuple[int, ...]:
    """The shape a backend measures: ``input_shape`` with its first (batch) dimension set to the profile's
    ``batch_size``."""
    from hwprune.errors import ModelError

    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ModelError(f"input shape {list(input_shape)} is not valid; give positive sizes with the batch first")
    return (int(profile.batch_size),) + shape[1:]
