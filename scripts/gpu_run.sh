#!/usr/bin/env bash
# Run THERE (a GPU device machine; its python3 holds CUDA torch): installs the carried wheels from .whl/
# (scripts/gpu_wheels.sh made them), runs the GPU tests and scripts/bench_gpu.py, and writes everything under
# $OUT (report, test log). One device call, about 8 minutes:
#
#   run(command="bash scripts/gpu_run.sh", carry=[".whl"], timeout_s=600)
#
# Arguments go to bench_gpu.py (then the tests are skipped), e.g. a second call for what the deadline skipped:
#   bash scripts/gpu_run.sh --parts fronts --variants b64-fp32 b64-fp16
# Then copy $OUT/gpu_bench.md into scripts/results/ and the figures into the README.
set -uo pipefail
OUT=${OUT:-/tmp/hwprune-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=$PWD:/tmp/site
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv
  python3 -c "import torch, pynvml; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"
# the CUDA tests (about 20 s): graphs, fp16 profiles, L2 flush, 2:4 semi-structured
[ $# -eq 0 ] && timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_gpu_timing.py tests/test_latency_torch.py tests/test_structures_realize.py tests/test_latency_onnxruntime.py 2>&1 | tail -30 | tee "$OUT/cuda_tests.txt"
timeout 470 python3 scripts/bench_gpu.py --deadline-s 420 --out /tmp/bench-gpu --report "$OUT/gpu_bench.md" "$@" \
  2>&1 | tail -200 > "$OUT/bench_log.txt"
echo "bench exit $?" >> "$OUT/bench_log.txt"
tail -5 "$OUT/bench_log.txt"
