"""GPU timing logic (samples of K calls, warm-up until steady, NVML clock-change flag) with fake clocks and a fake
NVML; the torch profiles' deployment options on torch-cpu; the shipped GPU profiles fail with one clear line on a
machine without CUDA or TensorRT. CUDA tests skip without a GPU."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from hwprune.config import load_profile, parse_profile
from hwprune.errors import BackendUnavailable, ConfigError
from hwprune.latency import DeviceProfile, MeasureSettings, make_backend
from hwprune.latency.gpu_timing import ClockStopwatch, sampler, warm_until_steady
from hwprune.latency.nvml import GpuMonitor, clock_warning, conditions, load_nvml
from hwprune.latency.torch_backend import TorchBackend, TorchOptions
from test_latency_models import torch_conv_net

FAST = MeasureSettings(warmup=1, min_repeats=4, max_repeats=8, target_rel_ci=0.5, time_cap_s=0.5)
GPU_PROFILES = ("gpu-torch-cuda", "gpu-torch-cuda-fp16", "gpu-torch-cuda-b64")


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, ms: float) -> None:
        self.t += ms / 1000.0


def profile(**options) -> DeviceProfile:
    return DeviceProfile(name="t", backend="torch", options={"threads": 1, **options}, measure=FAST)


# -- samples of K calls ------------------------------------------------------------------------------------------

def test_a_sample_is_the_time_of_k_calls_divided_by_k_and_excludes_the_flush():
    clock = FakeClock()
    durations = iter([1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 10.0, 10.0, 10.0, 10.0])
    flushes = []

    def flush():
        flushes.append(clock.t)
        clock.advance(100.0)  # a slow flush must not be timed

    sample = sampler(lambda: clock.advance(next(durations)), 5, ClockStopwatch(clock), before=flush)
    assert sample() == pytest.approx(3.0)  # (1+2+3+4+5) / 5
    assert sample() == pytest.approx(10.0)
    assert len(flushes) == 2
    with pytest.raises(ValueError, match="calls_per_sample"):
        sampler(lambda: None, 0, ClockStopwatch(clock))


def test_stopwatch_syncs_before_the_clock_stops():
    clock = FakeClock()
    watch = ClockStopwatch(clock, sync=lambda: clock.advance(7.0))  # pending device work finishes in sync()
    watch.start()
    assert watch.stop_ms() == pytest.approx(7.0)


# -- warm-up until steady ----------------------------------------------------------------------------------------

def test_warm_up_stops_when_two_windows_agree():
    clock = FakeClock()
    ramp = [5.0, 4.0, 3.0, 2.5, 2.2, 2.1] + [2.0] * 100  # clocks ramping up, then steady

    def sample():
        clock.advance(1.0)
        return ramp.pop(0)

    w = warm_until_steady(sample, window=3, tolerance=0.01, max_s=60.0, clock=clock)
    # windows of 3 at sample 10: [2.2,2.1,2.0] (median 2.1) vs [2,2,2] differ by 5%; at sample 11
    # [2.1,2.0,2.0] (median 2.0) vs [2,2,2] agree
    assert w.steady and w.samples == 11 and w.median_ms == 2.0


def test_warm_up_is_capped_and_honours_a_minimum():
    clock = FakeClock()
    values = iter(range(1, 10_000))

    def drifting():
        clock.advance(125.0)  # exact in binary: 8 samples are 1.0 s
        return float(next(values))  # never steady

    w = warm_until_steady(drifting, window=2, tolerance=0.01, max_s=1.0, clock=clock)
    assert not w.steady and w.samples == 8 and w.seconds == pytest.approx(1.0)
    flat = warm_until_steady(lambda: 1.0, window=2, tolerance=0.01, max_s=60.0, min_samples=9, clock=FakeClock())
    assert flat.steady and flat.samples == 9


# -- NVML ----------------------------------------------------------------------------------------------------------

class FakeNvml:
    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, clocks):
        self.clocks = list(clocks)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid != "GPU-1234":
            raise RuntimeError("not found")
        return "h-uuid"

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"h{i}"

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA Fake"

    def nvmlSystemGetDriverVersion(self):
        return "580.1"

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        assert kind == self.NVML_CLOCK_SM
        return 1980

    def nvmlDeviceGetPowerManagementLimit(self, h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    def nvmlDeviceGetClockInfo(self, h, kind):
        return self.clocks.pop(0)

    def nvmlDeviceGetTemperature(self, h, kind):
        return 41


def test_nvml_monitor_reads_static_info_and_flags_a_clock_change():
    nv = FakeNvml([1980, 1500, 1980, 1960])
    mon = GpuMonitor.open(index=3, uuid="1234", nvml=nv)
    assert mon.handle == "h-uuid" and GpuMonitor.open(index=3, uuid="nope", nvml=nv).handle == "h3"
    info = mon.static_info()
    assert info == {"gpu_name": "NVIDIA Fake", "driver": "580.1", "max_sm_clock_mhz": 1980, "power_limit_w": None}
    dropped = conditions(mon.reading(), mon.reading())  # 1980 -> 1500: -24%
    assert dropped["clock_changed"] and dropped["sm_clock_change"] == pytest.approx(-480 / 1980)
    assert dropped["temperature_c_after"] == 41
    assert "1980 -> 1500 MHz (-24%)" in clock_warning("resnet18", dropped)
    steady = conditions(mon.reading(), mon.reading())  # 1980 -> 1960: -1%
    assert not steady["clock_changed"] and clock_warning("x", steady) is None
    assert not conditions({"sm_clock_mhz": None}, {"sm_clock_mhz": 1500})["clock_changed"]


def test_without_nvidia_ml_py_there_is_no_monitor(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert load_nvml() is None and GpuMonitor.open() is None


def test_a_measurement_whose_clock_moved_is_flagged(monkeypatch, capsys):
    readings = iter([{"sm_clock_mhz": 1980, "temperature_c": 50}, {"sm_clock_mhz": 1200, "temperature_c": 71}])
    monkeypatch.setattr(TorchBackend, "_reading", lambda self: next(readings))
    b = TorchBackend(profile(warmup_until_steady=True, steady_window=2, steady_max_s=0.5))
    b.measure_module(torch_conv_net(4), (1, 3, 8, 8))
    c = b.last_conditions
    assert c["clock_changed"] and c["sm_clock_mhz_after"] == 1200 and c["temperature_c_after"] == 71
    assert c["warmup_samples"] >= 4
    err = capsys.readouterr().err
    assert err.startswith("hwprune: warning: SM clock changed 1980 -> 1200 MHz") and err.count("\n") == 1


# -- options -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "options, match",
    [
        ({"calls_per_sample": 0}, "calls_per_sample must be an integer >= 1, got 0"),
        ({"steady_tolerance": 2}, r"steady_tolerance must be a number in \[0, 1\], got 2"),
        ({"steady_max_s": 0}, r"steady_max_s must be a number in \(0, 3600\], got 0"),
        ({"steady_window": 1}, "steady_window must be an integer >= 2"),
        ({"cuda_graphs": "yes"}, "cuda_graphs must be true or false"),
        ({"cuda_graphs": True}, "cuda_graphs needs device cuda"),
        ({"l2_flush": True}, "l2_flush needs device cuda"),
        ({"device": "cuda", "cuda_graphs": True, "compile": True, "compile_mode": "reduce-overhead"},
         "already replays CUDA graphs"),
        ({"cuda_graph": True}, "unknown torch option 'cuda_graph'"),
    ],
)
def test_bad_options_one_line(options, match):
    with pytest.raises(ConfigError, match=match) as e:
        TorchOptions.from_profile(profile(**options))
    assert "\n" not in str(e.value)


def test_default_options_keep_the_fingerprint_keys():
    """Profiles that use none of the new options keep their latency cache keys."""
    fp = TorchOptions.from_profile(profile()).fingerprint()
    assert set(fp) == {"compile", "compile_mode", "compile_backend", "dtype", "channels_last"}
    fp = TorchOptions.from_profile(profile(calls_per_sample=4)).fingerprint()
    assert fp["calls_per_sample"] == 4


@pytest.mark.parametrize("options", [
    {"channels_last": True},
    {"dtype": "bfloat16"},
    {"dtype": "bfloat16", "channels_last": True, "calls_per_sample": 3},
    {"compile": True, "compile_backend": "eager"},
    {"warmup_until_steady": True, "steady_window": 2, "steady_max_s": 0.5, "calls_per_sample": 2},
])
def test_deployment_options_on_torch_cpu(options):
    b = TorchBackend(profile(**options))
    net = torch_conv_net(8)
    st = b.measure_module(net, (1, 3, 16, 16))
    assert st.median_ms > 0 and 4 <= st.n <= 8
    # 256x the MACs in the second conv: at 32 channels (16x) bf16 call overhead made the pair a coin toss in CI
    pair = b.measure_module_pair(torch_conv_net(128), net, (1, 3, 16, 16))
    assert pair.ratio > 1.0
    assert next(net.parameters()).dtype == torch.float32  # the caller's module is untouched
    assert b.fingerprint()["dtype"] == options.get("dtype", "float32")


@pytest.mark.slow
def test_inductor_compile_with_bf16_channels_last_on_torch_cpu():
    """The real torch.compile path (inductor builds C++ here: ~20 s of CPU), as a CPU deployment would run it."""
    b = TorchBackend(profile(compile=True, dtype="bfloat16", channels_last=True))
    assert b.measure_module(torch_conv_net(8), (1, 3, 16, 16)).median_ms > 0
    assert b.fingerprint()["compile_backend"] == "inductor"


def test_calls_per_sample_times_k_calls_per_sample(monkeypatch):
    calls = []
    b = TorchBackend(profile(calls_per_sample=3))
    monkeypatch.setattr(b, "_call", lambda m, x: (lambda: calls.append(1)))
    st = b.measure_module(torch_conv_net(4), (1, 3, 8, 8))
    assert len(calls) == 3 * (FAST.warmup + st.n)


# -- shipped profiles ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_parse(name):
    p = load_profile(name)
    o = TorchOptions.from_profile(p)
    assert o.is_cuda and o.cudnn_benchmark and o.warmup_until_steady
    assert o.cuda_graphs == (p.batch_size == 1)
    if name.endswith("fp16"):
        assert o.dtype == "float16" and p.channel_multiple == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_without_cuda_say_so_in_one_line(name, capsys):
    from hwprune.cli import main

    with pytest.raises(BackendUnavailable, match="sees no CUDA device here"):
        make_backend(load_profile(name))
    rc = main(["profile", "--model", "torchvision:resnet18", "--input-shape", "3,32,32", "--profile", name])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("hwprune: error: ") and err.count("\n") == 1


def test_tensorrt_profile_without_the_provider_says_so_in_one_line():
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT")
    with pytest.raises(BackendUnavailable, match="'TensorrtExecutionProvider', which this onnxruntime") as e:
        make_backend(load_profile("gpu-ort-tensorrt"))
    assert "\n" not in str(e.value)


def test_channel_multiple_is_parsed_and_checked():
    base = {"backend": "torch", "options": {"device": "cpu"}}
    assert parse_profile({**base, "channel_multiple": 8}, "p", "p.yaml").channel_multiple == 8
    assert parse_profile(base, "p", "p.yaml").channel_multiple == 1
    with pytest.raises(ConfigError, match="channel_multiple: 0 is below the minimum 1"):
        parse_profile({**base, "channel_multiple": 0}, "p", "p.yaml")


# -- on a GPU ------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_time_a_model(name):
    p = load_profile(name)
    from dataclasses import replace

    b = make_backend(replace(p, measure=FAST, batch_size=min(p.batch_size, 4)))
    pair = b.measure_module_pair(torch_conv_net(64), torch_conv_net(8), (1, 3, 64, 64))
    assert pair.candidate.median_ms > 0 and pair.ratio > 1.0
    fp = b.fingerprint()
    assert fp["gpu"] and fp["dtype"] == TorchOptions.from_profile(p).dtype


@pytest.mark.cuda
@cuda
def test_l2_flush_and_graphs_on_cuda():
    b = TorchBackend(profile(device="cuda", cuda_graphs=True, l2_flush=True, calls_per_sample=2))
    assert b.measure_module(torch_conv_net(16), (1, 3, 32, 32)).median_ms > 0
    assert b._flush_buffer is not None and b._flush_buffer.numel() * 4 >= 64 << 20


# -- channel_multiple: the search rounds kept channels to what the profile needs ----------------------------------

def test_round_to_combines_the_space_and_the_profiles():
    from hwprune.workload import combined_round_to

    assert combined_round_to(8, [1]) == 8 and combined_round_to(None, [8]) == 8
    assert combined_round_to(4, [6]) == 12 and combined_round_to(None, [1, 1]) is None
    assert combined_round_to(1, []) is None


def test_search_plans_keep_channel_multiples_of_the_profile(tmp_path):
    from conftest import FAST_SPACE_YAML, make_tiny_net
    from hwprune.plan import apply_plan
    from hwprune.workload import build_workload

    (tmp_path / "space.yaml").write_text(FAST_SPACE_YAML.replace("round_to: 4", "round_to: 2"))
    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    w = build_workload(str(model_path), "none", str(tmp_path / "space.yaml"), input_shape=(1, 8, 8), log=lambda m: None,
                       trust_pickle=True)
    assert w.round_to == 2
    fp16 = DeviceProfile(name="fp16", backend="torch", channel_multiple=8)
    w8 = w.for_profiles([profile(), fp16])
    assert w8.round_to == 8 and w.round_to == 2  # the original workload is unchanged
    plan = w8.uniform_plan(0.3)  # 16 channels * 0.7 = 11.2: round_to 2 keeps 10, round_to 8 keeps 8
    assert plan.round_to == 8
    model = apply_plan(w8.model, plan, w8.example_input)[0]
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c % 8 == 0 for c in widths) and min(widths) < 16, widths
    model2 = apply_plan(w.model, w.uniform_plan(0.3), w.example_input)[0]
    assert any(m.out_channels % 8 for m in model2.modules() if isinstance(m, torch.nn.Conv2d))  # the test can fail


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse tensor cores need a CUDA GPU with compute capability >= 8.0")
def test_sparse_modules_are_copied_moved_and_timed_on_cuda():
    import copy

    from hwprune.structures import get_structure

    lin = torch.nn.Linear(256, 256)
    semi = get_structure("nm").apply(lin, 1.0, {"execute": "semi_structured"})[0]
    assert copy.deepcopy(semi)._sparse is not None and semi.cpu()._sparse is None  # off the GPU: dense
    b16 = TorchBackend(profile(device="cuda", dtype="float16"))
    assert b16.measure_module(get_structure("nm").apply(lin, 1.0, {"execute": "semi_structured"})[0],
                              (8, 256)).median_ms > 0
    bsr = get_structure("block").apply(lin, 0.75, {"b": 16})[0]
    assert TorchBackend(profile(device="cuda")).measure_module(bsr, (8, 256)).median_ms > 0
