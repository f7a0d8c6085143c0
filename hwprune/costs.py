"""Compute and size of a (pruned) model: MACs with fvcore, parameters, and bytes in the deployed format.

fvcore counts one fused multiply-add as one "flop", i.e. MACs. It counts dense work: zeros in masked weights
are not discounted here (structure-aware effective MACs come from the structure catalog).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Dict

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Costs:
    macs: int
    params: int
    bytes: int  # dense fp32 parameters + buffers, as deployed in ONNX

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)


class _KeywordCall(nn.Module):
    """Calls a keyword-convention model positionally: fvcore and the TorchScript ONNX exporter trace
    ``model(*inputs)`` only."""

    def __init__(self, model: nn.Module, names):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors)))


def positional(model: nn.Module, example_input):
    """(model, inputs) callable as ``model(*inputs)`` / ``model(inputs)``: a dict of named inputs is passed
    through a keyword adapter, in its order."""
    if isinstance(example_input, dict):
        return _KeywordCall(model, example_input), tuple(example_input.values())
    return model, example_input


def count_macs(model: nn.Module, example_input) -> int:
    """MACs of one forward pass on ``example_input``: a tensor, a tuple of inputs, or a dict of named inputs."""
    model, example_input = positional(model, example_input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        from hwprune.transformer_groups import no_mha_fastpath

        fca = FlopCountAnalysis(model.eval(), example_input)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with torch.no_grad(), no_mha_fastpath():  # the fused attention op would count as zero MACs
            return int(fca.total())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_costs(model: nn.Module, example_input) -> Costs:
    """Costs at batch size 1 (``example_input`` should have batch 1)."""
    return Costs(count_macs(model, example_input), count_params(model), count_bytes(model))
