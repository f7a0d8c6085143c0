"""Latency measurement on device profiles. Importing this package registers the built-in backends."""
from hwprune.latency.base import (  # noqa: F401
    DeviceProfile,
    LatencyBackend,
    LatencyStats,
    MeasureSettings,
    backend_names,
    make_backend,
    register_backend,
)
from hwprune.latency import onnxruntime_backend  # noqa: F401  (registers "onnxruntime")
