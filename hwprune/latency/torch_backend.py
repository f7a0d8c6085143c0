"""PyTorch backend: times the pruned ``nn.Module`` itself, the way it is deployed: eager, ``torch.compile`` or
replayed CUDA graphs; fp32, fp16 or bf16; NCHW or channels_last; on CPU or CUDA.

Options (profile ``options``; all parsed and checked by ``TorchOptions.from_profile``):
  device               cpu (default) | cuda | cuda:N
  threads              torch.set_num_threads while measuring; 0 (default) = torch's default at start-up
  compile              false (default) | true: time ``torch.compile(module)`` (compilation happens during warm-up)
  compile_mode         default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
  compile_backend      inductor (default) or another torch.compile backend (e.g. eager, aot_eager)
  dtype                float32 (default) | float16 | bfloat16: model and input cast (``.to(dtype)``)
  channels_last        false (default) | true: NHWC memory format for 4-D inputs and weights
  cuda_graphs          false (default) | true: capture the model once on a static input and time graph replays
                       (what a latency-critical deployment does: no per-kernel launch cost). CUDA only.
  cudnn_benchmark      false (default) | true: let cuDNN pick the fastest algorithm per shape (during warm-up)
  calls_per_sample     1 (default): each timed sample is K back-to-back calls, recorded once around the K calls
                       and divided by K (a GPU call of tens of microseconds is below the noise of timing one)
  warmup_until_steady  false (default) | true: warm up until the median of the last ``steady_window`` samples
                       moves by at most ``steady_tolerance`` against the window before (clocks ramped up), at
                       most ``steady_max_s`` seconds; the profile's ``measure.warmup`` is then the minimum
  steady_window        10;  steady_tolerance 0.01;  steady_max_s 10.0
  l2_flush             false (default) | true: overwrite a buffer twice the GPU's L2 cache before every sample,
                       outside the timed region (cold-cache timing; with calls_per_sample > 1 only the first call
                       of a sample is cold). CUDA only.

CUDA timings use CUDA events around each sample. On CUDA the GPU's SM clock and temperature are read (NVML,
optional ``nvidia-ml-py``) before and after timing; ``last_conditions`` holds them, and a measurement whose clock
moved by more than 5% is flagged there and in a warning line on stderr. This module imports torch only inside
the backend, so importing ``hwprune.latency`` stays torch-free for the remote agent.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

from hwprune.errors import BackendUnavailable, ConfigError, ModelError
from hwprune.inputs import InputSpec, call_model, inputs_key
from hwprune.latency.base import (
    DeviceProfile,
    LatencyStats,
    MeasureSettings,
    PairedLatency,
    batched_shape,
    check_options,
    LatencyBackend,
    ModelArtifact,
    register_backend,
)
from hwprune.latency.gpu_timing import ClockStopwatch, WarmUp, sampler, warm_until_steady
from hwprune.latency.measure import environment_fingerprint, measure, measure_interleaved
from hwprune.latency.nvml import GpuMonitor, clock_warning, conditions

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # torch.compile replays CUDA graphs itself
DTYPES = ("float32", "float16", "bfloat16")
CUDA_ONLY = ("cuda_graphs", "l2_flush")


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


@dataclass(frozen=True)
class TorchOptions:
    """The torch backend's options, typed and checked: one clear line per bad value."""

    device: str = "cpu"
    threads: int = 0
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    dtype: str = "float32"
    channels_last: bool = False
    cuda_graphs: bool = False
    cudnn_benchmark: bool = False
    calls_per_sample: int = 1
    warmup_until_steady: bool = False
    steady_window: int = 10
    steady_tolerance: float = 0.01
    steady_max_s: float = 10.0
    l2_flush: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_profile(cls, profile: DeviceProfile) -> "TorchOptions":
        check_options(profile, cls.names())
        where = f"device profile {profile.name!r}: option"
        default = cls()

        def get(key: str) -> Any:
            return profile.option(key, getattr(default, key))

        def boolean(key: str) -> bool:
            v = get(key)
            if not isinstance(v, bool):
                raise ConfigError(f"{where} {key} must be true or false, got {v!r}")
            return v

        def integer(key: str, minimum: int) -> int:
            v = get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ConfigError(f"{where} {key} must be an integer >= {minimum}, got {v!r}")
            return v

        def number(key: str, low: float, high: float, low_ok: bool = True) -> float:
            v = get(key)
            numeric = not isinstance(v, bool) and isinstance(v, (int, float))
            if not (numeric and (low <= v if low_ok else low < v) and v <= high):
                raise ConfigError(f"{where} {key} must be a number in {'[' if low_ok else '('}{low:g}, {high:g}], "
                                  f"got {v!r}")
            return float(v)

        def choice(key: str, choices: Sequence[str]) -> str:
            v = str(get(key))
            if v not in choices:
                raise ConfigError(f"{where} {key} is {v!r}; choose one of: {', '.join(choices)}")
            return v

        dev = str(get("device"))
        if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"{where} device is {dev!r}; use cpu, cuda or cuda:N")
        opts = cls(
            device=dev,
            threads=integer("threads", 0),
            compile=boolean("compile"),
            compile_mode=choice("compile_mode", COMPILE_MODES),
            compile_backend=str(get("compile_backend")),
            dtype=choice("dtype", DTYPES),
            channels_last=boolean("channels_last"),
            cuda_graphs=boolean("cuda_graphs"),
            cudnn_benchmark=boolean("cudnn_benchmark"),
            calls_per_sample=integer("calls_per_sample", 1),
            warmup_until_steady=boolean("warmup_until_steady"),
            steady_window=integer("steady_window", 2),
            steady_tolerance=number("steady_tolerance", 0.0, 1.0),
            steady_max_s=number("steady_max_s", 0.0, 3600.0, low_ok=False),
            l2_flush=boolean("l2_flush"),
        )
        if not opts.is_cuda:
            for key in CUDA_ONLY:
                if getattr(opts, key):
                    raise ConfigError(f"{where} {key} needs device cuda (this profile times device {dev!r}); "
                                      f"set {key}: false or device: cuda")
        if opts.cuda_graphs and opts.compile and opts.compile_mode in CUDAGRAPH_COMPILE_MODES:
            raise ConfigError(f"{where} cuda_graphs: torch.compile mode {opts.compile_mode!r} already replays CUDA "
                              f"graphs; set cuda_graphs: false, or compile_mode: max-autotune-no-cudagraphs")
        return opts

    def fingerprint(self) -> Dict[str, Any]:
        """The options that change a timing. Options added after the first release appear only when set, so
        the latency caches of profiles that do not use them keep their keys."""
        fp: Dict[str, Any] = {
            "compile": self.compile,
            "compile_mode": self.compile_mode if self.compile else None,
            "compile_backend": self.compile_backend if self.compile else None,
            "dtype": self.dtype,
            "channels_last": self.channels_last,
        }
        default = TorchOptions()
        for key in ("cuda_graphs", "cudnn_benchmark", "calls_per_sample", "warmup_until_steady", "l2_flush"):
            if getattr(self, key) != getattr(default, key):
                fp[key] = getattr(self, key)
        return fp


