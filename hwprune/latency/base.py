"""The latency backend interface: every device profile names a backend, and every backend measures an ONNX
file (or a PyTorch module, where it runs PyTorch) and returns the same statistics.

Kept free of torch imports so that the remote agent (which imports only onnxruntime, numpy and the standard
library) can share these types.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple


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


ISOLATIONS = ("auto", "process", "none")


@dataclass(frozen=True)
class MeasureSettings:
    """How long and how precisely to measure (shared by every backend). Validated once, here: a profile's
    ``measure:`` section, the agent's requests and the worker processes all go through ``from_dict``."""

    warmup: int = 10
    min_repeats: int = 20
    max_repeats: int = 300
    target_rel_ci: float = 0.02  # stop when the median's 95% CI is within +-2% of the median
    time_cap_s: float = 5.0
    # Interleaved pairs alternate blocks of this many timed calls, each after untimed calls: the calls right after
    # switching models pay for the switch (caches the other model evicted, its threads winding down).
    interleave_block: int = 4
    # Untimed calls after each switch go on until this much time has passed (at least one call). One call was not
    # enough: a 1.2 ms resnet18 prune alternating with its 17 ms dense model ran its 2nd-4th calls 3-8% slower than
    # alone (the dense model's 45 MB had evicted its weights), which read as a 4-8% lower speedup (issue 7).
    switch_warmup_ms: float = 10.0
    # "process": every model of a comparison runs in a process of its own, as deployed (ONNX Runtime profiles;
    # see hwprune/latency/worker.py for why). "none": both in the measuring process. "auto": process for
    # ONNX Runtime, none for the torch backend (one OpenMP / CUDA context per process: no competing pools).
    isolation: str = "auto"
    # A speedup above (MACs cut) x (1 + margin) is re-measured and, if it persists, flagged as implausible.
    plausible_margin: float = 0.25

    # field -> (type, minimum, maximum or choices)
    FIELDS: ClassVar[Dict[str, Tuple[type, Any, Any]]] = {
        # upper limits keep one measurement bounded (the agent refuses requests beyond them)
        "warmup": (int, 0, 1000),
        "min_repeats": (int, 1, 100_000),
        "max_repeats": (int, 1, 100_000),
        "target_rel_ci": (float, 0.0, 1.0),
        "time_cap_s": (float, 0.0, 3600.0),
        "interleave_block": (int, 1, 1000),
        "switch_warmup_ms": (float, 0.0, 10_000.0),
        "isolation": (str, None, ISOLATIONS),
        "plausible_margin": (float, 0.0, 100.0),
    }

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]], where: str = "measure settings",
                  base: Optional["MeasureSettings"] = None) -> "MeasureSettings":
        """Settings from a plain mapping, over ``base`` (default: the defaults). An unknown key, a wrong type or a
        value out of range is a ConfigError naming ``where``, the key, the value and what is allowed."""
        from hwprune.errors import ConfigError

        base = base or cls()
        if d is None:
            return base
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {d!r}")
        kw: Dict[str, Any] = {}
        for key, value in d.items():
            if key not in cls.FIELDS:
                raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(cls.FIELDS)}")
            kind, lo, hi = cls.FIELDS[key]
            if kind is str:
                if value not in hi:
                    raise ConfigError(f"{where}.{key}: {value!r} is not valid; choose one of: {', '.join(hi)}")
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    (kind is float or float(value).is_integer()) and lo <= value <= hi
                if not ok or value != value:  # NaN fails every comparison but one
                    raise ConfigError(f"{where}.{key}: expected {'an integer' if kind is int else 'a number'} in "
                                      f"[{lo}, {hi}], got {value!r}")
                value = kind(value)
            kw[key] = value
        out = dataclasses.replace(base, **kw)
        if out.min_repeats > out.max_repeats:
            raise ConfigError(f"{where}: min_repeats ({out.min_repeats}) exceeds max_repeats ({out.max_repeats})")
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class ModelArtifact:
    """What a backend measures: the exported ONNX file and the PyTorch module it came from (each backend uses the
    form it runs), at ``input_shape``: a plain shape of the one image input (batch first; backends set the batch
    to the profile's ``batch_size``) or an ``hwprune.inputs.InputSpec`` (named inputs, batch from the profile)."""

    onnx_path: Optional[str]
    module: Any
    input_shape: Any  # Tuple[int, ...] | InputSpec


def frozen_inputs(inputs: Any) -> Any:
    """A hashable form of what a backend is handed: an InputSpec as is, a plain shape as a tuple of ints."""
    from hwprune.inputs import InputSpec

    return inputs if isinstance(inputs, InputSpec) else tuple(int(d) for d in inputs)


