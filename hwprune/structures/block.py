"""``block``: b x b tiles of the GEMM-view weight (Linear [O, I]; conv [O, C*kh*kw]); Huang et al.

Edge tiles are partial (grid ceil(O/b) x ceil(K/b)). Storage is BSR. Linear layers are realized as
``SparseLinear`` which runs ``torch`` BSR matmul (MKL on CPU, Triton on GPU) and exports to ONNX as a dense
MatMul (no ONNX Runtime kernel consumes BSR); convs are realized masked-dense.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.structures.base import (
    LayerReport, Structure, bytes_bsr, bytes_dense, dense_macs, gemm_shape, masked_copy, module_bias_numel, positions,
)
from hwprune.structures.sparse_exec import DerivedSparseWeight


def block_index(weight: torch.Tensor, br: int, bc: int):
    """Element -> tile id in the GEMM view, tile grid ceil(R/br) x ceil(K/bc), row-major."""
    r, k = gemm_shape(weight)
    nbc = math.ceil(k / bc)
    rows = torch.arange(r).unsqueeze(1) // br
    cols = torch.arange(k).unsqueeze(0) // bc
    idx = (rows * nbc + cols).reshape(weight.shape)
    return idx, math.ceil(r / br) * nbc


class SparseLinear(DerivedSparseWeight):
    """A Linear whose zeros are skipped by a torch sparse format (``bsr`` with a block size, or ``csr``).

    ``weight`` keeps the masked dense values (what training, ONNX export and state_dict use); inference without
    gradients runs the sparse copy, which is rebuilt whenever the weight changed since it was made (training steps,
    ``load_state_dict``) and after deepcopy, pickle and ``.to()`` (see ``DerivedSparseWeight``). Shapes not
    divisible by the block size are zero-padded.
    """

    def __init__(self, linear: nn.Linear, fmt: str = "bsr", blocksize: int = 4):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.fmt, self.blocksize = fmt, int(blocksize)
        self.refresh()

    def refresh(self) -> None:
        w = self.weight.detach()
        b = self.blocksize
        self._pad_in = (-self.in_features) % b if self.fmt == "bsr" else 0
        pad_out = (-self.out_features) % b if self.fmt == "bsr" else 0
        wp = F.pad(w, (0, self._pad_in, 0, pad_out))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "BSR support is in beta state"
            self._sparse = wp.to_sparse_bsr((b, b)) if self.fmt == "bsr" else wp.to_sparse_csr()
        self._synced = self._weight_version()

    def _weight_version(self):
        """The weight's in-place version counter; None for inference tensors (made under torch.inference_mode,
        e.g. by a latency backend), which carry none and are not trained."""
        try:
            return self.weight._version
        except RuntimeError:
            return None

    def _stale(self) -> bool:
        version = self._weight_version()
        return version is not None and version != self._synced

    @property
    def stored_blocks(self) -> int:
        if self._stale():
            self.refresh()
        return int(self._sparse.values().shape[0]) if self.fmt == "bsr" else int(self._sparse.values().numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or (
                torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        if self._stale():
            self.refresh()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._pad_in:
            x2 = F.pad(x2, (0, self._pad_in))
        y = (self._sparse @ x2.t()).t()[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, blocksize={self.blocksize}"


class BlockStructure(Structure):
    name = "block"
    description = "b x b tiles of the GEMM weight; BSR storage; Linear executed as torch BSR"
    param_choices = {"b": (2, 4, 8, 16, 32)}
    default_params = {"b": 4, "execute": "bsr"}  # execute: bsr | dense (Linear only; convs are always dense)

    def check_params(self, params):
        p = super().check_params(params)
        from hwprune.errors import ConfigError

        if not isinstance(p["b"], int) or p["b"] < 1:
            raise ConfigError(f"block size b={p['b']!r} is not a positive integer; use e.g. 4")
        if p["execute"] not in ("bsr", "dense"):
            raise ConfigError(f"block execute={p['execute']!r} is not one of bsr, dense")
        return p

    def group_index(self, weight, params):
        return block_index(weight, params["b"], params["b"])

    def realize(self, module, emask, params, keep):
        masked = masked_copy(module, emask)
        if isinstance(module, nn.Linear) and params["execute"] == "bsr":
            return SparseLinear(masked, "bsr", params["b"])
        return masked

    def report(self, module, new, emask, keep, ratio, params, in_shape):
        b = params["b"]
        rows, k = gemm_shape(module.weight)
        kept_blocks = int(keep.sum())
        dm = dense_macs(module, in_shape)
        pos = positions(module, in_shape)
        eff = dm
        executed = "dense-masked"
        if isinstance(new, SparseLinear) and pos is not None:
            eff = new.stored_blocks * b * b * pos
            executed = "bsr"
        elif isinstance(new, SparseLinear):
            executed = "bsr"
        nb = module_bias_numel(module)
        return LayerReport(
            structure=self.name, ratio=float(ratio), params=dict(params), groups=int(keep.numel()),
            groups_removed=int((~keep).sum()), weights=int(module.weight.numel()), weights_kept=int(emask.sum()),
            executed=executed, format="bsr", macs_dense=dm, macs_effective=eff, macs_onnx=dm,
            bytes_dense=bytes_dense(module.weight.numel() + nb),
            bytes_deployed=bytes_bsr(kept_blocks, b, b, math.ceil(rows / b)) + bytes_dense(nb),
            extra={"blocks_kept": kept_blocks},
        )
