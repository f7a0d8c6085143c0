"""torchvision Swin Transformer (v1 and v2): only the MLP hidden width (``mlp.0`` -> GELU -> ``mlp.3``) is pruned.

Why: Swin keeps its features channels-last and cuts them into windows with 4-D/6-D views. torch-pruning reads
every such view as a flatten of channels into features and maps each channel index to H*W indices (its
``_FlattenIndexMapping``), compounded over the stages' reshapes: collecting the groups of the residual stream or of
``qkv`` then grows without bound (swin_t killed past 24 GiB; a 2-stage, 32x32 Swin still ran 10+ minutes). Those
groups are also not prunable as torch-pruning would build them (its mapping is wrong for window views), and head
pruning must keep ``qkv``, ``proj``, ``num_heads`` and the relative-position bias tables consistent, which is
hwprune/transformer_groups.py's job. So the residual width, ``qkv``/``proj``, patch merging and v2's continuous
position-bias MLP are ignored automatically (and reported), and the groups left contain no window view at all.

Patch merging concatenates its four strided slices along dim -1. torch-pruning reads the saved dim -1 as an
uninitialised value (2**64 - 1), treats the concat as a channel concat and, when its recursive channel inference
gives up (deep stages: swin_s/swin_b, swin_v2_s/b), adds None to an int (TypeError while building the graph).
While torch-pruning traces, the same concat runs with its dim written as a positive number (3), which it reads
correctly as "not the channel dim": patch merging is kept in full anyway.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models.swin_transformer as tv_swin
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

    @contextlib.contextmanager
    def tracing(self, model: nn.Module) -> Iterator[None]:
        original = tv_swin._patch_merging_pad
        tv_swin._patch_merging_pad = _patch_merging_pad_positive_dim
        try:
            yield
        finally:
            tv_swin._patch_merging_pad = original


def _patch_merging_pad_positive_dim(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_patch_merging_pad`` (same values) with the concat dim as a non-negative index."""
    h, w = x.shape[-3], x.shape[-2]
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    parts = [x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]]
    return torch.cat(parts, dim=x.dim() - 1)
