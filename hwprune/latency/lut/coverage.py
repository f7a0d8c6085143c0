"""Which channel counts a search space gives each layer: which dependency group sets each layer's input and output
channels, how many channels a group loses at each ratio (read from real pruning, checked against the rounding
rule), and from these every op key the space can produce."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

from hwprune.errors import ModelError
from hwprune.latency.lut.trace import LayerCall
from hwprune.rounding import removed_channels

MAX_COMBINATIONS = 4096  # (in, out) combinations one layer may need before the table refuses to enumerate them


def channels_by_layer(model) -> Dict[str, Tuple[int, int]]:
    """(in, out) channels of every conv / linear layer, by module name."""
    import torch.nn as nn

    from hwprune.graph import ROOT_TYPES

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[n] = (m.in_features, m.out_features)
        elif isinstance(m, ROOT_TYPES):
            out[n] = (m.in_channels, m.out_channels)
    return out


def prune(workload, ratios: Mapping[str, float]):
    """The workload's model pruned by {group: ratio} with the real engine."""
    from hwprune import graph

    # channel counts do not depend on the importance criterion; l1 needs no data
    model, _ = graph.prune_groups(workload.model, workload.example_input, dict(ratios), "l1",
                                  workload.round_to, list(workload.ignored))
    return model


@dataclass
class Dependencies:
    ins: Dict[str, List[Tuple[str, int]]]  # layer -> [(group, channels lost per channel of the group)]
    outs: Dict[str, List[Tuple[str, int]]]
    removed: Dict[str, Dict[str, int]]  # group -> {ratio as str: channels removed}
    rounding_verified: bool  # torch-pruning removed what hwprune.rounding predicts at every ratio


def find_dependencies(workload, ratios: Sequence[float], log: Callable[[str], None]) -> Dependencies:
    """Prune each group alone and watch which layers change (and by how many channels per channel of the group:
    a linear layer after a flatten loses H*W features per channel); then prune uniformly at every ratio to read
    how many channels each group loses, and check every layer's channels against the dependencies found."""
    dense = channels_by_layer(workload.model)
    rmax = max(r for r in ratios)
    ins: Dict[str, List[Tuple[str, int]]] = {}
    outs: Dict[str, List[Tuple[str, int]]] = {}
    probe_ratio = rmax if rmax > 0 else 0.5
    for g in workload.groups:
        pruned = channels_by_layer(prune(workload, {g.name: probe_ratio}))
        lost = dense[g.name][1] - pruned[g.name][1]
        if lost <= 0:
            continue  # this group never shrinks at these ratios: its layers keep constant channels
        for layer, (ci, co) in dense.items():
            pi, po = pruned[layer]
            for delta, table in ((ci - pi, ins), (co - po, outs)):
                if delta:
                    if delta % lost:
                        raise ModelError(
                            f"layer {layer!r} loses {delta} channels when group {g.name!r} loses {lost}; the latency "
                            f"table cannot model that layer"
                        )
                    table.setdefault(layer, []).append((g.name, delta // lost))
    removed: Dict[str, Dict[str, int]] = {g.name: {} for g in workload.groups}
    verified = True
    for r in sorted(set(float(r) for r in ratios)):
        pruned = channels_by_layer(prune(workload, {g.name: r for g in workload.groups})) if r > 0 else dense
        for g in workload.groups:
            n = dense[g.name][1] - pruned[g.name][1]
            removed[g.name][repr(r)] = n
            if n != removed_channels(g.channels, r, workload.round_to):
                verified = False
        # every layer's channels in the uniform plan must follow from the dependencies found above
        lost = {g: n[repr(r)] for g, n in removed.items()}
        for layer, channels in dense.items():
            ei, eo = channels_after(layer, channels, ins, outs, lost)
            if (ei, eo) != pruned[layer]:
                raise ModelError(
                    f"layer {layer!r} has {pruned[layer]} (in, out) channels at uniform ratio {r:g} but the group "
                    f"dependencies predict {(ei, eo)}; the latency table cannot model this model"
                )
    if not verified:
        log("latency table: torch-pruning's channel counts differ from the rounding rule; only the table's ratios "
            "can be predicted without pruning")
    return Dependencies(ins, outs, removed, verified)


def channels_after(layer: str, channels: Tuple[int, int], ins: Mapping[str, List[Tuple[str, int]]],
                   outs: Mapping[str, List[Tuple[str, int]]], lost: Mapping[str, int]) -> Tuple[int, int]:
    """A layer's (in, out) channels, dense ``channels``, once each group has lost ``lost[group]`` channels."""
    return (channels[0] - sum(f * lost[g] for g, f in ins.get(layer, [])),
            channels[1] - sum(f * lost[g] for g, f in outs.get(layer, [])))


def layer_configs(deps: Dependencies, calls: Sequence[LayerCall],
                  max_combinations: int = MAX_COMBINATIONS) -> Dict[str, LayerCall]:
    """Every op key the space can produce -> a layer call that has it (the template to build and measure)."""
    out: Dict[str, LayerCall] = {}
    for c in calls:
        spec_in, spec_out = deps.ins.get(c.name, []), deps.outs.get(c.name, [])
        groups = sorted({g for g, _ in spec_in} | {g for g, _ in spec_out})
        choices = [sorted(set(deps.removed[g].values())) for g in groups]
        n = math.prod(len(ch) for ch in choices) if choices else 1
        if n > max_combinations:
            raise ModelError(f"layer {c.name!r} depends on {len(groups)} groups ({n} channel combinations); the "
                             f"latency table caps one layer at {max_combinations}")
        for combo in itertools.product(*choices):
            i, o = channels_after(c.name, (c.in_ch, c.out_ch), deps.ins, deps.outs, dict(zip(groups, combo)))
            if i <= 0 or o <= 0:
                continue
            gr = c.pruned_groups(i)
            if i % gr or o % gr:
                continue  # a grouped conv torch-pruning would not produce with these counts
            out.setdefault(c.key(i, o, gr), c)
    return out
