"""torchvision VisionTransformer: torch-pruning prunes its width (patch conv, class token, position embedding,
``nn.MultiheadAttention`` and MLPs are coupled through the residual stream), but

- the width must drop by the same amount in every head, or ``embed_dim`` stops dividing by ``num_heads``: each
  ``nn.MultiheadAttention`` is declared as ``num_heads`` channel groups, so every head loses the same dimensions
  (declared as torch-pruning's ``num_heads`` instead, its attention re-rooting drops the group: nothing pruned);
- ``VisionTransformer._process_input`` reshapes with its stored ``hidden_dim``, which pruning does not update;
- the ONNX exporter cannot export the fused attention kernel PyTorch picks in eval mode (even head counts).
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn
from torchvision.models.vision_transformer import VisionTransformer

from hwprune.adapters.base import Adapter
from hwprune.transformer_groups import no_mha_fastpath


class MultiheadAttentionAdapter(Adapter):
    """Any model with ``nn.MultiheadAttention`` (torchvision's ViT, user models): every head keeps the same width."""

    name = "multihead-attention"
    triggers = (nn.MultiheadAttention,)

    def channel_groups(self, model: nn.Module) -> Dict[nn.Module, int]:
        return {m: int(m.num_heads) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}

    def exporting(self, model: nn.Module):
        # In eval mode without grad, nn.MultiheadAttention calls the fused aten::_native_multi_head_attention (for an
        # even head count), which the ONNX exporter cannot export; the unfused path computes the same values.
        return no_mha_fastpath()

    def fixup(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                m.head_dim = m.embed_dim // m.num_heads
                if m._qkv_same_embed_dim:  # one in-projection: key and value widths are the embedding width
                    m.kdim = m.vdim = m.embed_dim


class VisionTransformerAdapter(Adapter):
    name = "torchvision-vit"
    triggers = (VisionTransformer,)

    def fixup(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, VisionTransformer):
                m.hidden_dim = int(m.conv_proj.out_channels)
