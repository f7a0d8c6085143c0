"""Costs of the delivered weights: every masked layer's report recounted from its final tensors.

A plan says what should be zero; what is deployed is what the weights hold after recovery. So the zeros, zero
tiles, N:M windows and unified tiles are counted in the final weights, and each layer's storage is the real size
of its format: CSR (values + column indices + row pointers), BSR (dense b x b blocks + block indices), N:M (N
value slots per M-window + position metadata; a layer whose windows do not all meet N:M is stored as CSR or dense),
unified tiles (one value + sign bits). Effective MACs change only where the executed form skips zeros (BSR,
semi-structured 2:4); dense-masked execution runs every MAC whatever the weights hold.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.structures.base import FP32_BYTES, INDEX_BYTES, bytes_bsr, bytes_csr, bytes_dense, gemm_shape
from hwprune.structures.block import block_index

MASKED_FORMS = ("dense-masked", "bsr", "semi-structured")
PHYSICAL_FORMS = ("physical", "gather", "identity")  # realized in the module itself: its cost count already shows it


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    return w if type(w) in (torch.Tensor, nn.Parameter) and w.layout == torch.strided else w.to_dense()


def sparse_or_dense(nnz: int, rows: int, numel: int, n_bias: int):
    """(format, bytes): CSR when smaller than dense fp32."""
    csr, dense = bytes_csr(nnz, rows) + bytes_dense(n_bias), bytes_dense(numel + n_bias)
    return ("csr", csr) if csr < dense else ("dense", dense)


def nm_bytes(gemm: torch.Tensor, n: int, m: int):
    """Real N:M storage of a [rows, K] weight, or None when some M-window holds more than N non-zeros."""
    r, k = gemm.shape
    nz = F.pad((gemm != 0).to(torch.int64), (0, (-k) % m)).reshape(r, -1, m).sum(-1)
    if bool((nz > n).any()):
        return None
    lens = [min(m, k - i * m) for i in range(nz.shape[1])]
    slots = r * sum(min(n, L) for L in lens)
    bits = max(1, math.ceil(math.log2(m)))
    return slots * FP32_BYTES + math.ceil(slots * bits / 8)


def unified_bytes(cnt: torch.Tensor, unified: torch.Tensor, free: torch.Tensor, block_rows: int) -> int:
    """One fp32 value + a sign bit per weight for unified tiles, fp32 values for free tiles, an int32 column index
    and a kind bit per stored tile, block-row pointers; pruned tiles cost nothing more."""
    stored = int(unified.sum() + free.sum())
    return (int(unified.sum()) * FP32_BYTES + sum(math.ceil(int(c) / 8) for c in cnt[unified])
            + int(cnt[free].sum()) * FP32_BYTES + stored * INDEX_BYTES + math.ceil(stored / 8)
            + (block_rows + 1) * INDEX_BYTES)


def _tiles(w: torch.Tensor, b: int):
    idx, n = block_index(w, b, b)
    i = idx.reshape(-1)
    a = w.detach().reshape(-1).abs().to(torch.float64)
    cnt = torch.bincount(i, minlength=n)
    nnz = torch.zeros(n, dtype=torch.int64).index_add_(0, i, (a != 0).to(torch.int64))
    amax = torch.zeros(n, dtype=torch.float64).scatter_reduce_(0, i, a, "amax", include_self=False)
    amin = torch.full((n,), float("inf"), dtype=torch.float64).scatter_reduce_(0, i, a, "amin", include_self=False)
    return cnt, nnz, amax, amin


def delivered_report(report: Dict[str, Any], module: nn.Module) -> Dict[str, Any]:
    """``report`` (a LayerReport dict) recounted from ``module``'s final weights."""
    r = dict(report)
    if r.get("executed") not in MASKED_FORMS and not (r.get("executed") == "gather" and r["structure"] == "mixed"):
        return r  # physical forms: nothing is masked, the report already counts the shapes delivered
    w = _weight(module).detach().cpu()
    bias = getattr(module, "bias", None)
    nb = 0 if bias is None else int(bias.numel())
    gemm = w.reshape(w.shape[0], -1)
    rows, _ = gemm_shape(w)
    nnz = int((w != 0).sum())
    dm = r.get("macs_dense")
    pos = None if dm is None else dm // max(1, int(r["weights"]))
    r["weights_kept"] = nnz
    r["extra"] = {**r.get("extra", {}), "counted_from": "delivered weights"}
    fmt = r["format"]
    if fmt == "bsr":
        b = int(r["params"]["b"])
        cnt, tnz, _, _ = _tiles(w, b)
        kept = int((tnz > 0).sum())
        r["bytes_deployed"] = bytes_bsr(kept, b, b, math.ceil(rows / b)) + bytes_dense(nb)
        r["extra"]["blocks_kept"] = kept
        if r["executed"] == "bsr" and pos is not None:
            r["macs_effective"] = kept * b * b * pos
    elif fmt == "nm":
        from hwprune.structures.nm import parse_nm

        n, m = parse_nm(r["params"]["nm"])
        size = nm_bytes(gemm, n, m)
        if size is None:  # not N:M any more (or never fully): what it would really be stored as
            r["format"], r["bytes_deployed"] = sparse_or_dense(nnz, rows, w.numel(), nb)
            r["extra"]["nm_compliant"] = False
        else:
            r["bytes_deployed"] = size + bytes_dense(nb)
            r["extra"]["nm_compliant"] = True
        if r["executed"] == "semi-structured" and dm is not None:
            r["macs_effective"] = dm * n // m
    elif fmt == "unified":
        b = int(r["params"]["b"])
        cnt, tnz, amax, amin = _tiles(w, b)
        pruned = tnz == 0
        unified = ~pruned & (tnz == cnt) & (cnt > 1) & ((amax - amin) <= 1e-6 * amax)
        free = ~pruned & ~unified
        r["bytes_deployed"] = unified_bytes(cnt, unified, free, math.ceil(rows / b)) + bytes_dense(nb)
        r["extra"].update({"tiles_unified": int(unified.sum()), "tiles_pruned": int(pruned.sum()),
                           "tiles_free": int(free.sum())})
    else:  # csr / dense, also a gathered conv's kept rows
        r["format"], r["bytes_deployed"] = sparse_or_dense(nnz, rows, w.numel(), nb)
    return r


def delivered_reports(model: nn.Module, reports: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    modules = dict(model.named_modules())
    return [delivered_report(r, modules[r["layer"]]) if r.get("layer") in modules else dict(r) for r in reports]
