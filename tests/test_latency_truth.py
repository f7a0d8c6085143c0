"""Latency that agrees with ground truth: models timed in worker processes, the ground-truth timing alone in a
fresh process, `hwprune verify`, the plausibility guard, the study's device check and what the cache keys on."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import FAST_PROFILE_YAML, FAST_SPACE_YAML, make_tiny_net
from hwprune.cli import main
from hwprune.config import load_profile, parse_profile
from hwprune.errors import ModelError, RunError
from hwprune.export import to_onnx
from hwprune.latency.base import DeviceProfile, LatencyBackend, MeasureSettings, PairedLatency
from hwprune.latency.measure import pair_from_samples
from hwprune.latency.worker import ModelProcess, measure_pair_in_processes, time_alone


def _mlp(width: int, depth: int, inputs: int = 0) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 and inputs else width, width), nn.ReLU()]
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A large and a small ONNX model with the same input (about 13x apart in MACs), like dense and pruned."""
    d = tmp_path_factory.mktemp("pair")
    big = to_onnx(_mlp(512, 6), (1, 512), d / "big.onnx")
    small = to_onnx(_mlp(128, 6, inputs=512), (1, 512), d / "small.onnx")
    return Path(big), Path(small)


@pytest.fixture(scope="module")
def conv_pair(tmp_path_factory):
    """The demo CNN and a narrower copy (1x28x28 input): the pair in which issue 7's bug showed (2 threads: the
    dense model timed 2.2x slower beside the candidate than alone)."""
    from hwprune.models import DemoNet

    d = tmp_path_factory.mktemp("conv")
    torch.manual_seed(0)
    big = to_onnx(DemoNet().eval(), (1, 1, 28, 28), d / "dense.onnx")
    small = to_onnx(DemoNet(widths=(32, 64, 128)).eval(), (1, 1, 28, 28), d / "pruned.onnx")
    return Path(big), Path(small)


def _profile(threads: int = 0, **measure) -> DeviceProfile:
    data = {"backend": "onnxruntime", "options": {"threads": threads},
            "measure": {"warmup": 20, "min_repeats": 30, "max_repeats": 200, "target_rel_ci": 0.02,
                        "time_cap_s": 0.6, **measure}}
    return parse_profile(data, "truth", "test")


def test_worker_round_trip_and_errors(two_models, tmp_path):
    big, _ = two_models
    prof = _profile(threads=1)
    with ModelProcess(prof, str(big), (1, 512)) as proc:
        ms = proc.block(5, untimed=1)
        assert len(ms) == 5 and all(m > 0 for m in ms)
        stats = proc.measure(MeasureSettings(warmup=1, min_repeats=5, max_repeats=10, time_cap_s=0.2))
        assert 5 <= stats.n <= 10 and stats.p10_ms <= stats.median_ms <= stats.p90_ms
        assert proc.fingerprint["intra_op_threads"] == 1
        # untimed calls go on for warm_ms before the timed ones (the switch warm-up of issue 7)
        import time as _time
        t0 = _time.perf_counter()
        assert len(proc.block(2, untimed=1, warm_ms=300.0)) == 2
        assert _time.perf_counter() - t0 >= 0.3
    with pytest.raises(ModelError, match="does not fit"):
        ModelProcess(prof, str(big), (1, 7))
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="cannot load"):
        ModelProcess(prof, str(bad), (1, 512))


