"""Per-layer latency lookup tables: coverage of every configuration a plan can produce (residual and depthwise
nets), torch-pruning's rounding, prediction from models and from plans, interpolation, persistence and the
fingerprint check, screening, and the predictor's error report.

Most tests use a deterministic fake backend whose "latency" is the size of the ONNX file (closed-form ordering, no
timing noise, fast); one builds a real table with ONNX Runtime on one thread."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from hwprune import graph
from hwprune.config import SearchSpace
from hwprune.latency import DeviceProfile, MeasureSettings
from hwprune.latency.lut import (
    LatencyTable,
    LutScreen,
    TableMismatch,
    TableMiss,
    build_lut,
    predictor_error,
    removed_channels,
    screen,
    trace_layers,
)
from hwprune.latency.base import OnnxFileBackend
from hwprune.latency.measure import summarize
from hwprune.models import DemoNet
from hwprune.workload import Workload

FAST = MeasureSettings(warmup=2, min_repeats=5, max_repeats=20, target_rel_ci=0.05, time_cap_s=0.3)


class SizeBackend(OnnxFileBackend):
    """Latency := ONNX file size in MB (monotone in the weights a layer holds): deterministic and instant."""

    name = "size"

    def __init__(self, tag: str = "a"):
        self.tag = tag
        self.calls = 0

    def fingerprint(self):
        return {"device": "fake", "tag": self.tag}

    def measure_onnx(self, path, input_shape):
        self.calls += 1
        return summarize([os.path.getsize(path) / 1e6])


class TinyMobile(nn.Module):
    """Inverted-residual-like block with a depthwise conv and a residual add, then a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(x.mean((2, 3)))


def workload_for(model: nn.Module, input_shape, ratios=(0.0, 0.25, 0.5), round_to=4, name="t") -> Workload:
    model.eval()
    ex = torch.randn(1, *input_shape)
    groups = graph.list_groups(model, ex, ["fc"])
    space = SearchSpace(name=name, ratios=tuple(ratios), round_to=round_to)
    return Workload("tiny", model, None, space, tuple(input_shape), groups, ["fc"])


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    wl = workload_for(DemoNet(1, 10, (8, 16, 32)), (1, 16, 16), ratios=(0.0, 0.25, 0.5, 0.75))
    return wl, build_lut(wl, SizeBackend(), progress=False)


@pytest.fixture(scope="module")
def mobile():
    torch.manual_seed(0)
    wl = workload_for(TinyMobile(), (3, 12, 12), ratios=(0.0, 0.25, 0.5, 0.75), round_to=None)
    return wl, build_lut(wl, SizeBackend(), progress=False)


def random_plans(wl, n, seed=0):
    rng = np.random.default_rng(seed)
    return [{g.name: float(rng.choice(wl.space.ratios)) for g in wl.groups} for _ in range(n)]


def pruned(wl, ratios):
    return graph.prune_groups(wl.model, wl.example_input, ratios, "l1", wl.space.round_to, wl.ignored)[0]


@pytest.mark.parametrize("which", ["demo", "mobile"])
def test_table_covers_every_config_sampled_plans_produce(which, request):
    wl, table = request.getfixturevalue(which)
    for ratios in random_plans(wl, 8, seed=1) + [{g.name: max(wl.space.ratios) for g in wl.groups}]:
        model = pruned(wl, ratios)
        keys = [c.key() for c in trace_layers(model, wl.input_shape)]
        missing = [k for k in keys if k not in table.entries]
        assert not missing, missing
        # the table's own arithmetic (no pruning) reproduces the pruned model's configurations exactly
        assert table.plan_keys(ratios) == keys
        assert table.predict(model, interpolate=False) == pytest.approx(table.predict_plan(ratios, interpolate=False))


