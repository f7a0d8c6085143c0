"""ONNX Runtime backend: any installed execution provider, fixed thread counts, a graph optimization level,
device-resident inputs (I/O binding) on GPU providers.

Options (profile ``options``):
  provider                  CPUExecutionProvider (default) or any provider name / short alias (cpu, cuda,
                            tensorrt, openvino, dml, coreml, rocm, migraphx, qnn, xnnpack, ...)
  provider_options          mapping passed to the provider (e.g. {trt_fp16_enable: true}, {device_type: GPU})
  device_id                 GPU index for CUDA / TensorRT / ROCm (default 0)
  threads                   intra-op threads; 0 = ONNX Runtime's default (all physical cores)
  intra_op_threads          same as ``threads`` (older name)
  inter_op_threads          default 1
  graph_optimization_level  disable | basic | extended | all (default all)
  execution_mode            sequential (default) | parallel
  io_binding                auto (default: on for CUDA / TensorRT / ROCm) | true | false
  cpu_fallback              true (default): CPUExecutionProvider runs nodes the provider cannot

The batch dimension of the measured input is the profile's ``batch_size``.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from hwprune.errors import BackendUnavailable, ConfigError, ModelError
from hwprune.inputs import InputSpec, inputs_key
from hwprune.latency.base import (
    DeviceProfile,
    OnnxFileBackend,
    LatencyStats,
    PairedLatency,
    batched_shape,
    check_options,
    register_backend,
)
from hwprune.latency.measure import cpu_model, environment_fingerprint, measure, measure_interleaved, nvidia_gpu_names

GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")
EXECUTION_MODES = ("sequential", "parallel")
OPTIONS = (
    "provider",
    "provider_options",
    "device_id",
    "threads",
    "intra_op_threads",
    "inter_op_threads",
    "graph_optimization_level",
    "execution_mode",
    "io_binding",
    "cpu_fallback",
)
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}
INSTALL_HINTS = {
    "CUDAExecutionProvider": "pip install onnxruntime-gpu (with a matching CUDA and cuDNN)",
    "TensorrtExecutionProvider": "pip install onnxruntime-gpu and install TensorRT libraries",
    "OpenVINOExecutionProvider": "pip install onnxruntime-openvino",
    "DmlExecutionProvider": "pip install onnxruntime-directml (Windows)",
    "QNNExecutionProvider": "pip install onnxruntime-qnn",
    "ROCMExecutionProvider": "install the ROCm build of onnxruntime",
    "MIGraphXExecutionProvider": "install the MIGraphX build of onnxruntime",
    "CoreMLExecutionProvider": "use the standard onnxruntime wheel on macOS",
}
# providers whose inputs live in GPU memory: time the model, not host<->device copies of the input
DEVICE_MEMORY = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda", "ROCMExecutionProvider": "cuda"}
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

__all__ = ["OnnxRuntimeBackend", "cpu_model", "resolve_provider", "OPTIONS", "GRAPH_OPT_LEVELS"]


def resolve_provider(name: str) -> str:
    return PROVIDER_ALIASES.get(str(name).lower(), str(name))


def _as_bool(profile: DeviceProfile, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"device profile {profile.name!r}: option {key} must be true or false, got {value!r}")


def _as_int(profile: DeviceProfile, key: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"device profile {profile.name!r}: option {key} must be an integer >= {minimum}, got {value!r}"
        )
    return value


def _check_choice(profile: DeviceProfile, key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(
            f"device profile {profile.name!r}: option {key} is {value!r}; choose one of: {', '.join(choices)}"
        )
    return value


class OnnxRuntimeBackend(OnnxFileBackend):
    name = "onnxruntime"

    def __init__(self, profile: DeviceProfile):
        check_options(profile, OPTIONS)
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a hard dependency
            raise BackendUnavailable(
                f"device profile {profile.name!r} needs onnxruntime, which is not installed: pip install onnxruntime"
            ) from e
        self._ort = ort
        self.profile = profile
        self.provider = resolve_provider(profile.option("provider", "CPUExecutionProvider"))
        available = ort.get_available_providers()
        if self.provider not in available:
            hint = INSTALL_HINTS.get(self.provider, "install an onnxruntime build that includes it")
            raise BackendUnavailable(
                f"device profile {profile.name!r} asks for ONNX Runtime provider {self.provider!r}, which this "
                f"onnxruntime {ort.__version__} lacks (available: {', '.join(available)}); {hint}, or pick "
                f"another profile"
            )
        po = profile.option("provider_options", {}) or {}
        if not isinstance(po, dict):
            raise ConfigError(f"device profile {profile.name!r}: option provider_options must be a mapping, got {po!r}")
        self.device_id = _as_int(profile, "device_id", profile.option("device_id", 0))
        self.provider_options: Dict[str, Any] = {str(k): v for k, v in po.items()}
        if self.provider in DEVICE_MEMORY and "device_id" not in self.provider_options:
            self.provider_options["device_id"] = self.device_id
        level = str(profile.option("graph_optimization_level", "all"))
        self.graph_optimization_level = _check_choice(profile, "graph_optimization_level", level, GRAPH_OPT_LEVELS)
        self.execution_mode = _check_choice(
            profile, "execution_mode", str(profile.option("execution_mode", "sequential")), EXECUTION_MODES
        )
        t, it = profile.option("threads"), profile.option("intra_op_threads")
        if t is not None and it is not None and t != it:
            raise ConfigError(
                f"device profile {profile.name!r}: options threads ({t!r}) and intra_op_threads ({it!r}) disagree; "
                f"give only one"
            )
        self.intra_op_threads = _as_int(profile, "threads", t if t is not None else (it if it is not None else 0))
        self.inter_op_threads = _as_int(profile, "inter_op_threads", profile.option("inter_op_threads", 1))
        iob = profile.option("io_binding", "auto")
        if iob == "auto":
            self.io_binding = self.provider in DEVICE_MEMORY
        else:
            self.io_binding = _as_bool(profile, "io_binding", iob)
        self.cpu_fallback = _as_bool(profile, "cpu_fallback", profile.option("cpu_fallback", True))
        self._sessions: "collections.OrderedDict[Tuple, Any]" = collections.OrderedDict()

    # -- sessions ------------------------------------------------------------------------------------------------

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
        so.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if self.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        so.log_severity_level = 3
        return so

    def providers(self) -> List[Any]:
        out: List[Any] = [(self.provider, self.provider_options)] if self.provider_options else [self.provider]
        if self.cpu_fallback and self.provider != "CPUExecutionProvider":
            out.append("CPUExecutionProvider")
        return out

    def session(self, onnx_path: str, enable_profiling: bool = False, profile_prefix: str = ""):
        """A new InferenceSession with this profile's settings. Fails if ONNX Runtime silently fell back to the CPU
        (e.g. CUDA libraries missing), so a GPU profile never reports CPU numbers."""
        so = self.session_options()
        if enable_profiling:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix or "ort_profile"
        try:
            sess = self._ort.InferenceSession(str(onnx_path), sess_options=so, providers=self.providers())
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidProtobuf, NoSuchFile...)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not os.path.exists(str(onnx_path)):
                raise ModelError(f"ONNX file {onnx_path!r} does not exist; export the model first") from e
            raise ModelError(
                f"ONNX Runtime cannot load {onnx_path!r} on profile {self.profile.name!r}: {msg}; check the export "
                f"(opset, operators supported by {self.provider})"
            ) from e
        if self.provider not in sess.get_providers():
            raise BackendUnavailable(
                f"device profile {self.profile.name!r}: ONNX Runtime could not start {self.provider} (session runs "
                f"on {', '.join(sess.get_providers())}); check its libraries "
                f"({INSTALL_HINTS.get(self.provider, 'see the provider documentation')})"
            )
        return sess

    def _cached_session(self, onnx_path: str):
        st = os.stat(onnx_path)
        key = (os.path.abspath(onnx_path), st.st_size, st.st_mtime_ns)
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        sess = self.session(onnx_path)
        self._sessions[key] = sess
        while len(self._sessions) > 4:  # the dense reference stays cached while candidates come and go
            self._sessions.popitem(last=False)
        return sess

    def feeds(self, sess, input_shape: Sequence[int]) -> Dict[str, np.ndarray]:
        """Random inputs: the first input gets the measured shape (batch from the profile); further inputs get
        their declared shape with symbolic dimensions set to the batch size."""
        if isinstance(input_shape, InputSpec):
            return self._spec_feeds(sess, input_shape)
        shape = batched_shape(self.profile, input_shape)
        rng = np.random.default_rng(0)
        out: Dict[str, np.ndarray] = {}
        for i, inp in enumerate(sess.get_inputs()):
            dtype = _ORT_DTYPES.get(inp.type)
            if dtype is None:
                raise ModelError(f"model input {inp.name!r} has type {inp.type}, which hwprune cannot feed")
            if i == 0:
                declared = inp.shape
                fixed = lambda d, s: isinstance(d, int) and d > 0 and d != s  # noqa: E731
                if len(declared) != len(shape) or any(fixed(d, s) for d, s in zip(declared[1:], shape[1:])):
                    raise ModelError(
                        f"model input {inp.name!r} has shape {declared}, which input shape {list(shape)} does not "
                        f"fit; give the shape the model was exported with"
                    )
                if fixed(declared[0], shape[0]):
                    raise ModelError(
                        f"model input {inp.name!r} has shape {declared}, but profile {self.profile.name!r} measures "
                        f"{list(shape)}; export with a dynamic batch axis or set batch_size to match"
                    )
                s = shape
            else:
                s = tuple(d if isinstance(d, int) and d > 0 else shape[0] for d in inp.shape)
            if np.issubdtype(dtype, np.floating):
                out[inp.name] = rng.standard_normal(s).astype(dtype)
            else:
                out[inp.name] = np.zeros(s, dtype=dtype)
        return out

    def _spec_feeds(self, sess, spec: InputSpec) -> Dict[str, np.ndarray]:
        """Feeds for a model exported from ``spec``: every input by name, batch from the profile."""
        declared = {inp.name: inp for inp in sess.get_inputs()}
        if set(declared) != set(spec.names):
            raise ModelError(
                f"the model's inputs ({', '.join(declared)}) are not the input spec's ({', '.join(spec.names)}); "
                f"export the model with the same --inputs"
            )
        feeds = spec.numpy_feeds(self.profile.batch_size)
        for name, arr in feeds.items():
            want = _ORT_DTYPES.get(declared[name].type)
            if want is None or np.dtype(want) != arr.dtype:
                raise ModelError(f"model input {name!r} has type {declared[name].type}, but the input spec feeds "
                                 f"{arr.dtype}; export the model with the same --inputs")
        return feeds

    def runner(self, sess, input_shape: Sequence[int]):
        """A zero-argument call that runs the model once and returns when its outputs are ready."""
        feeds = self.feeds(sess, input_shape)
        if not self.io_binding:
            return lambda: sess.run(None, feeds)
        ort = self._ort
        device = DEVICE_MEMORY.get(self.provider, "cpu")
        dev_id = self.device_id if device != "cpu" else 0
        binding = sess.io_binding()
        # inputs copied to device memory once, outside the timed region
        keep = []
        for name, arr in feeds.items():
            ov = ort.OrtValue.ortvalue_from_numpy(arr, device, dev_id)
            keep.append(ov)
            binding.bind_ortvalue_input(name, ov)
        for out in sess.get_outputs():
            binding.bind_output(out.name, device, dev_id)

        def run():
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()  # device work finished before the clock stops
            return keep

        return run

    def checked_runner(self, onnx_path: str, input_shape: Sequence[int]):
        """``runner`` for a file, after one trial run: a model that cannot run at this shape is a ModelError
        here, not an anonymous ONNX Runtime failure in the middle of timing."""
        run = self.runner(self._cached_session(onnx_path), input_shape)
        try:
            run()
        except Exception as e:  # ORT raises its own exception types
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ModelError(
                f"{os.path.basename(str(onnx_path))} cannot run at input shape {self._describe(input_shape)} on "
                f"{self.provider}: {msg}; check the input shape"
            ) from e
        return run

    def _describe(self, input_shape) -> str:
        if isinstance(input_shape, InputSpec):
            return input_shape.describe(self.profile.batch_size)
        return str(list(batched_shape(self.profile, input_shape)))

    # -- interface -----------------------------------------------------------------------------------------------

    def fingerprint(self) -> Dict[str, Any]:
        """Computed once per backend (it may run nvidia-smi); a copy is returned."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self._make_fingerprint()
        return dict(self._fingerprint)

    def _make_fingerprint(self) -> Dict[str, Any]:
        extra: Dict[str, Any] = {
            "backend": self.name,
            "onnxruntime": self._ort.__version__,
            "provider": self.provider,
            "provider_options": {k: str(v) for k, v in sorted(self.provider_options.items())},
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "graph_optimization_level": self.graph_optimization_level,
            "execution_mode": self.execution_mode,
            "io_binding": self.io_binding,
            "batch_size": self.profile.batch_size,
        }
        if self.provider in DEVICE_MEMORY:
            extra["gpu"] = list(nvidia_gpu_names())
        return environment_fingerprint(**extra)

    @property
    def isolated(self) -> bool:
        """Each model in a process of its own (the default; see hwprune/latency/worker.py)."""
        return self.profile.measure.isolation in ("auto", "process")

    def measure_onnx(self, onnx_path: str, input_shape: Sequence[int]) -> LatencyStats:
        if self.isolated:
            from hwprune.latency.worker import time_alone

            return time_alone(self.profile, onnx_path, input_shape)
        return measure(self.checked_runner(onnx_path, input_shape), self.profile.measure)

    def measure_onnx_pair(self, candidate_path: str, reference_path: str, input_shape: Sequence[int]) -> PairedLatency:
        """Candidate and reference timed alternately in the same window, each in its own process (or both in this
        one with ``isolation: none``); see ``measure_interleaved``."""
        if self.isolated:
            from hwprune.latency.worker import ModelProcess, measure_pair_in_processes

            ref = self._reference_process(reference_path, input_shape)
            with ModelProcess(self.profile, candidate_path, input_shape) as cand:
                return measure_pair_in_processes(cand, ref, self.profile.measure)
        cand = self.checked_runner(candidate_path, input_shape)
        ref = self.checked_runner(reference_path, input_shape)
        return measure_interleaved(cand, ref, self.profile.measure)

    def _reference_process(self, path: str, input_shape: Sequence[int]):
        """The reference model's worker, kept for the next pair (a search times every candidate against it)."""
        from hwprune.latency.worker import ModelProcess

        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, repr(inputs_key(input_shape)))
        held = getattr(self, "_reference_worker", None)
        if held is not None and held[0] == key and held[1].alive():
            return held[1]
        self.close()
        proc = ModelProcess(self.profile, path, input_shape)
        self._reference_worker = (key, proc)
        return proc

    def close(self) -> None:
        """Stop the reference worker process, if any (it also stops by itself when this process exits)."""
        held = getattr(self, "_reference_worker", None)
        if held is not None:
            held[1].close()
            self._reference_worker = None


@register_backend("onnxruntime")
def _make(profile: DeviceProfile) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(profile)
