"""``filter`` (output channel) and ``channel`` (input channel): physical structures.

Scores and masks are computed here. In a model, coupled layers (residual adds, BN, depthwise convs, concat) must
shrink together, so model-level realization goes through ``hwprune.graph.prune_groups`` (torch-pruning's
dependency graph; see ``realize_physical``). For one layer pair without coupling, ``slice_out`` / ``slice_in`` /
``slice_bn`` / ``prune_conv_pair`` cut the tensors directly. ``Structure.apply`` on a lone module returns the
masked module (the physically smaller one would change its output shape).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from hwprune.errors import ConfigError
from hwprune.structures.base import (
    LayerReport, Structure, bytes_dense, dense_macs, keep_mask, module_bias_numel, weighted_layer,
)


class FilterStructure(Structure):
    name = "filter"
    physical = True
    description = "output channels W[o,:,:,:] / Linear rows; physically removed (next layer's inputs too)"

    def group_index(self, weight, params):
        o = weight.shape[0]
        idx = torch.arange(o).reshape((o,) + (1,) * (weight.dim() - 1)).expand_as(weight)
        return idx, o

    def scores(self, weight, criterion="l1", params=None, grad=None, module=None, bn=None):
        if criterion == "bn":
            from hwprune.importance import bn_scores

            if bn is None:
                raise ConfigError("criterion 'bn' for a filter needs the BatchNorm that follows the layer; use l1 or l2")
            return bn_scores(bn)
        return super().scores(weight, criterion, params, grad=grad)


class ChannelStructure(Structure):
    name = "channel"
    physical = True
    description = "input channels W[:,c,:,:] / Linear columns; physically removed (producer's outputs too)"

    def applies_to(self, module):
        return weighted_layer(module) and getattr(module, "groups", 1) == 1

    def group_index(self, weight, params):
        c = weight.shape[1]
        shape = [1] * weight.dim()
        shape[1] = c
        return torch.arange(c).reshape(shape).expand_as(weight), c


# ----------------------------------------------------------------------------------------------- direct slicing
def _idx(keep: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(keep.reshape(-1), as_tuple=False).reshape(-1)


def slice_out(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a Conv2d/Linear with only the kept output channels (bias too). groups must be 1."""
    idx = _idx(keep)
    new = copy.deepcopy(module)
    with torch.no_grad():
        new.weight = nn.Parameter(module.weight.detach()[idx].clone())
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach()[idx].clone())
    if isinstance(new, nn.Conv2d):
        if module.groups != 1:
            raise ConfigError("slice_out of a grouped conv needs the dependency graph; use hwprune.graph.prune_groups")
        new.out_channels = len(idx)
    else:
        new.out_features = len(idx)
    return new


def slice_in(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a Conv2d/Linear reading only the kept input channels. groups must be 1."""
    idx = _idx(keep)
    new = copy.deepcopy(module)
    with torch.no_grad():
        new.weight = nn.Parameter(module.weight.detach()[:, idx].clone())
    if isinstance(new, nn.Conv2d):
        if module.groups != 1:
            raise ConfigError("slice_in of a grouped conv needs the dependency graph; use hwprune.graph.prune_groups")
        new.in_channels = len(idx)
    else:
        new.in_features = len(idx)
    return new


def slice_bn(bn: nn.Module, keep: torch.Tensor) -> nn.Module:
    idx = _idx(keep)
    new = copy.deepcopy(bn)
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(bn, name)
            if p is not None:
                setattr(new, name, nn.Parameter(p.detach()[idx].clone()))
        for name in ("running_mean", "running_var"):
            b = getattr(bn, name)
            if b is not None:
                setattr(new, name, b[idx].clone())
    new.num_features = len(idx)
    return new


def prune_conv_pair(
    producer: nn.Module, consumer: nn.Module, ratio: float, criterion: str = "l1", bn: Optional[nn.Module] = None,
) -> Tuple[nn.Module, Optional[nn.Module], nn.Module, torch.Tensor]:
    """Filter pruning of ``producer`` (and the matching input channels of ``consumer``) with no other coupling.

    Returns (new_producer, new_bn or None, new_consumer, keep) — physically smaller, outputs equal to the masked pair.
    """
    st = FilterStructure()
    keep = st.mask(st.scores(producer.weight, criterion, {}, bn=bn), ratio)
    return slice_out(producer, keep), (slice_bn(bn, keep) if bn is not None else None), slice_in(consumer, keep), keep


# ----------------------------------------------------------------------------------------------- via the graph
def physical_ratios(specs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """{"filter": {layer: ratio}, "channel": {layer: ratio}} from plan specs (what goes to graph.prune_groups)."""
    out: Dict[str, Dict[str, float]] = {"filter": {}, "channel": {}}
    for layer, spec in specs.items():
        if spec.get("structure") in out and float(spec.get("ratio", 0.0)) > 0:
            out[spec["structure"]][layer] = float(spec["ratio"])
    return out


def realize_physical(
    model: nn.Module,
    example_input: torch.Tensor,
    specs: Dict[str, Dict[str, Any]],
    criterion: str = "l1",
    round_to: Optional[int] = None,
    ignored: Sequence[str] = (),
):
    """Physically prune every ``filter`` spec through the dependency graph (``hwprune.graph.prune_groups``; the
    spec's layer name is the group's root module). ``channel`` specs are refused: the graph removes a layer's input
    channels by pruning the group that produces them, so give that producer a ``filter`` spec.
    Returns (pruned_model, history) from ``prune_groups``."""
    try:
        from hwprune.graph import prune_groups
    except ImportError as e:  # pragma: no cover
        raise ConfigError("physical filter pruning needs hwprune.graph (torch-pruning): pip install torch-pruning") from e
    r = physical_ratios(specs)
    if r["channel"]:
        raise ConfigError(
            f"channel specs on {sorted(r['channel'])[:3]} cannot be realized alone in a model: input channels are "
            f"removed by pruning the layer that produces them; give that layer a 'filter' spec instead"
        )
    return prune_groups(model, example_input, r["filter"], criterion, round_to, list(ignored))


def physical_report(name: str, structure: str, ratio: float, before: nn.Module, after: nn.Module,
                    in_shape_before=None, in_shape_after=None) -> LayerReport:
    """Report for a layer that was physically shrunk (by the graph or by slicing)."""
    mb, ma = dense_macs(before, in_shape_before), dense_macs(after, in_shape_after)
    ba = bytes_dense(after.weight.numel() + module_bias_numel(after))
    return LayerReport(
        structure=structure, ratio=float(ratio), params={}, layer=name,
        groups=int(before.weight.shape[0 if structure == "filter" else 1]),
        groups_removed=int(before.weight.shape[0 if structure == "filter" else 1]
                           - after.weight.shape[0 if structure == "filter" else 1]),
        weights=int(before.weight.numel()), weights_kept=int(after.weight.numel()), executed="physical",
        format="dense", macs_dense=mb, macs_effective=ma, macs_onnx=ma,
        bytes_dense=bytes_dense(before.weight.numel() + module_bias_numel(before)), bytes_deployed=ba,
    )
