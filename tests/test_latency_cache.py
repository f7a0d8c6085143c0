"""Latency cache: hit/miss, persistence across instances, concurrent writers in separate processes."""
from __future__ import annotations

import multiprocessing as mp
import shutil

import onnx
import pytest

from hwprune.latency import DeviceProfile, MeasureSettings, PairedLatency
from hwprune.latency.base import LatencyStats
from hwprune.latency.cache import (
    LatencyCache,
    cache_key,
    cached_measure,
    cached_measure_pair,
    file_sha256,
    onnx_architecture_hash,
)
from hwprune.latency.measure import pair_from_samples, summarize
from hwprune.latency.onnxruntime_backend import OnnxRuntimeBackend
from test_latency_models import conv_onnx

FAST = MeasureSettings(warmup=1, min_repeats=5, max_repeats=10, target_rel_ci=0.5, time_cap_s=0.2)
FP = {"cpu": "x", "provider": "CPUExecutionProvider", "threads": 1}


class CountingBackend(OnnxRuntimeBackend):
    def __init__(self, profile):
        super().__init__(profile)
        self.calls = 0

    def measure_onnx(self, path, shape):
        self.calls += 1
        return super().measure_onnx(path, shape)

    def measure_onnx_pair(self, c, r, shape):
        self.calls += 1
        return super().measure_onnx_pair(c, r, shape)


def backend(threads=1):
    return CountingBackend(DeviceProfile(name="t", backend="onnxruntime", options={"threads": threads}, measure=FAST))


def test_key_depends_on_model_device_shape_and_reference():
    k = cache_key("a" * 64, FP, (1, 3, 8, 8))
    assert k == cache_key("a" * 64, dict(FP), [1, 3, 8, 8])
    assert k != cache_key("b" * 64, FP, (1, 3, 8, 8))
    assert k != cache_key("a" * 64, {**FP, "threads": 2}, (1, 3, 8, 8))
    assert k != cache_key("a" * 64, FP, (1, 3, 16, 16))
    assert k != cache_key("a" * 64, FP, (1, 3, 8, 8), reference_hash="c" * 64)


def test_get_put_roundtrip_and_persistence(tmp_path):
    path = tmp_path / "run" / "latency_cache.sqlite"
    c = LatencyCache(path)
    st = summarize([1.0, 1.2, 0.9, 1.1])
    pair = pair_from_samples([2.0, 2.1], [1.0, 1.05])
    assert c.get("k1") is None and c.misses == 1
    c.put("k1", st, {"note": "x"})
    c.put("k2", pair)
    assert c.get("k1") == st and c.hits == 1
    assert isinstance(c.get("k2"), PairedLatency) and c.get("k2") == pair
    c.close()
    again = LatencyCache(path)  # a resumed run
    assert len(again) == 2 and again.get("k1") == st and "k2" in again


def test_cached_measure_measures_each_architecture_once(tmp_path):
    cache = LatencyCache(tmp_path / "c.sqlite")
    b = backend()
    m = conv_onnx(tmp_path / "m.onnx", channels=8)
    s1 = cached_measure(cache, b, m, None, (1, 3, 8, 8))
    s2 = cached_measure(cache, b, m, None, (1, 3, 8, 8))
    assert b.calls == 1 and s1 == s2
    cached_measure(cache, b, m, None, (1, 3, 16, 16))  # another shape is another measurement
    assert b.calls == 2
    other = backend(threads=2)  # another device fingerprint too
    cached_measure(cache, other, m, None, (1, 3, 8, 8))
    assert other.calls == 1
    # a copy of the same bytes under another name is the same model
    shutil.copy(m, tmp_path / "copy.onnx")
    cached_measure(cache, b, str(tmp_path / "copy.onnx"), None, (1, 3, 8, 8))
    assert b.calls == 2
    # resumed run, new process state: still cached
    b2 = backend()
    cached_measure(LatencyCache(tmp_path / "c.sqlite"), b2, m, None, (1, 3, 8, 8))
    assert b2.calls == 0
    assert cached_measure(None, b2, m, None, (1, 3, 8, 8)).n >= 5 and b2.calls == 1  # no cache: always measured


