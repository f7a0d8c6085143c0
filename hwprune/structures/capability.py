"""Which structures speed up which device profile: declared (``profile.accelerates``) or measured.

Measurement builds a representative layer per structure (conv 64->64 3x3 at 28x28 for conv structures, a
conv-ReLU-conv pair for filter/channel, a torchvision BasicBlock for depth, Linear 1024x1024 on 8 rows for block),
realizes the structure at ``ratio``, exports dense and realized models to ONNX and measures both with the profile's
backend, interleaved (``measure_candidate_pair``: PyTorch backends run the modules, so BSR executes there). A structure "accelerates"
a profile when the realized median is at least ``min_speedup`` times faster and the 95% CIs do not overlap.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from hwprune.structures.registry import get_structure, structure_names


def declared_capability(profile) -> Dict[str, bool]:
    acc = set(getattr(profile, "accelerates", ()) or ())
    return {s: s in acc for s in structure_names()}


def representative(structure: str, ratio: float = 0.75, seed: int = 0) -> Tuple[nn.Module, nn.Module, Tuple[int, ...]]:
    """(dense module, realized module, input shape) of the representative layer for ``structure``."""
    g = torch.Generator().manual_seed(seed)

    def init(m):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return m.eval()

    st = get_structure(structure)
    if structure in ("filter", "channel"):
        from hwprune.structures.filter_channel import prune_conv_pair

        dense = init(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)))
        a, _, b, _ = prune_conv_pair(dense[0], dense[2], ratio)
        return dense, nn.Sequential(a, nn.ReLU(), b).eval(), (1, 64, 28, 28)
    if structure == "depth":
        from torchvision.models.resnet import BasicBlock

        dense = init(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), BasicBlock(64, 64)))
        new = copy.deepcopy(dense)
        new[1], _ = st.apply(dense[1], 1.0)
        return dense, new.eval(), (1, 64, 28, 28)
    if structure == "block":
        dense = init(nn.Linear(1024, 1024))
        new, _ = st.apply(dense, ratio, {"b": 16})
        return dense, new.eval(), (8, 1024)
    dense = init(nn.Conv2d(64, 64, 3, padding=1))
    r = 1.0 if structure in ("nm", "strided") else ratio
    new, _ = st.apply(dense, r, {})
    return dense, new.eval(), (1, 64, 28, 28)


def export_onnx(module: nn.Module, input_shape: Sequence[int], path: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*input_shape),), path, input_names=["x"], output_names=["y"],
                          dynamo=False, opset_version=17)
    return path


def measure_capability(profile, structures: Optional[Sequence[str]] = None, ratio: float = 0.75,
                       min_speedup: float = 1.1) -> Dict[str, Dict[str, object]]:
    """{structure: {"speedup": dense/realized median, "accelerates": bool, "dense_ms", "pruned_ms"}} measured on
    ``profile``'s backend."""
    from hwprune.latency.base import make_backend, measure_candidate_pair

    backend = make_backend(profile)
    out: Dict[str, Dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in structures or structure_names():
            dense, new, shape = representative(s, ratio)
            shape = (profile.batch_size * shape[0],) + tuple(shape[1:]) if len(shape) == 4 else shape
            pd, pn = os.path.join(tmp, f"{s}_dense.onnx"), os.path.join(tmp, f"{s}_pruned.onnx")
            export_onnx(dense, shape, pd)
            export_onnx(new, shape, pn)
            with torch.no_grad():  # interleaved in one window: drift of a busy machine hits both alike
                lp, ld = measure_candidate_pair(backend, pn, new, pd, dense, shape)
            sp = ld.median_ms / lp.median_ms if lp.median_ms > 0 else float("nan")
            out[s] = {"speedup": sp, "dense_ms": ld.median_ms, "pruned_ms": lp.median_ms,
                      "accelerates": bool(sp >= min_speedup and lp.ci_high_ms < ld.ci_low_ms)}
    return out


def capability(profile, measure: bool = False, **kw) -> Dict[str, Dict[str, object]]:
    """Per structure: {"accelerates": bool, "source": "declared" | "measured", "speedup": float | None}."""
    dec = declared_capability(profile)
    if not measure:
        return {s: {"accelerates": v, "source": "declared", "speedup": None} for s, v in dec.items()}
    meas = measure_capability(profile, **kw)
    return {s: {"accelerates": m["accelerates"], "source": "measured", "speedup": m["speedup"],
                "declared": dec.get(s, False)} for s, m in meas.items()}


def structures_table(profiles: Sequence, measure: bool = False, **kw) -> str:
    """Markdown table: every structure, whether it is physical, its searchable params, and per profile whether it
    speeds that target up (declared, or measured speedup with ``measure=True``)."""
    caps = [capability(p, measure, **kw) for p in profiles]
    head = ["structure", "physical", "params", "what it is"] + [p.name for p in profiles]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in structure_names():
        st = get_structure(s)
        params = ", ".join(f"{k}∈{{{','.join(str(v) for v in vs)}}}" for k, vs in st.param_choices.items()) or "-"
        cells = []
        for c in caps:
            e = c.get(s)
            if e is None:
                cells.append("-")
            elif e["source"] == "measured":
                cells.append(f"{'yes' if e['accelerates'] else 'no'} ({e['speedup']:.2f}x)")
            else:
                cells.append("yes" if e["accelerates"] else "no")
        lines.append("| " + " | ".join([s, "yes" if st.physical else "no", params, st.description] + cells) + " |")
    return "\n".join(lines)