def test_depthwise_layers_keep_in_equal_out_equal_groups(mobile):
    wl, table = mobile
    dw = [json.loads(k) for k in table.entries if json.loads(k)[-1] > 1]
    assert dw and all(k[-3] == k[-2] == k[-1] for k in dw)  # in == out == groups for every depthwise entry
    calls = {c.name: c for c in table.layers}
    assert calls["dw.0"].bn and calls["dw.0"].act == "ReLU6" and calls["project.0"].act == ""


def test_group_dependencies_follow_residual_coupling(demo):
    wl, table = demo
    # the stem's group also sets the outputs of the residual convs of layer1 and the inputs of layer2's first convs
    assert ("stem.0", 1) in table.outs["layer1.0.conv2"]
    assert ("stem.0", 1) in table.ins["layer2.0.downsample.0"]
    assert table.ins["layer1.0.conv2"] == [("layer1.0.conv1", 1)]


def test_rounding_rule_matches_torch_pruning(demo, mobile):
    for wl, table in (demo, mobile):
        assert table.rounding_verified
        for g in wl.groups:
            for r in wl.space.ratios:
                assert table.removed[g.name][repr(float(r))] == removed_channels(g.channels, r, wl.space.round_to)
    assert removed_channels(64, 0.3, 8) == 24 and removed_channels(64, 0.0, 8) == 0
    assert removed_channels(10, 0.5, None) == 5
    # where rounding down would leave nothing, exactly round_to channels remain (8 channels at 0.75, round_to 4)
    assert removed_channels(8, 0.75, 4) == 4 and removed_channels(16, 0.7, 8) == 8


def test_prediction_positive_and_ordered(demo):
    wl, table = demo
    levels = [table.predict_plan({g.name: r for g in wl.groups}) for r in sorted(wl.space.ratios)]
    assert all(v > 0 for v in levels)
    assert levels == sorted(levels, reverse=True) and levels[0] > levels[-1]
    dense = table.predict(wl.model)
    assert dense == pytest.approx(levels[0])
    assert table.dense_ms > 0 and len(table.calibration) == 3 + 3  # uniform (dense first) + random plans
    assert table.calibration[0]["plan"] == "uniform 0"


def test_interpolates_a_missing_config_or_raises(demo):
    wl, table = demo
    t2 = LatencyTable.from_dict(table.to_dict())
    fams = {}
    for k in t2.entries:
        fam, i, o, g = json.loads(k)[:-3], *json.loads(k)[-3:]
        fams.setdefault(json.dumps(fam), {})[(i, o)] = t2.entries[k]
    fam, grid = next((f, gr) for f, gr in fams.items() if len({i for i, _ in gr}) >= 3 and len({o for _, o in gr}) >= 3)
    ins, outs = sorted({i for i, _ in grid}), sorted({o for _, o in grid})
    mi, mo = ins[1], outs[1]
    key = lambda i, o: json.dumps(json.loads(fam) + [i, o, 1], separators=(",", ":"))  # noqa: E731
    del t2.entries[key(mi, mo)]
    ti, to = (mi - ins[0]) / (ins[2] - ins[0]), (mo - outs[0]) / (outs[2] - outs[0])
    expect = ((1 - ti) * (1 - to) * grid[(ins[0], outs[0])] + (1 - ti) * to * grid[(ins[0], outs[2])]
              + ti * (1 - to) * grid[(ins[2], outs[0])] + ti * to * grid[(ins[2], outs[2])])
    assert t2.lookup(key(mi, mo)) == pytest.approx(expect)
    with pytest.raises(TableMiss):
        t2.lookup(key(mi, mo), interpolate=False)
    with pytest.raises(TableMiss, match="rebuild the table"):
        t2.lookup(key(1000, 1000))


