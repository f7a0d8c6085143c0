"""torchvision MaxViT: the MBConv expansion width (``conv_a`` -> depthwise ``conv_b`` -> squeeze-excitation ->
``conv_c``), the squeeze width, the attention layers' MLP hidden width and the classifier's hidden width are pruned.

Why not the rest: the residual stream and ``to_qkv``/``merge`` pass through block/grid partition views
(``WindowPartition``, ``SwapAxes``) that torch-pruning reads as flattening channels into H*W-fold index lists
(maxvit_t killed past 24 GiB while its groups were collected) and that its index mappings get wrong; head pruning
with the relative-position tables is hwprune/transformer_groups.py's job. These are ignored automatically (and
reported); the groups left contain no partition view.
"""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn
from torchvision.models.maxvit import MaxVit, MBConv, PartitionAttentionLayer

from hwprune.adapters.base import Adapter, all_roots_except

MAXVIT_REASON = ("MaxViT residual/attention width (partition views: torch-pruning cannot map them; "
                 "heads: hwprune/transformer_groups.py)")


def maxvit_inner_widths(model: nn.Module) -> List[str]:
    names = []
    for n, m in model.named_modules():
        if isinstance(m, MBConv):
            names += [f"{n}.layers.conv_a.0", f"{n}.layers.squeeze_excitation.fc1"]
        elif isinstance(m, PartitionAttentionLayer):
            names.append(f"{n}.mlp_layer.1")
        elif isinstance(m, MaxVit):
            names.append(f"{n}.classifier.3" if n else "classifier.3")
    return names


class MaxVitAdapter(Adapter):
    name = "torchvision-maxvit"
    triggers = (MaxVit, PartitionAttentionLayer)

    def ignored(self, model: nn.Module) -> Dict[str, str]:
        return all_roots_except(model, maxvit_inner_widths(model), MAXVIT_REASON)
