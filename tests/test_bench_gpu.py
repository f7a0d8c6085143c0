"""scripts/bench_gpu.py end to end in its CPU smoke mode, so the GPU benchmark cannot rot between GPU sessions."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_bench_gpu_cpu_smoke(tmp_path):
    report = tmp_path / "report.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--cpu-smoke", "--models", "resnet18",
         "--variants", "b1-bf16", "b2-fp32", "--trials", "2", "--out", str(tmp_path / "work"),
         "--report", str(report), "--deadline-s", "1200"],
        capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stderr[-2000:]
    text = report.read_text()
    spread = re.search(r"\| b1-bf16 \| smoke-b1-bf16 \| ([\d.]+) / ([\d.]+) / ([\d.]+) \| ([\d.]+) \|", text)
    assert spread, text  # three separate profile runs and their spread
    assert re.search(r"\| filter \| b2-fp32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", text), text
    assert "nm 2:4 semi-structured | b1-bf16 |" in text and "compute capability" in text  # a cell, not a crash
    fronts = re.findall(r"\| resnet18 \| (b1-bf16|b2-fp32) \| \d+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text)
    assert {v for v, *_ in fronts} == {"b1-bf16", "b2-fp32"}, text  # reported and alone speedups, both variants
    assert "worst |reported / alone - 1|" in text
