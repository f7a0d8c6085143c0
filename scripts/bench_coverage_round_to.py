"""Does rounding pruned widths matter for latency? A torchvision model (random init) pruned at 0.3 on every group,
with and without round_to=8; dense and both pruned ONNX models timed alone in fresh processes on cpu-1thread.

    python scripts/bench_coverage_round_to.py mnasnet0_5    # measured: dense 1.31 ms, 2.70 ms, round_to=8 0.82 ms
"""
import os, sys, tempfile, torch, warnings
warnings.simplefilter("ignore")
from hwprune import graph
from hwprune.config import load_profile
from hwprune.export import to_onnx
from hwprune.latency.base import MeasureSettings
from hwprune.latency.worker import time_alone
from hwprune.models import load_model
name = sys.argv[1]
torch.set_num_threads(1)
x = torch.randn(1, 3, 224, 224)
prof = load_profile("cpu-1thread"); st = MeasureSettings(warmup=5, min_repeats=10, max_repeats=100, time_cap_s=5.0)
m = load_model(f"torchvision:{name}")
layers = [n for n, mod in m.named_modules() if isinstance(mod, graph.ROOT_TYPES)]
cls = layers[-1:]
d = tempfile.mkdtemp()
to_onnx(m, (1, 3, 224, 224), os.path.join(d, "dense.onnx"))
res = {"dense": time_alone(prof, os.path.join(d, "dense.onnx"), [1, 3, 224, 224], st).median_ms}
for rt in (None, 8):
    p, _ = graph.prune_groups(m, x, {n: 0.3 for n in layers if n not in cls}, ignored=cls, round_to=rt)
    path = os.path.join(d, f"p{rt}.onnx"); to_onnx(p, (1, 3, 224, 224), path)
    res[f"round_to={rt}"] = time_alone(prof, path, [1, 3, 224, 224], st).median_ms
print(name, {k: round(v, 2) for k, v in res.items()})
