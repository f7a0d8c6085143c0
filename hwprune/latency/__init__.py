"""Latency measurement on device profiles. Importing this package registers the built-in backends
(onnxruntime, torch, remote) without importing torch: the torch backend imports it only when constructed."""
from hwprune.latency.base import (  # noqa: F401
    DeviceProfile,
    LatencyBackend,
    LatencyStats,
    MeasureSettings,
    ModelArtifact,
    OnnxFileBackend,
    PairedLatency,
    backend_names,
    batched_shape,
    check_options,
    make_backend,
    measure_candidate,
    measure_candidate_pair,
    register_backend,
)
from hwprune.latency import onnxruntime_backend  # noqa: F401  (registers "onnxruntime")
from hwprune.latency import torch_backend  # noqa: F401  (registers "torch"; torch imported lazily)
from hwprune.latency import remote  # noqa: F401  (registers "remote")
from hwprune.latency.cache import (  # noqa: F401,E402
    LatencyCache,
    cache_key,
    cached_measure,
    cached_measure_pair,
    file_sha256,
    onnx_architecture_hash,
)
from hwprune.latency.measure import environment_fingerprint, fingerprint_hash, measure, measure_interleaved  # noqa: F401,E402
