"""scripts/headroom_from_results.py on a hand-made benchmark report: parsing and the two ceilings."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

REPORT = """`toy` on MNIST-5k, profile `cpu-1thread`, search space `demo-wide`, sampler tpe, 3 trials.
Dense (trial 0, same recovery budget): accuracy 0.9000, 1.00 M MACs.

|   trial | set     | on_front   | plan   |   accuracy |   acc_delta_pp |   speedup | speedup_range   |   macs_reduction |
|--------:|:--------|:-----------|:-------|-----------:|---------------:|----------:|:----------------|-----------------:|
|       1 | uniform | True       | 0=0.5  |      0.88  |           -2   |     2.5   | 2.40-2.60       |            4     |
|       2 | search  | False      | 0=0.9  |      0.70  |          -20   |    10     | 9.00-11.0       |           40     |
"""


def test_headroom_from_a_report(tmp_path):
    (tmp_path / "search_vs_baselines_toy.md").write_text(REPORT)
    (tmp_path / "search_vs_baselines_empty.md").write_text("no table here\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "headroom_from_results.py"), "--results",
                          str(tmp_path), "--max-drop", "0.10", "--out", str(tmp_path / "t.md")],
                         capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    rows = [ln for ln in (tmp_path / "t.md").read_text().splitlines() if ln.startswith("| toy")]
    # uniform (0.4, 0.88) covers 0.6 * 0.08 = 0.048 of the 0.10 box (48%); the fastest plan is 10x (below the floor),
    # a lossless model there 0.9 * 0.10 = 0.09 (1.875x); 1.10x needs it within 8.4 pp (tests/test_baselines.py)
    assert rows == ["| toy | toy / demo-wide | alone | 48% | 1.000x | 10.00x | 2.083x | 1.875x | 8.40 pp |"], rows


def test_latency_slack_gives_the_timing_noise_to_the_search(tmp_path):
    (tmp_path / "search_vs_baselines_toy.md").write_text(REPORT)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "headroom_from_results.py"), "--results",
                          str(tmp_path), "--max-drop", "0.10", "--latency-slack", "0.25"],
                         capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    # uniform 25% slower: (0.5, 0.88) covers 0.04 (40%), box ceiling 0.10 / 0.04; the floor 25% faster: 12.5x, a
    # lossless model there 0.92 * 0.10 = 0.092 (2.3x); 1.10x (0.044) needs 0.082 - 0.42 d >= 0.044, d = 9.05 pp;
    # the lead column stays as timed (1.000x)
    assert "| toy | toy / demo-wide | alone | 40% | 1.000x | 12.50x | 2.500x | 2.300x | 9.05 pp |" in out.stdout, out.stdout