def test_save_load_round_trip_and_fingerprint_check(demo, tmp_path):
    wl, table = demo
    path = table.save(tmp_path / "lut.json")
    back = LatencyTable.load(path, fingerprint=SizeBackend().fingerprint(), space="t", model="tiny")
    assert back.entries == table.entries and back.layers == table.layers
    for ratios in random_plans(wl, 3, seed=2):
        assert back.predict_plan(ratios) == pytest.approx(table.predict_plan(ratios))
    with pytest.raises(TableMismatch) as e:
        LatencyTable.load(path, fingerprint=SizeBackend("other").fingerprint())
    assert "\n" not in str(e.value) and "rebuild" in str(e.value)
    with pytest.raises(TableMismatch, match="search space 't', not 'filters'"):
        LatencyTable.load(path, space="filters")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something"}))
    with pytest.raises(TableMismatch):
        LatencyTable.load(bad)


def test_screening_skips_a_clearly_over_budget_model(demo):
    wl, table = demo
    dense = table.predict(wl.model)
    smallest = pruned(wl, {g.name: max(wl.space.ratios) for g in wl.groups})
    small = table.predict(smallest)
    assert small < dense
    budget = small * 1.01
    scr = LutScreen(table, budget_ms=budget, margin=0.1)
    ok, pred = scr.should_measure(wl.model)
    assert not ok and pred == pytest.approx(dense)
    ok, pred = scr.should_measure(smallest)
    assert ok and pred == pytest.approx(small)
    ok, _ = scr.should_measure_plan({g.name: 0.0 for g in wl.groups})
    assert not ok and (scr.measured, scr.skipped) == (1, 2)
    assert "exceeds the budget" in scr.reason(dense)
    # relative to the dense model measured now: a machine twice as slow doubles every prediction
    rel = LutScreen(table, budget_ms=dense * 3, margin=0.0, reference_ms=2 * table.dense_predicted_ms)
    assert rel.should_measure(wl.model) == (True, pytest.approx(2 * dense))
    assert rel.should_measure_plan({g.name: 0.0 for g in wl.groups})[1] == pytest.approx(2 * dense)
    assert screen(10.9, 10.0, 0.1) and not screen(11.1, 10.0, 0.1) and screen(5.0, 10.0, 0.0)


def test_predictor_error_closed_form(demo):
    wl, table = demo
    e = predictor_error(None, [(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)])
    assert e["mape"] == 0 and e["spearman"] == pytest.approx(1) and e["kendall"] == pytest.approx(1)
    e = predictor_error(None, [(1.1, 1.0), (1.8, 2.0), (0.5, 3.0)])
    assert e["mape"] == pytest.approx((10 + 10 + 100 * 2.5 / 3) / 3)
    assert e["kendall"] == pytest.approx(-1 / 3) and e["spearman"] == pytest.approx(-0.5)
    plans = random_plans(wl, 3, seed=3)
    e = predictor_error(table, [(p, table.predict_plan(p)) for p in plans] + [(wl.model, table.predict(wl.model))])
    assert e["n"] == 4 and e["mape"] == pytest.approx(0, abs=1e-9)


def test_real_onnxruntime_table_on_one_thread(tmp_path):
    torch.manual_seed(0)
    wl = workload_for(DemoNet(1, 10, (16, 32, 64)), (1, 16, 16), ratios=(0.0, 0.5), round_to=8, name="t2")
    profile = DeviceProfile(name="cpu-1thread", backend="onnxruntime", options={"threads": 1}, measure=FAST)
    seen = []
    table = build_lut(wl, profile, progress=lambda done, total, what: seen.append((done, total)), calibrate=2,
                      calibration_random=1)
    assert seen[-1][0] == seen[-1][1] == len(table)
    assert all(v > 0 for v in table.entries.values())
    dense, small = table.predict(wl.model), table.predict_plan({g.name: 0.5 for g in wl.groups})
    assert 0 < small < dense
    from hwprune.latency import make_backend

    path = table.save(tmp_path / "lut.json")
    LatencyTable.load_for(path, profile, space="t2")  # same machine, same profile: accepted
    other = DeviceProfile(name="cpu-2", backend="onnxruntime", options={"threads": 2}, measure=FAST)
    with pytest.raises(TableMismatch, match="device fingerprint"):
        LatencyTable.load(path, fingerprint=make_backend(other).fingerprint())
