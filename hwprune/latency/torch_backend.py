"""PyTorch backend: times the pruned ``nn.Module`` itself, eagerly or through ``torch.compile``, on CPU or CUDA.

Options (profile ``options``):
  device          cpu (default) | cuda | cuda:N
  threads         torch.set_num_threads while measuring; 0 (default) = torch's default at start-up
  compile         false (default) | true: time ``torch.compile(module)`` (compilation happens during warm-up)
  compile_mode    default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
  compile_backend inductor (default) or another torch.compile backend (e.g. eager, aot_eager)
  dtype           float32 (default) | float16 | bfloat16
  channels_last   false (default) | true: NHWC memory format for 4-D inputs

CUDA timings use CUDA events around each call and synchronize on the end event. This module imports torch only
inside the backend, so importing ``hwprune.latency`` stays torch-free for the remote agent.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Any, Dict, Sequence

from hwprune.errors import BackendUnavailable, ConfigError
from hwprune.latency.base import (
    DeviceProfile,
    LatencyStats,
    PairedLatency,
    batched_shape,
    check_options,
    LatencyBackend,
    ModelArtifact,
    register_backend,
)
from hwprune.latency.measure import environment_fingerprint, measure, measure_interleaved

OPTIONS = ("device", "threads", "compile", "compile_mode", "compile_backend", "dtype", "channels_last")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = ("float32", "float16", "bfloat16")


def architecture_hash(module: Any, input_shape: Sequence[int] = ()) -> str:
    """sha256 of a module's structure (its repr, parameter and buffer names, shapes and dtypes) and the input
    shape, not of its weight values: two pruned models with the same shapes share latency cache entries."""
    h = hashlib.sha256()
    h.update(repr(module).encode())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    h.update(repr(tuple(int(d) for d in input_shape)).encode())
    return h.hexdigest()


class TorchBackend(LatencyBackend):
    name = "torch"
    input_kind = "torch"

    def __init__(self, profile: DeviceProfile):
        check_options(profile, OPTIONS)
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable(f"device profile {profile.name!r} needs PyTorch: pip install torch") from e
        self._torch = torch
        self.profile = profile
        dev = str(profile.option("device", "cpu"))
        if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"device profile {profile.name!r}: option device is {dev!r}; use cpu, cuda or cuda:N")
        if dev.startswith("cuda"):
            if not torch.cuda.is_available():
                fix = (
                    "run on a machine with an NVIDIA GPU and driver"
                    if torch.version.cuda
                    else "install a CUDA build of torch (see pytorch.org) on a machine with an NVIDIA GPU"
                )
                raise BackendUnavailable(
                    f"device profile {profile.name!r} asks for device {dev!r}, but torch {torch.__version__} sees no "
                    f"CUDA device here; {fix}, or use the torch-cpu profile"
                )
            idx = int(dev[5:]) if ":" in dev else 0
            if idx >= torch.cuda.device_count():
                raise BackendUnavailable(
                    f"device profile {profile.name!r} asks for {dev!r}, but only {torch.cuda.device_count()} CUDA "
                    f"device(s) exist; pick cuda:0..cuda:{torch.cuda.device_count() - 1}"
                )
            dev = f"cuda:{idx}"
        self.device = dev
        threads = profile.option("threads", 0)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ConfigError(f"device profile {profile.name!r}: option threads must be an integer >= 0, got {threads!r}")
        self.threads = threads or torch.get_num_threads()
        comp = profile.option("compile", False)
        if not isinstance(comp, bool):
            raise ConfigError(f"device profile {profile.name!r}: option compile must be true or false, got {comp!r}")
        self.compile = comp
        self.compile_mode = str(profile.option("compile_mode", "default"))
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"device profile {profile.name!r}: option compile_mode is {self.compile_mode!r}; choose one of: "
                f"{', '.join(COMPILE_MODES)}"
            )
        self.compile_backend = str(profile.option("compile_backend", "inductor"))
        self.dtype_name = str(profile.option("dtype", "float32"))
        if self.dtype_name not in DTYPES:
            raise ConfigError(
                f"device profile {profile.name!r}: option dtype is {self.dtype_name!r}; choose one of: {', '.join(DTYPES)}"
            )
        self.dtype = getattr(torch, self.dtype_name)
        cl = profile.option("channels_last", False)
        if not isinstance(cl, bool):
            raise ConfigError(f"device profile {profile.name!r}: option channels_last must be true or false, got {cl!r}")
        self.channels_last = cl

    # -- helpers -------------------------------------------------------------------------------------------------

    def _prepare(self, module: Any, input_shape: Sequence[int]):
        """A copy of the module on the device in eval mode (the caller's module is left untouched), and an input."""
        torch = self._torch
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(
                f"device profile {self.profile.name!r} (torch backend) measures PyTorch modules, got "
                f"{type(module).__name__}; pass the pruned nn.Module"
            )
        shape = batched_shape(self.profile, input_shape)
        m = copy.deepcopy(module).eval().to(device=self.device, dtype=self.dtype)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=self.device, dtype=self.dtype)
        if self.channels_last and x.dim() == 4:
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compile:
            try:
                m = torch.compile(m, mode=None if self.compile_mode == "default" else self.compile_mode,
                                  backend=self.compile_backend)
            except Exception as e:  # torch raises several types for an unknown backend
                raise ConfigError(
                    f"device profile {self.profile.name!r}: torch.compile(backend={self.compile_backend!r}) failed: "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; set compile: false or another backend"
                ) from e
        return m, x

    def _runner(self, m: Any, x: Any):
        """A call that runs the model once; on CUDA it returns its own latency in ms from CUDA events."""
        torch = self._torch
        if self.device.startswith("cuda"):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)

            def run_cuda() -> float:
                start.record()
                m(x)
                end.record()
                end.synchronize()
                return start.elapsed_time(end)

            return run_cuda, True
        return (lambda: m(x)), False

    def _settings(self):
        s = self.profile.measure
        if self.compile and s.warmup < 3:  # the first calls compile (and may recompile once)
            from dataclasses import replace

            s = replace(s, warmup=3)
        return s

    def _with_threads(self, fn):
        torch = self._torch
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                if self.device.startswith("cuda"):
                    with torch.cuda.device(self.device):
                        out = fn()
                        torch.cuda.synchronize()
                        return out
                return fn()
        finally:
            torch.set_num_threads(before)

    # -- interface -----------------------------------------------------------------------------------------------

    def fingerprint(self) -> Dict[str, Any]:
        """Computed once per backend (it may run nvidia-smi); a copy is returned."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self._make_fingerprint()
        return dict(self._fingerprint)

    def _make_fingerprint(self) -> Dict[str, Any]:
        torch = self._torch
        extra: Dict[str, Any] = {
            "backend": self.name,
            "torch": torch.__version__,
            "device": self.device.split(":")[0],
            "threads": self.threads,
            "compile": self.compile,
            "compile_mode": self.compile_mode if self.compile else None,
            "compile_backend": self.compile_backend if self.compile else None,
            "dtype": self.dtype_name,
            "channels_last": self.channels_last,
            "batch_size": self.profile.batch_size,
        }
        if self.device.startswith("cuda"):
            extra["gpu"] = torch.cuda.get_device_name(self.device)
            extra["cuda"] = torch.version.cuda
        return environment_fingerprint(**extra)

    def measure_module(self, module: Any, input_shape: Sequence[int]) -> LatencyStats:
        def go():
            m, x = self._prepare(module, input_shape)
            run, returns_ms = self._runner(m, x)
            return measure(run, self._settings(), returns_ms=returns_ms)

        return self._with_threads(go)

    def measure_module_pair(self, module: Any, reference: Any, input_shape: Sequence[int]) -> PairedLatency:
        """Candidate and reference modules timed alternately in the same window."""

        def go():
            mc, xc = self._prepare(module, input_shape)
            mr, xr = self._prepare(reference, input_shape)
            rc, returns_ms = self._runner(mc, xc)
            rr, _ = self._runner(mr, xr)
            return measure_interleaved(rc, rr, self._settings(), returns_ms=returns_ms)

        return self._with_threads(go)

    def measure_onnx(self, onnx_path: str, input_shape: Sequence[int]) -> LatencyStats:
        raise ConfigError(
            f"device profile {self.profile.name!r} uses the torch backend, which times PyTorch modules, not ONNX "
            f"files ({onnx_path}); call measure_candidate(backend, onnx_path, module, shape) or use an onnxruntime "
            f"profile"
        )

    def measure_onnx_pair(self, candidate_path: str, reference_path: str, input_shape: Sequence[int]) -> PairedLatency:
        return self.measure_onnx(candidate_path, input_shape)  # type: ignore[return-value]  (raises)


    def measure(self, model: ModelArtifact) -> LatencyStats:
        return self.measure_module(model.module, model.input_shape)

    def measure_pair(self, candidate: ModelArtifact, reference: ModelArtifact) -> PairedLatency:
        return self.measure_module_pair(candidate.module, reference.module, candidate.input_shape)

    def identity(self, model: ModelArtifact) -> str:
        return architecture_hash(model.module, model.input_shape)


@register_backend("torch")
def _make(profile: DeviceProfile) -> TorchBackend:
    return TorchBackend(profile)