def test_cached_pair(tmp_path):
    cache = LatencyCache(tmp_path / "c.sqlite")
    b = backend()
    small, big = conv_onnx(tmp_path / "s.onnx", 4), conv_onnx(tmp_path / "b.onnx", 16)
    p1 = cached_measure_pair(cache, b, small, None, big, None, (1, 3, 8, 8))
    p2 = cached_measure_pair(cache, b, small, None, big, None, (1, 3, 8, 8))
    assert b.calls == 1 and p1 == p2 and isinstance(p1, PairedLatency)
    cached_measure_pair(cache, b, big, None, small, None, (1, 3, 8, 8))
    assert b.calls == 2


def test_architecture_hash_ignores_float_weights_only(tmp_path):
    a = conv_onnx(tmp_path / "a.onnx", channels=8, seed=0)
    b = conv_onnx(tmp_path / "b.onnx", channels=8, seed=1)
    c = conv_onnx(tmp_path / "c.onnx", channels=6, seed=0)
    assert file_sha256(a) != file_sha256(b)
    assert onnx_architecture_hash(a) == onnx_architecture_hash(b)
    assert onnx_architecture_hash(a) != onnx_architecture_hash(c)
    # integer initializers (e.g. Reshape targets) stay part of the architecture
    m = onnx.load(a)
    m.graph.initializer.append(onnx.numpy_helper.from_array(__import__("numpy").array([1, -1], "int64"), "shape"))
    onnx.save(m, tmp_path / "d.onnx")
    m.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(__import__("numpy").array([-1, 1], "int64"), "shape"))
    onnx.save(m, tmp_path / "e.onnx")
    assert onnx_architecture_hash(str(tmp_path / "d.onnx")) != onnx_architecture_hash(str(tmp_path / "e.onnx"))


def test_torch_modules_are_keyed_by_architecture(tmp_path):
    from hwprune.latency.torch_backend import TorchBackend
    from test_latency_models import torch_conv_net

    class Counting(TorchBackend):
        calls = 0

        def measure_module(self, module, shape):
            Counting.calls += 1
            return super().measure_module(module, shape)

    b = Counting(DeviceProfile(name="t", backend="torch", options={"threads": 1}, measure=FAST))
    cache = LatencyCache(tmp_path / "c.sqlite")
    cached_measure(cache, b, None, torch_conv_net(4), (1, 3, 8, 8))
    cached_measure(cache, b, None, torch_conv_net(4), (1, 3, 8, 8))  # other weights, same architecture
    assert Counting.calls == 1


def _writer(path, worker, n):
    c = LatencyCache(path)
    for i in range(n):
        c.put(f"w{worker}-{i}", summarize([float(worker), float(i) + 1.0]))
        c.get(f"w{(worker + 1) % 4}-{i}")


def test_concurrent_writers_in_processes(tmp_path):
    path = str(tmp_path / "c.sqlite")
    LatencyCache(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 100)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    c = LatencyCache(path)
    assert len(c) == 400
    assert c.get("w3-99") == summarize([3.0, 100.0])


def _open_and_put(path: str, i: int) -> None:
    from hwprune.latency.cache import LatencyCache
    from hwprune.latency.measure import summarize

    cache = LatencyCache(path)
    cache.put(f"key-{i}", summarize([1.0 + i, 2.0, 3.0]))


def test_workers_creating_the_cache_at_once_do_not_fail(tmp_path):
    """Search workers start together and all create the cache file at once; every one must open it and write.
    (A shared-storage CI run once failed a worker with 'database is locked' here; this test guards concurrent
    creation but did not reproduce that race deterministically.)"""
    import multiprocessing as mp

    from hwprune.latency.cache import LatencyCache

    for round_ in range(3):
        path = str(tmp_path / f"cache-{round_}.sqlite")
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_open_and_put, args=(path, i)) for i in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 6
        assert len(LatencyCache(path)) == 6


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_cache_file_is_set_aside_and_rebuilt(tmp_path, damage):
    """A damaged cache (not SQLite at all, or cut short mid-file) is reported, moved aside and rebuilt empty."""
    path = tmp_path / "latency_cache.sqlite"
    if damage == "garbage":
        path.write_bytes(b"this is not a database\x00" * 200)
    else:
        good = LatencyCache(path)
        for i in range(200):
            good.put(f"k{i}", summarize([1.0, 1.1, 1.2] * 20))
        good.close()
        data = path.read_bytes()
        path.write_bytes(data[:100] + b"\xff" * 50 + data[150: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        cache = LatencyCache(path)
    assert len(cache) == 0
    cache.put("k", summarize([1.0, 2.0, 3.0]))
    assert cache.get("k") is not None
    assert list(tmp_path.glob("latency_cache.sqlite.corrupt-*"))
