"""torchvision Swin Transformer (v1 and v2): only the MLP hidden width (``mlp.0`` -> GELU -> ``mlp.3``) is pruned.

Why: Swin keeps its features channels-last and cuts them into windows with 4-D/6-D views. torch-pruning reads
every such view as a flatten of channels into features and maps each channel index to H*W indices (its
``_FlattenIndexMapping``), compounded over the stages' reshapes: collecting the groups of the residual stream or of
``qkv`` then grows without bound (swin_t killed past 24 GiB; a 2-stage, 32x32 Swin still ran 10+ minutes). Those
groups are also not prunable as torch-pruning would build them (its mapping is wrong for window views), and head
pruning must keep ``qkv``, ``proj``, ``num_heads`` and the relative-position bias tables consistent, which is
hwprune/transformer_groups.py's job. So the residual width, ``qkv``/``proj``, patch merging and v2's continuous
position-bias MLP are ignored automatically (and reported), and the groups left contain no window view at all.
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn
from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlock

from hwprune.adapters.base import Adapter, all_roots_except

SWIN_REASON = ("Swin residual/attention width (window views: torch-pruning cannot map them; "
               "heads: hwprune/transformer_groups.py)")


def swin_mlp_inputs(model: nn.Module):
    """Names of the first Linear of every Swin block's MLP: the groups that are pure channel widths."""
    return [f"{n}.mlp.0" for n, m in model.named_modules() if isinstance(m, SwinTransformerBlock)]


class SwinAdapter(Adapter):
    name = "torchvision-swin"
    triggers = (SwinTransformer, SwinTransformerBlock)  # SwinTransformerBlockV2 subclasses SwinTransformerBlock

    def ignored(self, model: nn.Module) -> Dict[str, str]:
        return all_roots_except(model, swin_mlp_inputs(model), SWIN_REASON)
