"""The latency table's arithmetic on hand-made tables and small inputs worked by hand: the Theil-Sen calibration
fit (and its fallbacks), Spearman and Kendall tau-b (with ties), linear / bilinear interpolation between entries,
and prediction from plans in a process that cannot import torch."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest

from hwprune.latency.lut import LatencyTable, TableMiss, fit_calibration, kendall, predictor_error, spearman
from hwprune.latency.lut.trace import LayerCall, op_key


def points(sums, measured):
    return [{"table_sum_ms": s, "measured_ms": m} for s, m in zip(sums, measured)]


def test_theil_sen_fit_closed_form():
    # on a line: the line itself
    assert fit_calibration(points([1, 2, 3, 4], [1.5 * s + 0.2 for s in [1, 2, 3, 4]])) == pytest.approx((1.5, 0.2))
    # pairwise slopes 2, 1, 0.5 -> median 1; residuals 0, 1, 0 -> intercept 0
    assert fit_calibration(points([1, 2, 4], [1, 3, 4])) == pytest.approx((1.0, 0.0))
    # one model caught by interference: 6 of the 10 pairwise slopes are 2, so the median ignores it (least squares
    # would give a slope of 17.5)
    measured = [2 * s + 1 for s in [1, 2, 3, 4]] + [100]
    assert fit_calibration(points([1, 2, 3, 4, 5], measured)) == pytest.approx((2.0, 1.0))


def test_fit_falls_back_to_scale_one_with_median_overhead():
    assert fit_calibration(points([2.0], [3.0])) == (1.0, 1.0)  # the dense model alone
    assert fit_calibration(points([2.0, 2.0], [3.0, 5.0])) == (1.0, 2.0)  # no spread in the table sums
    assert fit_calibration(points([1.0, 2.0], [1.0, 11.0])) == (1.0, 4.5)  # slope 10: outside the plausible range


def test_rank_correlations_closed_form():
    # one swapped pair of four: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 12/60; tau = (5 - 1) / 6
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert kendall([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    # a tie: ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4) -> Pearson of ranks sqrt(0.9); tau-b = 5 / sqrt((6 - 1) * 6)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert kendall([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert kendall([1, 2, 3], [3, 2, 1]) == pytest.approx(-1) and spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)


def test_undefined_correlations_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(kendall([1, 1, 1], [1, 2, 3]))
        assert math.isnan(spearman([1], [2])) and math.isnan(kendall([1], [2]))
        e = predictor_error(None, [(2.0, 1.0)])
    assert e["n"] == 1 and e["mape"] == pytest.approx(100) and e["bias"] == pytest.approx(100)
    assert math.isnan(e["spearman"]) and math.isnan(e["kendall"])


CONV = ["Conv2d", [3, 3], [1, 1], [1, 1], [1, 1], False, "zeros", [8, 8], True, "ReLU"]


def table_of(entries):
    return LatencyTable(entries=entries, layers=[], ins={}, outs={}, removed={}, round_to=None, rounding_verified=True,
                        channels={}, ratios=[0.0], input_shape=(3, 8, 8), batch_size=1, fingerprint={}, profile="p",
                        space="s", model="m")


def test_interpolation_closed_form():
    # a latency that is not bilinear in (in, out), so bilinear, linear and nearest answers all differ
    f = lambda i, o: 0.01 * i * i + 0.1 * o + 0.003 * i * o  # noqa: E731
    grid = {op_key(CONV, i, o, 1): f(i, o) for i in (4, 8) for o in (4, 8, 16)}
    grid.update({op_key(CONV, c, c, c): 0.5 * c for c in (4, 12)})  # depthwise: in == out == groups
    t = table_of(grid)
    # bilinear in the cell (4..8) x (8..16): the mean of the four corners at its centre
    assert t.lookup(op_key(CONV, 6, 12, 1)) == pytest.approx((f(4, 8) + f(4, 16) + f(8, 8) + f(8, 16)) / 4)
    # in on the grid: linear in out alone (a quarter of the way from 8 to 16)
    assert t.lookup(op_key(CONV, 8, 10, 1)) == pytest.approx(0.75 * f(8, 8) + 0.25 * f(8, 16))
    # depthwise: linear along the channels, never mixed with the dense entries
    assert t.lookup(op_key(CONV, 6, 6, 6)) == pytest.approx(0.75 * 2.0 + 0.25 * 6.0)
    for outside in (op_key(CONV, 10, 8, 1), op_key(CONV, 6, 20, 1), op_key(CONV, 2, 2, 2)):
        with pytest.raises(TableMiss):
            t.lookup(outside)
    with pytest.raises(TableMiss):
        t.lookup(op_key(CONV, 6, 12, 1), interpolate=False)


def test_plan_prediction_needs_no_torch(tmp_path):
    """Loading a table and predicting plans (screening a search's candidates) is arithmetic: it must work where
    torch cannot be imported, with the rounding rule serving a ratio the table was not built with."""
    conv = LayerCall("c", "Conv2d", 3, 8, 1, (3, 3), (1, 1), (1, 1), (1, 1), False, "zeros", (8, 8), True, "ReLU")
    t = table_of({conv.key(3, 8, 1): 2.0, conv.key(3, 4, 1): 1.0})
    t.layers, t.outs, t.channels = [conv], {"c": [("c", 1)]}, {"c": 8}
    t.removed, t.ratios, t.scale, t.overhead_ms = {"c": {"0.0": 0, "0.5": 4}}, [0.0, 0.5], 2.0, 0.5
    path = t.save(tmp_path / "lut.json")
    code = (
        "import sys, json\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('torch is blocked here')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from hwprune.latency.lut import LatencyTable\n"
        f"t = LatencyTable.load({str(path)!r})\n"
        "print(json.dumps([t.predict_plan({'c': r}) for r in (0.0, 0.5, 0.25)] + ['torch' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # 0.25 of 8 channels removes 2 (rounding rule): 6 outputs, halfway between the entries for 4 and 8
    *predicted, torch_loaded = json.loads(out.stdout)
    assert predicted == pytest.approx([2 * 2.0 + 0.5, 2 * 1.0 + 0.5, 2 * 1.5 + 0.5]) and not torch_loaded