def architecture_hash(module: Any, input_shape: Sequence[int] = ()) -> str:
    """sha256 of a module's structure (its repr, parameter and buffer names, shapes and dtypes) and the input
    shape, not of its weight values: two pruned models with the same shapes share latency cache entries."""
    h = hashlib.sha256()
    h.update(repr(module).encode())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    h.update(repr(inputs_key(input_shape) if isinstance(input_shape, InputSpec)
                  else tuple(int(d) for d in input_shape)).encode())
    return h.hexdigest()


def warn(msg: str) -> None:
    print(f"hwprune: warning: {msg}", file=sys.stderr, flush=True)


class _CudaEventStopwatch:
    def __init__(self, torch):
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self._start.record()

    def stop_ms(self) -> float:
        self._end.record()
        self._end.synchronize()
        return float(self._start.elapsed_time(self._end))


class TorchBackend(LatencyBackend):
    name = "torch"
    input_kind = "torch"

    def __init__(self, profile: DeviceProfile):
        self.options = opts = TorchOptions.from_profile(profile)
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable(f"device profile {profile.name!r} needs PyTorch: pip install torch") from e
        self._torch = torch
        self.profile = profile
        dev = opts.device
        if opts.is_cuda:
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
        self.threads = opts.threads or torch.get_num_threads()
        self.dtype = getattr(torch, opts.dtype)
        self._monitor: Optional[GpuMonitor] = None
        self._flush_buffer = None
        self.last_warmup: Optional[WarmUp] = None
        self.last_conditions: Optional[Dict[str, Any]] = None  # GPU state around the last measurement (CUDA)

    # -- preparing the model -------------------------------------------------------------------------------------

    def _prepare(self, module: Any, input_shape: Sequence[int]):
        """A copy of the module on the device in eval mode, cast and laid out as the profile says (the caller's
        module is left untouched), compiled if asked, and an input."""
        torch = self._torch
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(
                f"device profile {self.profile.name!r} (torch backend) measures PyTorch modules, got "
                f"{type(module).__name__}; pass the pruned nn.Module"
            )
        m = copy.deepcopy(module).eval().to(device=self.device, dtype=self.dtype)
        if isinstance(input_shape, InputSpec) and not input_shape.is_image:
            return self._compiled(m), self._spec_inputs(input_shape)
        if isinstance(input_shape, InputSpec):  # the one image input, given as a spec
            input_shape = input_shape.shapes(self.profile.batch_size)[input_shape.names[0]]
        shape = batched_shape(self.profile, input_shape)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=self.device, dtype=self.dtype)
        if self.options.channels_last and x.dim() == 4:
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        return self._compiled(m), x

    def _spec_inputs(self, spec: InputSpec) -> Any:
        """Named inputs (token ids stay int64; float inputs take the profile's dtype), in the spec's convention."""
        x = spec.example(self.profile.batch_size)

        def to_device(t):
            return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)

        if isinstance(x, dict):
            return {k: to_device(v) for k, v in x.items()}
        return tuple(to_device(t) for t in x)

    def _compiled(self, m: Any) -> Any:
        torch = self._torch
        o = self.options
        if o.compile:
            try:
                m = torch.compile(m, mode=None if o.compile_mode == "default" else o.compile_mode,
                                  backend=o.compile_backend)
            except Exception as e:  # torch raises several types for an unknown backend
                raise ConfigError(
                    f"device profile {self.profile.name!r}: torch.compile(backend={o.compile_backend!r}) failed: "
                    f"{_one_line(e)}; set compile: false or another backend"
                ) from e
        return m

    def _call(self, m: Any, x: Any) -> Callable[[], object]:
        """A zero-argument call that runs the model once the way the profile deploys it."""
        o = self.options
        if o.cuda_graphs:
            return self._graph_replay(m, x)
        if o.compile and o.compile_mode in CUDAGRAPH_COMPILE_MODES and self.device.startswith("cuda"):
            mark = self._torch.compiler.cudagraph_mark_step_begin

            def step():  # a new iteration: earlier outputs of the compiled graph may be overwritten
                mark()
                return call_model(m, x)

            return step
        return lambda: call_model(m, x)

    def _graph_replay(self, m: Any, x: Any) -> Callable[[], object]:
        """Capture one forward pass on the static input ``x`` as a CUDA graph; the call replays it."""
        torch = self._torch
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):  # lazy initialisation, cuDNN algorithm choice, compilation: not captured
                for _ in range(3):
                    call_model(m, x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = call_model(m, x)
        except Exception as e:
            raise ModelError(
                f"the model cannot be captured as a CUDA graph on profile {self.profile.name!r}: {_one_line(e)}; "
                f"set cuda_graphs: false (some sparse kernels synchronise with the host)"
            ) from e
        keep = (m, x, out)  # the graph reads and writes these tensors: they must outlive it

        def replay():
            graph.replay()
            return keep

        return replay

    # -- timing --------------------------------------------------------------------------------------------------

    def _flush(self) -> Optional[Callable[[], None]]:
        if not self.options.l2_flush:
            return None
        if self._flush_buffer is None:
            torch = self._torch
            l2 = int(getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 0)
            nbytes = max(2 * l2, 64 << 20)  # twice the L2 (64 MiB when torch does not say)
            self._flush_buffer = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device)
        buf = self._flush_buffer
        return lambda: buf.zero_()

    def _sampler(self, call: Callable[[], object]) -> Callable[[], float]:
        if self.device.startswith("cuda"):
            watch = _CudaEventStopwatch(self._torch)
        else:
            watch = ClockStopwatch()
        return sampler(call, self.options.calls_per_sample, watch, before=self._flush())

    def _warm(self, *samples: Callable[[], float]) -> MeasureSettings:
        """Warm-up (the profile's count, or until steady): returns the settings for the timed part."""
        s = self.profile.measure
        minimum = max(s.warmup, 3) if self.options.compile else s.warmup  # the first calls compile
        o = self.options
        if not o.warmup_until_steady:
            return dataclasses.replace(s, warmup=minimum)
        self.last_warmup = warm_until_steady(lambda: sum(f() for f in samples), o.steady_window,
                                             o.steady_tolerance, o.steady_max_s, min_samples=minimum)
        return dataclasses.replace(s, warmup=0)

    def _reading(self) -> Optional[Dict[str, Any]]:
        if not self.device.startswith("cuda"):
            return None
        self.fingerprint()  # opens the monitor
        return self._monitor.reading() if self._monitor is not None else None

    def _timed(self, what: str, run: Callable[[], Any]):
        """``run`` between two readings of the GPU's state; records and flags a clock change."""
        before = self._reading()
        result = run()
        after = self._reading()
        if before is not None and after is not None:
            cond = conditions(before, after)
            if self.last_warmup is not None:
                cond.update(warmup_samples=self.last_warmup.samples, warmup_steady=self.last_warmup.steady)
            self.last_conditions = cond
            line = clock_warning(what, cond)
            if line:
                warn(line)
        return result

    def _session(self, fn):
        """Run ``fn`` with the profile's threads, inference mode, device and cuDNN setting; restore them after."""
        torch = self._torch
        before = torch.get_num_threads()
        bench = torch.backends.cudnn.benchmark
        torch.set_num_threads(self.threads)
        torch.backends.cudnn.benchmark = self.options.cudnn_benchmark
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
            torch.backends.cudnn.benchmark = bench

    # -- interface -----------------------------------------------------------------------------------------------

    def fingerprint(self) -> Dict[str, Any]:
        """Computed once per backend (it may query NVML); a copy is returned."""
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
            **self.options.fingerprint(),
            "batch_size": self.profile.batch_size,
        }
        if self.device.startswith("cuda"):
            extra["gpu"] = torch.cuda.get_device_name(self.device)
            extra["cuda"] = torch.version.cuda
            props = torch.cuda.get_device_properties(self.device)
            uuid = getattr(props, "uuid", None)
            self._monitor = GpuMonitor.open(index=int(self.device.split(":")[1]), uuid=str(uuid) if uuid else None)
            if self._monitor is not None:
                info = self._monitor.static_info()
                extra.update(driver=info["driver"], max_sm_clock_mhz=info["max_sm_clock_mhz"],
                             power_limit_w=info["power_limit_w"])
        return environment_fingerprint(**extra)

    def measure_module(self, module: Any, input_shape: Sequence[int]) -> LatencyStats:
        def go():
            m, x = self._prepare(module, input_shape)
            sample = self._sampler(self._call(m, x))
            settings = self._warm(sample)
            return self._timed(type(module).__name__, lambda: measure(sample, settings, returns_ms=True))

        return self._session(go)

    def measure_module_pair(self, module: Any, reference: Any, input_shape: Sequence[int]) -> PairedLatency:
        """Candidate and reference modules timed alternately in the same window."""

        def go():
            mc, xc = self._prepare(module, input_shape)
            mr, xr = self._prepare(reference, input_shape)
            sc, sr = self._sampler(self._call(mc, xc)), self._sampler(self._call(mr, xr))
            settings = self._warm(sc, sr)
            return self._timed("a candidate and its reference",
                               lambda: measure_interleaved(sc, sr, settings, returns_ms=True))

        return self._session(go)

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
