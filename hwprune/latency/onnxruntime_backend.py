"""ONNX Runtime backend: any installed execution provider, fixed thread counts, a graph optimization level.

Options (profile ``options``): ``provider`` (CPUExecutionProvider by default), ``intra_op_threads`` (0 = ORT's
default, all cores), ``inter_op_threads``, ``graph_optimization_level`` (disable | basic | extended | all),
``execution_mode`` (sequential | parallel).
"""
from __future__ import annotations

import os
import platform
from typing import Any, Dict, Sequence

import numpy as np

from hwprune.errors import BackendUnavailable, ConfigError
from hwprune.latency.base import DeviceProfile, LatencyStats, register_backend
from hwprune.latency.measure import measure

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, profile: DeviceProfile):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a hard dependency
            raise BackendUnavailable(
                f"device profile {profile.name!r} needs onnxruntime: pip install onnxruntime"
            ) from e
        self._ort = ort
        self.profile = profile
        self.provider = profile.option("provider", "CPUExecutionProvider")
        available = ort.get_available_providers()
        if self.provider not in available:
            raise BackendUnavailable(
                f"device profile {profile.name!r} asks for ONNX Runtime provider {self.provider!r}, "
                f"which this onnxruntime build lacks (available: {', '.join(available)}); install the build "
                f"that has it (e.g. pip install onnxruntime-gpu for CUDAExecutionProvider) or pick another profile"
            )
        level = str(profile.option("graph_optimization_level", "all"))
        if level not in GRAPH_OPT_LEVELS:
            raise ConfigError(
                f"device profile {profile.name!r}: graph_optimization_level {level!r} is not one of "
                f"{', '.join(GRAPH_OPT_LEVELS)}"
            )
        self.graph_optimization_level = level
        self.intra_op_threads = int(profile.option("intra_op_threads", 0))
        self.inter_op_threads = int(profile.option("inter_op_threads", 1))

    def session_options(self):
        ort = self._ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.graph_optimization_level]
        so.log_severity_level = 3
        return so

    def session(self, onnx_path: str, enable_profiling: bool = False, profile_prefix: str = ""):
        so = self.session_options()
        if enable_profiling:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix or "ort_profile"
        return self._ort.InferenceSession(onnx_path, sess_options=so, providers=[self.provider])

    def fingerprint(self) -> Dict[str, Any]:
        return {
            "backend": self.name,
            "provider": self.provider,
            "onnxruntime": self._ort.__version__,
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "graph_optimization_level": self.graph_optimization_level,
            "batch_size": self.profile.batch_size,
        }

    def measure_onnx(self, onnx_path: str, input_shape: Sequence[int]) -> LatencyStats:
        sess = self.session(onnx_path)
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
        feeds = {inp.name: x}
        return measure(lambda: sess.run(None, feeds), self.profile.measure)


@register_backend("onnxruntime")
def _make(profile: DeviceProfile) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(profile)
