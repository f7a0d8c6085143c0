"""torchvision ShuffleNetV2: ``channel_shuffle`` (view to 5-D, transpose, view back) interleaves the two branches'
channels. torch-pruning's reshape index mapping divides by a channel count it infers as zero there
(ZeroDivisionError while building the graph), and no index mapping of its own can express the permutation.

So, while torch-pruning traces, the block runs a traceable forward (same values; the shuffle is one opaque
autograd op), and the two convs that
feed it in every block (branch1[2], branch2[5]) are ignored: the block's in/out width stays, while each branch's
inner width (1x1 conv -> depthwise conv -> 1x1 conv, and the stride-2 branch's depthwise input) is pruned.
The pruned model keeps torchvision's own ``channel_shuffle``.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch
import torch.nn as nn
import torchvision.models.shufflenetv2 as tv_shufflenet

from hwprune.adapters.base import Adapter

SHUFFLE_REASON = "output feeds ShuffleNetV2's channel shuffle (a cross-branch permutation torch-pruning cannot map)"


class _OpaqueShuffle(torch.autograd.Function):
    """One graph node for the whole shuffle, so torch-pruning sees no reshape to misread."""

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups = groups
        return _shuffle(x, groups)

    @staticmethod
    def backward(ctx, grad):
        # the inverse permutation: shuffling with channels // groups groups undoes a shuffle with groups groups
        return _shuffle(grad, grad.shape[1] // ctx.groups), None


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleNetV2Adapter(Adapter):
    name = "torchvision-shufflenet_v2"
    triggers = (tv_shufflenet.InvertedResidual,)

    def ignored(self, model: nn.Module) -> Dict[str, str]:
        out = {}
        for name, m in model.named_modules():
            if isinstance(m, tv_shufflenet.InvertedResidual):
                if len(m.branch1) > 2:  # stride-2 blocks only; stride 1 has an empty branch1
                    out[f"{name}.branch1.2"] = SHUFFLE_REASON
                out[f"{name}.branch2.5"] = SHUFFLE_REASON
        return out

    @contextlib.contextmanager
    def tracing(self, model: nn.Module) -> Iterator[None]:
        original = tv_shufflenet.InvertedResidual.forward
        tv_shufflenet.InvertedResidual.forward = _traceable_forward
        try:
            yield
        finally:
            tv_shufflenet.InvertedResidual.forward = original


def _traceable_forward(self: tv_shufflenet.InvertedResidual, x: torch.Tensor) -> torch.Tensor:
    """``InvertedResidual.forward`` with the same values, written as torch-pruning can trace it: the stride-1 split
    as two slices (its chunk index mapping gets the offsets wrong after an opaque op: IndexError) and the shuffle
    as one opaque op."""
    if self.stride == 1:
        half = x.shape[1] // 2
        out = torch.cat((x[:, :half], self.branch2(x[:, half:])), dim=1)
    else:
        out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
    return _OpaqueShuffle.apply(out, 2)
