"""Fine-grained masks executed densely: ``kernel`` (2-D filter W[o,c,:,:]), ``kernel_row`` (W[o,c,i,:]),
``kernel_column`` (W[o,c,:,j]) and ``connection`` (single weights).

No commodity backend skips these zeros in a dense conv/GEMM (ONNX Runtime converts sparse initializers to dense),
so they are realized as masked dense modules: MACs are counted dense; storage is reported as CSR when smaller.
For Linear layers kernel/kernel_row/kernel_column reduce to single weights (= connection).
"""
from __future__ import annotations

import torch
from torch import nn

from hwprune.structures.base import Structure, weighted_layer


def _flat_index(weight: torch.Tensor, group_shape) -> torch.Tensor:
    """Group id of every element when groups are the cells of ``group_shape`` (a prefix-broadcastable shape)."""
    n = 1
    for d in group_shape:
        n *= d
    ids = torch.arange(n).reshape(group_shape)
    return ids.expand_as(weight) if tuple(group_shape) != tuple(weight.shape) else ids


class ConnectionStructure(Structure):
    name = "connection"
    description = "single weights (unstructured); dense execution, CSR storage"

    def group_index(self, weight, params):
        return torch.arange(weight.numel()).reshape(weight.shape), weight.numel()


class KernelStructure(Structure):
    name = "kernel"
    description = "2-D kernels W[o,c,:,:]; dense execution, CSR storage"

    def group_index(self, weight, params):
        if weight.dim() == 4:
            o, c = weight.shape[:2]
            return _flat_index(weight, (o, c, 1, 1)), o * c
        return torch.arange(weight.numel()).reshape(weight.shape), weight.numel()


class KernelRowStructure(Structure):
    name = "kernel_row"
    description = "kernel rows W[o,c,i,:]; dense execution, CSR storage"

    def group_index(self, weight, params):
        if weight.dim() == 4:
            o, c, kh, _ = weight.shape
            return _flat_index(weight, (o, c, kh, 1)), o * c * kh
        return torch.arange(weight.numel()).reshape(weight.shape), weight.numel()


class KernelColumnStructure(Structure):
    name = "kernel_column"
    description = "kernel columns W[o,c,:,j]; dense execution, CSR storage"

    def group_index(self, weight, params):
        if weight.dim() == 4:
            o, c, _, kw = weight.shape
            return _flat_index(weight, (o, c, 1, kw)), o * c * kw
        return torch.arange(weight.numel()).reshape(weight.shape), weight.numel()
