"""``nm``: N:M sparsity (2:4 default) along the GEMM reduction dimension (Linear inputs; conv C*kh*kw).

Groups are the M-windows of each GEMM row; the ratio is the fraction of windows made N:M sparse (ranked by the
saliency the window would lose), so the contract holds and ratio 1.0 is the full N:M pattern hardware needs
(``suggest_layer`` always uses 1.0). A trailing partial window of length L keeps min(L, N) weights.
Realization: masked dense, except ``execute="semi_structured"`` on a CUDA GPU with compute capability >= 8.0 for a
Linear at ratio 1.0 with 2:4 and fp16/bf16, which uses ``torch.sparse.to_sparse_semi_structured`` (sparse tensor cores).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.errors import ConfigError
from hwprune.structures.base import LayerReport, Structure, bytes_dense, bytes_nm, dense_macs, gemm_shape, masked_copy, module_bias_numel
from hwprune.structures.sparse_exec import DerivedSparseWeight


def parse_nm(value) -> tuple:
    try:
        n, m = (int(v) for v in str(value).split(":"))
    except ValueError:
        raise ConfigError(f"N:M pattern {value!r} is not of the form 'N:M'; use e.g. '2:4'") from None
    if not 0 < n < m:
        raise ConfigError(f"N:M pattern {value!r} needs 0 < N < M; use e.g. '2:4'")
    return n, m


def semi_structured_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


class SemiStructuredLinear(DerivedSparseWeight):
    """A 2:4-sparse Linear on sparse tensor cores (CUDA, compute capability >= 8.0, fp16/bf16).

    ``weight`` keeps the masked dense values; the semi-structured copy is rebuilt after deepcopy, pickle and
    ``.to()`` (``DerivedSparseWeight``). Off the GPU (e.g. moved to the CPU for ONNX export) it runs dense."""

    def __init__(self, linear: nn.Linear, dtype=torch.float16):
        super().__init__()
        if not semi_structured_available():
            raise ConfigError("nm execute='semi_structured' needs a CUDA GPU with compute capability >= 8.0; use execute='dense'")
        self.weight = nn.Parameter(linear.weight.detach().to("cuda", dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to("cuda", dtype), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.refresh()

    def refresh(self) -> None:
        w = self.weight.detach()
        if not w.is_cuda:
            self._sparse = None
            return
        from torch.sparse import to_sparse_semi_structured

        try:
            self._sparse = to_sparse_semi_structured(w)
        except (RuntimeError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"2:4 semi-structured sparsity cannot hold a {w.dtype} weight of shape {tuple(w.shape)} ({first}); "
                f"time it on a float16 or bfloat16 profile (e.g. gpu-torch-cuda-fp16)"
            ) from e

    def forward(self, x):
        if self._sparse is None or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self._sparse, self.bias)


class NMStructure(Structure):
    name = "nm"
    description = "N:M along the GEMM reduction dim (2:4 default); sparse tensor cores on CUDA sm>=80"
    param_choices = {"nm": ("2:4", "1:4", "1:2")}
    default_params = {"nm": "2:4", "execute": "dense"}
    fixed_ratio = 1.0

    def check_params(self, params):
        p = super().check_params(params)
        parse_nm(p["nm"])
        if p["execute"] not in ("dense", "semi_structured"):
            raise ConfigError(f"nm execute={p['execute']!r} is not one of dense, semi_structured")
        return p

    def group_index(self, weight, params):
        _, m = parse_nm(params["nm"])
        r, k = gemm_shape(weight)
        nw = math.ceil(k / m)
        idx = (torch.arange(r).unsqueeze(1) * nw + torch.arange(k).unsqueeze(0) // m).reshape(weight.shape)
        return idx, r * nw

    def _window_view(self, sal2d: torch.Tensor, m: int):
        r, k = sal2d.shape
        pad = (-k) % m
        v = F.pad(sal2d, (0, pad), value=float("inf")).reshape(r, -1, m)  # pad = never among the smallest
        return v, pad

    def scores(self, weight, criterion="l1", params=None, grad=None, module=None, bn=None):
        from hwprune.importance import saliency

        p = self.check_params(params)
        n, m = parse_nm(p["nm"])
        r, k = gemm_shape(weight)
        sal = saliency(weight, criterion if criterion != "block_mean" else "l1", grad).reshape(r, k)
        if criterion == "taylor":
            sal = sal.abs()
        v, _ = self._window_view(sal, m)
        srt = v.sort(dim=-1).values
        lens = torch.full((v.shape[1],), m)
        lens[-1] = k - (v.shape[1] - 1) * m
        drop = (lens - n).clamp_min(0)  # how many each window loses
        cost = torch.zeros(r, v.shape[1], dtype=torch.float64)
        for d in range(1, m):
            sel = drop >= d
            cost[:, sel] += srt[:, sel, d - 1]
        return cost.reshape(-1)

    def element_mask(self, weight, keep, params):
        n, m = parse_nm(params["nm"])
        r, k = gemm_shape(weight)
        sal = weight.detach().abs().to(torch.float64).reshape(r, k)
        v, pad = self._window_view(sal, m)
        order = torch.argsort(v, dim=-1, stable=True)  # ascending |w|, ties by position
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(m).expand_as(order).contiguous())
        lens = torch.full((v.shape[1],), m)
        lens[-1] = k - (v.shape[1] - 1) * m
        drop = (lens - n).clamp_min(0)
        zero = rank < drop.view(1, -1, 1)
        zero &= ~keep.reshape(r, -1, 1)
        emask = (~zero).reshape(r, -1)[:, :k]
        return emask.reshape(weight.shape)

    def realize(self, module, emask, params, keep):
        masked = masked_copy(module, emask)
        if params["execute"] == "semi_structured":
            if not isinstance(module, nn.Linear) or parse_nm(params["nm"]) != (2, 4) or not bool((~keep).all()):
                raise ConfigError("nm execute='semi_structured' needs a Linear, nm='2:4' and ratio 1.0; use execute='dense'")
            return SemiStructuredLinear(masked)
        return masked

    def report(self, module, new, emask, keep, ratio, params, in_shape):
        _, m = parse_nm(params["nm"])
        nnz = int(emask.sum())
        nb = module_bias_numel(module)
        dm = dense_macs(module, in_shape)
        semi = isinstance(new, SemiStructuredLinear)
        return LayerReport(
            structure=self.name, ratio=float(ratio), params=dict(params), groups=int(keep.numel()),
            groups_removed=int((~keep).sum()), weights=int(module.weight.numel()), weights_kept=nnz,
            executed="semi-structured" if semi else "dense-masked", format="nm",
            macs_dense=dm, macs_effective=(dm * nnz // max(1, module.weight.numel())) if (semi and dm) else dm,
            macs_onnx=dm, bytes_dense=bytes_dense(module.weight.numel() + nb),
            bytes_deployed=bytes_nm(nnz, m) + bytes_dense(nb),
        )