class LatencyBackend(abc.ABC):
    """The contract every device profile's backend meets.

    * ``__init__(profile)`` validates the profile's options (one typed options object per backend) and fails with
      BackendUnavailable when the backend cannot run here.
    * ``fingerprint()`` describes the device and software (CPU or GPU model, library versions, threads,
      provider): two measurements are comparable only under equal fingerprints.
    * ``measure(model)`` times one ModelArtifact; ``measure_pair(candidate, reference)`` times two in the same
      window, alternately (the default measures them one after the other and says so: ``interleaved=False``).
    * ``identity(model)`` names what was measured, for the cache: the ONNX file's bytes by default.
    * ``close()`` releases held resources (worker processes, sessions).
    ``input_kind`` says which form the backend runs: "onnx" or "torch".
    """

    name: ClassVar[str] = ""
    input_kind: ClassVar[str] = "onnx"

    @abc.abstractmethod
    def fingerprint(self) -> Dict[str, Any]:
        """Stable description of the device and software (CPU model, versions, provider, threads)."""

    @abc.abstractmethod
    def measure(self, model: ModelArtifact) -> LatencyStats:
        """Latency of one model at its input shape (batch set from the profile)."""

    def measure_pair(self, candidate: ModelArtifact, reference: ModelArtifact) -> PairedLatency:
        from hwprune.latency.measure import pair_from_samples

        cand, ref = self.measure(candidate), self.measure(reference)
        return pair_from_samples(cand.samples_ms, ref.samples_ms, interleaved=False)

    def identity(self, model: ModelArtifact) -> str:
        if not model.onnx_path:
            raise ValueError(f"backend {self.name} measures ONNX files; no path given")
        from hwprune.latency.cache import file_sha256

        return file_sha256(model.onnx_path)

    def close(self) -> None:
        """Release worker processes or sessions; the backend may be used again afterwards."""


class OnnxFileBackend(LatencyBackend):
    """A backend that runs ONNX files: ``measure`` and ``measure_pair`` call ``measure_onnx`` and
    ``measure_onnx_pair`` (the names the agent and the scripts use)."""

    @abc.abstractmethod
    def measure_onnx(self, onnx_path: str, input_shape: Sequence[int]) -> LatencyStats:
        ...

    def measure_onnx_pair(self, candidate_path: str, reference_path: str, input_shape: Sequence[int]) -> PairedLatency:
        return LatencyBackend.measure_pair(
            self, ModelArtifact(candidate_path, None, frozen_inputs(input_shape)),
            ModelArtifact(reference_path, None, frozen_inputs(input_shape)))

    def measure(self, model: ModelArtifact) -> LatencyStats:
        return self.measure_onnx(str(model.onnx_path), model.input_shape)

    def measure_pair(self, candidate: ModelArtifact, reference: ModelArtifact) -> PairedLatency:
        return self.measure_onnx_pair(str(candidate.onnx_path), str(reference.onnx_path), candidate.input_shape)


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
    sequence_length: int = 128  # token inputs: the length measured, unless the input spec fixes one
    channel_multiple: int = 1  # kept channel counts the search rounds to (e.g. 8 for fp16 tensor cores)
    options: Dict[str, Any] = field(default_factory=dict)  # backend-specific (threads, provider, url, ...)
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    accelerates: Tuple[str, ...] = ("filter", "channel", "depth")  # structures that speed this target up
    source: Optional[str] = None  # the YAML file it came from

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def to_dict(self) -> Dict[str, Any]:
        """Plain, JSON-ready form (what a worker process or a stored study needs to rebuild the profile)."""
        return {
            "name": self.name,
            "backend": self.backend,
            "batch_size": self.batch_size,
            "sequence_length": self.sequence_length,
            "channel_multiple": self.channel_multiple,
            "options": dict(self.options),
            "measure": self.measure.to_dict(),
            "accelerates": list(self.accelerates),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DeviceProfile":
        return cls(
            name=str(d["name"]),
            backend=str(d["backend"]),
            batch_size=int(d.get("batch_size", 1)),
            sequence_length=int(d.get("sequence_length", 128)),
            channel_multiple=int(d.get("channel_multiple", 1)),
            options=dict(d.get("options") or {}),
            measure=MeasureSettings.from_dict(d.get("measure"), f"profile {d['name']}: measure"),
            accelerates=tuple(d.get("accelerates") or ()),
            source=d.get("source"),
        )


def measure_candidate(backend: LatencyBackend, onnx_path: str, module: Any, input_shape: Sequence[int]) -> LatencyStats:
    """Measure a candidate with whatever form the backend consumes (the module or the ONNX file)."""
    return backend.measure(ModelArtifact(onnx_path, module, frozen_inputs(input_shape)))


def measure_candidate_pair(
    backend: LatencyBackend,
    onnx_path: str,
    module: Any,
    reference_onnx_path: str,
    reference_module: Any,
    input_shape: Sequence[int],
) -> PairedLatency:
    """Measure a candidate and the reference (dense) model interleaved in the same time window."""
    shape = frozen_inputs(input_shape)
    return backend.measure_pair(ModelArtifact(onnx_path, module, shape),
                                ModelArtifact(reference_onnx_path, reference_module, shape))


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