def test_reference_in_a_pair_runs_as_fast_as_alone(conv_pair):
    """The bug of issue 7: the dense model ran ~2.2x slower beside a candidate than alone (competing or still
    spinning thread pools). In worker processes, the idle one frozen, the reference's in-pair time must match its
    solo time (median of three tries: the machine is shared and noisy)."""
    big, small = conv_pair
    prof = _profile(threads=0)
    shape = (1, 1, 28, 28)

    def in_pair_over_solo() -> float:
        solo = statistics.median(time_alone(prof, str(big), shape).median_ms for _ in range(3))
        with ModelProcess(prof, str(big), shape) as ref, ModelProcess(prof, str(small), shape) as cand:
            pair = measure_pair_in_processes(cand, ref, prof.measure)
        assert pair.interleaved and pair.candidate.median_ms < pair.reference.median_ms
        return pair.reference.median_ms / solo

    # without freezing the idle worker this is erratic, 1.1-2.2 (median of three about 1.5); frozen, about 0.99.
    # The bug makes the pair slower; a pair *faster* than alone (0.70 seen while another test process loaded the
    # 2-core machine) means the solo timing was disturbed from outside, so the lower bound is loose.
    ratio = statistics.median(in_pair_over_solo() for _ in range(3))
    assert 0.5 <= ratio <= 1.2


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGSTOP"), reason="no SIGSTOP on this OS")
def test_idle_worker_is_frozen_while_the_other_is_timed(two_models):
    big, _ = two_models
    prof = _profile(threads=1)

    def state(pid):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    import time

    with ModelProcess(prof, str(big), (1, 512)) as proc:
        proc.pause()
        deadline = time.monotonic() + 2.0  # the signal is delivered asynchronously
        while state(proc.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state(proc.pid) == "T"  # stopped: no thread of it can run
        assert len(proc.block(2)) == 2  # asking for work resumes it
        assert state(proc.pid) != "T"


def test_backend_pair_uses_worker_processes_unless_told_not_to(two_models, monkeypatch):
    from hwprune.latency import worker
    from hwprune.latency.onnxruntime_backend import OnnxRuntimeBackend

    big, _ = two_models
    calls = []
    real = worker.measure_pair_in_processes
    monkeypatch.setattr(worker, "measure_pair_in_processes", lambda c, r, s: calls.append((c.pid, r.pid)) or real(c, r, s))
    quick = {"warmup": 1, "min_repeats": 3, "max_repeats": 4, "time_cap_s": 0.2}
    b = OnnxRuntimeBackend(_profile(threads=1, **quick))
    try:
        b.measure_onnx_pair(str(big), str(big), (1, 512))
        b.measure_onnx_pair(str(big), str(big), (1, 512))
    finally:
        b.close()
    assert len(calls) == 2 and calls[0][1] == calls[1][1]  # one reference worker, kept across pairs
    assert calls[0][0] != calls[1][0]  # a fresh worker per candidate
    b = OnnxRuntimeBackend(_profile(threads=1, isolation="none", **quick))
    b.measure_onnx_pair(str(big), str(big), (1, 512))
    assert len(calls) == 2  # in-process path


# ---------------------------------------------------------------------------------------------------------------
# the plausibility guard


class _FakeBackend(LatencyBackend):
    name = "fake"

    def fingerprint(self):
        return {"fake": 1}

    def measure(self, model):
        raise AssertionError("the meter's measurements are faked in these tests")


def _fake_pair(ratio: float) -> PairedLatency:
    return pair_from_samples([ratio] * 5, [1.0] * 5)


@pytest.fixture
def meter(tmp_path, monkeypatch, profile_file):
    from hwprune import trial

    monkeypatch.setattr(trial, "make_backend", lambda p: _FakeBackend())
    monkeypatch.setattr(trial, "cached_measure", lambda *a, **k: _fake_pair(1.0).reference)
    return trial.LatencyMeter([load_profile(str(profile_file))], make_tiny_net(), (1, 8, 8), tmp_path, cache=False)


def test_guard_flags_a_speedup_beyond_the_macs_cut_that_persists(meter, monkeypatch, tmp_path):
    from hwprune import trial

    readings = iter([0.1, 0.1])  # 10x faster, twice
    monkeypatch.setattr(trial, "cached_measure_pair", lambda *a, **k: _fake_pair(next(readings)))
    lat = meter.measure(make_tiny_net(), tmp_path / "c", macs_cut=2.0)["fast-cpu"]
    assert lat.flag.startswith("implausible") and "2.00x fewer MACs" in lat.flag


def test_guard_keeps_the_second_reading_when_the_first_was_an_outlier(meter, monkeypatch, tmp_path):
    from hwprune import trial

    readings = iter([0.1, 0.55])
    monkeypatch.setattr(trial, "cached_measure_pair", lambda *a, **k: _fake_pair(next(readings)))
    lat = meter.measure(make_tiny_net(), tmp_path / "c", macs_cut=2.0)["fast-cpu"]
    assert lat.flag == "" and lat.ratio == pytest.approx(0.55)


def test_guard_leaves_plausible_speedups_alone(meter, monkeypatch, tmp_path):
    from hwprune import trial

    readings = iter([0.6])  # 1.67x with 2x fewer MACs: fine, measured once
    monkeypatch.setattr(trial, "cached_measure_pair", lambda *a, **k: _fake_pair(next(readings)))
    lat = meter.measure(make_tiny_net(), tmp_path / "c", macs_cut=2.0)["fast-cpu"]
    assert lat.flag == "" and lat.speedup == pytest.approx(1 / 0.6)


# ---------------------------------------------------------------------------------------------------------------
# what the cache keys on


def test_cache_keys_on_weights_where_the_profile_exploits_zeros(tmp_path):
    from hwprune.trial import weights_matter, LatencyMeter

    a = to_onnx(_mlp(64, 2), (1, 64), tmp_path / "a.onnx")
    m = _mlp(64, 2)
    with torch.no_grad():
        m[0].weight[:, :32] = 0  # same architecture, other (sparser) weights
    b = to_onnx(m, (1, 64), tmp_path / "b.onnx")
    dense_only = parse_profile({"backend": "onnxruntime", "accelerates": ["filter", "channel"]}, "p", "t")
    sparse = parse_profile({"backend": "torch", "accelerates": ["filter", "block"]}, "q", "t")
    assert not weights_matter(dense_only) and weights_matter(sparse)
    h = LatencyMeter._hash
    assert h(None, dense_only, str(a)) == h(None, dense_only, str(b))
    assert h(None, sparse, str(a)) != h(None, sparse, str(b))


def test_cache_key_includes_the_measurement_method():
    from hwprune.latency.cache import cache_key

    fp = {"cpu": "x"}
    k1 = cache_key("m", fp, (1, 3), settings=MeasureSettings().to_dict())
    k2 = cache_key("m", fp, (1, 3), settings=MeasureSettings(isolation="none").to_dict())
    assert k1 != k2


# ---------------------------------------------------------------------------------------------------------------
# verify, end to end, and the device check


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    (root / "space.yaml").write_text(FAST_SPACE_YAML.replace("ratios: [0.0, 0.5]", "ratios: [0.0, 0.25, 0.5, 0.75]"))
    (root / "fast-cpu.yaml").write_text(FAST_PROFILE_YAML)
    torch.save(make_tiny_net(), root / "tiny.pt")
    args = ["search", "--model", str(root / "tiny.pt"), "--trust-pickle", "--data", "none", "--input-shape", "1,8,8",
            "--search-space", str(root / "space.yaml"), "--profile", str(root / "fast-cpu.yaml"), "--trials", "4",
            "--out", str(root / "run"), "--no-progress", "--verify-rounds", "1", "--verify-tolerance", "0.99"]
    assert main(args) == 0
    return {"root": root, "dir": root / "run", "args": args}


def test_search_ends_by_verifying_its_front(latency_run):
    d = latency_run["dir"]
    front = pd.read_csv(d / "pareto.csv")
    assert "isolated_speedup:fast-cpu" in front.columns and front["isolated_speedup:fast-cpu"].gt(0).all()
    v = pd.read_csv(d / "verify.csv")
    assert set(v.trial) == set(front.trial)
    assert (d / "verify.png").stat().st_size > 1000
    m = json.loads((d / "models" / f"trial-{int(front.trial.iloc[0])}" / "metrics.json").read_text())
    assert m["verify"]["fast-cpu"]["rounds"] == 1


def test_verify_exit_code_follows_the_tolerance(latency_run, capsys, monkeypatch):
    """The exit code and the EXCEEDS mark follow the tolerance. Solo timings are replaced by ones that agree with
    the reported ratios exactly (a tiny model's real microsecond timings are too noisy for an exact check; the real
    path runs in test_search_ends_by_verifying_its_front)."""
    from hwprune import verify

    d = latency_run["dir"]
    front = pd.read_csv(d / "pareto.csv")
    ratio = {f"trial-{int(t)}": float(r) for t, r in zip(front.trial, front["latency_ratio:fast-cpu"])}

    def agreeing(profile, files, rounds, log=print):
        return {name: [1.0 if name == "dense" else ratio[name]] * rounds for name in files}

    monkeypatch.setattr(verify, "time_files_alone", agreeing)
    assert main(["verify", "--run", str(d), "--rounds", "2", "--tolerance", "0.01"]) == 0
    v = pd.read_csv(d / "verify.csv")
    assert v.rel_error.abs().max() < 1e-9 and (v.rounds == 2).all()
    front["latency_ratio:fast-cpu"] = front["latency_ratio:fast-cpu"] / 5.0  # claim 5x more speedup than measured
    front.to_csv(d / "pareto.csv", index=False)
    assert main(["verify", "--run", str(d), "--rounds", "1", "--tolerance", "0.5"]) == 2
    assert "EXCEEDS" in capsys.readouterr().out
    v = pd.read_csv(d / "verify.csv")
    assert v.rel_error.min() == pytest.approx(4.0) and (v.verdict == "disagrees").all()
    assert main(["verify", "--run", str(d), "--profile", "nope"]) == 2


def test_verify_tells_an_error_inside_the_truths_own_noise_from_a_wrong_figure(latency_run, capsys, monkeypatch):
    """A reported speedup 20% off the median alone reading but inside the range the model read alone over the
    rounds is 'within the truth's noise' (still exit 2: the tolerance is not met); one outside that range
    'disagrees'."""
    from hwprune import verify

    d = latency_run["dir"]
    front = pd.read_csv(d / "pareto.csv")
    ratio = {f"trial-{int(t)}": float(r) for t, r in zip(front.trial, front["latency_ratio:fast-cpu"])}
    scale = {"wide": [0.75, 1.2, 1.3], "narrow": [1.19, 1.2, 1.21]}  # per-round model time / reported ratio

    for case, verdict in (("wide", "within the truth's noise"), ("narrow", "disagrees")):
        def noisy(profile, files, rounds, log=print):
            return {n: [1.0] * rounds if n == "dense" else [ratio[n] * k for k in scale[case]] for n in files}

        monkeypatch.setattr(verify, "time_files_alone", noisy)
        assert main(["verify", "--run", str(d), "--rounds", "3", "--tolerance", "0.05"]) == 2
        out = capsys.readouterr().out
        v = pd.read_csv(d / "verify.csv")
        assert (v.verdict == verdict).all(), case
        assert v.rel_error.max() == pytest.approx(0.2)  # median model time 1.2x the reported one
        assert ("inside the range the model read alone" in out) == (case == "wide")
        assert ("outside both" in out) == (case == "narrow")


def test_resume_on_another_device_is_refused(latency_run, capsys):
    import optuna

    d = latency_run["dir"]
    study = optuna.load_study(study_name="hwprune", storage=f"sqlite:///{d / 'study.db'}")
    fps = study.user_attrs["fingerprints"]
    fps["fast-cpu"]["cpu"] = "Some Other CPU"
    study.set_user_attr("fingerprints", fps)
    args = [a for a in latency_run["args"]]
    args[args.index("--trials") + 1] = "5"
    assert main(args) == 2
    assert "another device" in capsys.readouterr().err
    assert main(args + ["--allow-device-change"]) == 0
