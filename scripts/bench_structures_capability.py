"""Capability matrix: each structure at several sparsities on resnet18 layers and a large Linear; speedup of the
realized layer vs dense on ONNX Runtime CPU and on torch CPU (where BSR executes). Dense and pruned are timed
interleaved (dense, pruned, dense, ...) so machine load hits both equally. Prints a markdown table; --out writes it.

    python scripts/bench_structures_capability.py                       # full (minutes)
    python scripts/bench_structures_capability.py --quick --out cap.md  # one conv layer, Linear 1024, 75 % (< 2 min)
"""
from __future__ import annotations

import argparse
import io
import math
import statistics
import time
import warnings

import numpy as np
import torch
from torch import nn

from hwprune.structures import get_structure

warnings.simplefilter("ignore")


def ort_session(module: nn.Module, x: torch.Tensor, threads: int):
    import onnxruntime as ort

    f = io.BytesIO()
    torch.onnx.export(module.eval(), (x,), f, input_names=["x"], output_names=["y"], dynamo=False, opset_version=17)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(f.getvalue(), so, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


def time_pair(run_a, run_b, repeats: int, warmup: int = 3):
    """Interleaved medians (ms) of two callables, and the speedup a/b."""
    for _ in range(warmup):
        run_a(), run_b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter(); run_a(); ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); run_b(); tb.append(time.perf_counter() - t0)
    a, b = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
    return a, b, a / b


def torch_runner(module, x):
    module.eval()

    def run():
        with torch.no_grad():
            module(x)
    return run


def md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def variants(module: nn.Module, sparsity: float):
    """(label, realized module, x-adapter) for every structure at ~``sparsity`` of the layer's weights."""
    conv = isinstance(module, nn.Conv2d)
    out = []
    if conv:
        keep = get_structure("filter").mask(get_structure("filter").scores(module.weight), sparsity)
        from hwprune.structures import slice_in, slice_out

        out.append(("filter (physical)", slice_out(module, keep), None))
        kc = get_structure("channel").mask(get_structure("channel").scores(module.weight), sparsity)
        out.append(("channel (physical)", slice_in(module, kc), kc))
        s = min(module.weight.shape[2] * module.weight.shape[3], max(2, round(1 / (1 - sparsity))))
        for mode in ("concat", "sum"):
            new, rep = get_structure("strided").apply(module, 1.0, {"s": s, "mode": mode})
            out.append((f"strided s={s} {mode} ({1 - rep.weights_kept / rep.weights:.0%})", new, None))
        out.append(("kernel", get_structure("kernel").apply(module, sparsity)[0], None))
    out.append(("connection", get_structure("connection").apply(module, sparsity)[0], None))
    for b in ((4, 16) if not conv else (4,)):
        out.append((f"block b={b}", get_structure("block").apply(module, sparsity, {"b": b})[0], None))
    if abs(sparsity - 0.5) < 1e-9:
        out.append(("nm 2:4", get_structure("nm").apply(module, 1.0, {"nm": "2:4"})[0], None))
    out.append(("unify b=4", get_structure("unify").apply(module, sparsity, {"b": 4})[0], None))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="layer1.0.conv1,layer3.0.conv2,layer4.1.conv2")
    ap.add_argument("--linear", type=int, default=4096)
    ap.add_argument("--linear-batch", type=int, default=8)
    ap.add_argument("--sparsities", default="0.5,0.75,0.9")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="layer3.0.conv2, Linear 1024, 75 %%, 10 repeats")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.quick:
        a.layers, a.linear, a.sparsities, a.repeats = "layer3.0.conv2", 1024, "0.75", 10
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from torchvision.models import resnet18

    net = resnet18().eval()
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(i[0].shape)))
             for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    cases = [(n, net.get_submodule(n), torch.randn(*shapes[n])) for n in a.layers.split(",") if n]
    lin = nn.Linear(a.linear, a.linear)
    cases.append((f"Linear {a.linear}x{a.linear} (batch {a.linear_batch})", lin, torch.randn(a.linear_batch, a.linear)))
    rows = []
    for name, mod, x in cases:
        ort_dense = ort_session(mod, x, a.threads)
        tdense = torch_runner(mod, x)
        for sp in (float(s) for s in a.sparsities.split(",")):
            for label, new, in_keep in variants(mod, sp):
                xi = x[:, in_keep] if in_keep is not None else x
                d1, p1, s1 = time_pair(ort_dense, ort_session(new, xi, a.threads), a.repeats)
                d2, p2, s2 = time_pair(tdense, torch_runner(new, xi), a.repeats)
                rows.append([name, f"{sp:.0%}", label, f"{d1:.3f}", f"{p1:.3f}", f"{s1:.2f}x", f"{d2:.3f}", f"{p2:.3f}", f"{s2:.2f}x"])
                print(" | ".join(rows[-1]), flush=True)
    table = md_table(["layer", "sparsity", "structure", "ORT dense ms", "ORT pruned ms", "ORT speedup",
                      "torch dense ms", "torch pruned ms", "torch speedup"], rows)
    note = (f"\n\nthreads={a.threads}, repeats={a.repeats} interleaved, medians. ORT exports sparse formats as dense; "
            f"torch executes block (Linear) as BSR. Structure sparsity = fraction of the layer's weights removed "
            f"(strided: s chosen to approach it, actual in the label).")
    print("\n" + table + note)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + note + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
