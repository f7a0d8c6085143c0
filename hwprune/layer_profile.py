"""Per-layer latency breakdown from ONNX Runtime's own profiler: where the time of one model goes."""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from typing import Dict, List

import numpy as np


def ort_layer_breakdown(backend, onnx_path: str, input_shape, runs: int = 20) -> List[Dict]:
    """Mean time per ONNX node over ``runs`` profiled runs, largest first, with its share of the node total.

    ``backend`` is an OnnxRuntimeBackend (it fixes provider, threads and optimisation level, so the breakdown
    describes the same execution as the latency figure).
    """
    with tempfile.TemporaryDirectory() as tmp:
        sess = backend.session(onnx_path, enable_profiling=True, profile_prefix=os.path.join(tmp, "ort"))
        feeds = backend.feeds(sess, input_shape)  # the same inputs the latency figure used (image or tokens)
        for _ in range(3):  # warm-up runs are profiled too; they are dropped below by taking the last ``runs``
            sess.run(None, feeds)
        for _ in range(runs):
            sess.run(None, feeds)
        trace_path = sess.end_profiling()
        with open(trace_path) as f:
            events = json.load(f)
    per_node: Dict[str, List[float]] = defaultdict(list)
    op_type: Dict[str, str] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        per_node[name].append(ev["dur"] / 1000.0)  # us -> ms
        op_type[name] = ev.get("args", {}).get("op_name", "")
    rows = []
    for name, durs in per_node.items():
        durs = durs[-runs:]
        rows.append({"node": name, "op_type": op_type[name], "mean_ms": float(np.mean(durs))})
    total = sum(r["mean_ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["mean_ms"] / total
    return sorted(rows, key=lambda r: -r["mean_ms"])
