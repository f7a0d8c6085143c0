"""PyTorch backend on CPU (CUDA tests skip without a GPU)."""
from __future__ import annotations

import pytest
import torch

from hwprune.errors import BackendUnavailable, ConfigError
from hwprune.latency import DeviceProfile, MeasureSettings, make_backend, measure_candidate, measure_candidate_pair
from hwprune.latency.torch_backend import TorchBackend, architecture_hash
from test_latency_models import torch_conv_net

FAST = MeasureSettings(warmup=2, min_repeats=5, max_repeats=30, target_rel_ci=0.05, time_cap_s=0.5)


def profile(**options) -> DeviceProfile:
    return DeviceProfile(name="t", backend="torch", options=options, measure=FAST)


def test_measures_a_module_and_restores_threads():
    before = torch.get_num_threads()
    b = make_backend(profile(threads=1))
    assert b.input_kind == "torch"
    net = torch_conv_net(8)
    st = measure_candidate(b, "unused.onnx", net, (1, 3, 16, 16))
    assert st.median_ms > 0 and 5 <= st.n <= 30
    assert torch.get_num_threads() == before
    assert next(net.parameters()).device.type == "cpu" and net.training  # caller's module untouched


def test_interleaved_modules_ratio():
    b = TorchBackend(profile(threads=1))
    pair = measure_candidate_pair(b, None, torch_conv_net(48), None, torch_conv_net(8), (1, 3, 32, 32))
    assert pair.interleaved and pair.ratio > 3.0, pair


def test_compile_path_runs():
    # the eager compile backend checks the torch.compile plumbing without a C++ build
    b = TorchBackend(profile(threads=1, compile=True, compile_backend="eager"))
    assert b.measure_module(torch_conv_net(4), (1, 3, 8, 8)).median_ms > 0
    assert b.fingerprint()["compile"] is True


def test_onnx_input_is_refused_clearly():
    b = TorchBackend(profile())
    with pytest.raises(ConfigError, match="times PyTorch modules, not ONNX files"):
        b.measure_onnx("m.onnx", (1, 3, 8, 8))
    with pytest.raises(ConfigError, match="pass the pruned nn.Module"):
        b.measure_module("not a module", (1, 3, 8, 8))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"device": "tpu"}, "use cpu, cuda or cuda:N"),
        ({"threads": "4"}, "integer >= 0"),
        ({"compile": "yes"}, "true or false"),
        ({"compile_mode": "fast"}, "choose one of: default"),
        ({"dtype": "int8"}, "choose one of: float32"),
        ({"provider": "cpu"}, "unknown torch option 'provider'; valid options: device"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        TorchBackend(profile(**options))


def test_fingerprint():
    fp = TorchBackend(profile(threads=1)).fingerprint()
    assert fp["backend"] == "torch" and fp["torch"] == torch.__version__ and fp["threads"] == 1
    assert fp["device"] == "cpu"


def test_architecture_hash_ignores_weights_not_shapes():
    a, b = torch_conv_net(8), torch_conv_net(8)
    assert architecture_hash(a, (1, 3, 8, 8)) == architecture_hash(b, (1, 3, 8, 8))
    assert architecture_hash(a, (1, 3, 8, 8)) != architecture_hash(torch_conv_net(6), (1, 3, 8, 8))
    assert architecture_hash(a, (1, 3, 8, 8)) != architecture_hash(a, (1, 3, 16, 16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_unavailable():
    with pytest.raises(BackendUnavailable, match="sees no CUDA device"):
        TorchBackend(profile(device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_events_timing():
    b = TorchBackend(profile(device="cuda"))
    pair = b.measure_module_pair(torch_conv_net(64), torch_conv_net(8), (1, 3, 64, 64))
    assert pair.candidate.median_ms > 0 and pair.ratio > 1.0
    assert b.fingerprint()["gpu"]
