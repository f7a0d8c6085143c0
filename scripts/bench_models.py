"""Models the benchmarks train themselves (not the demo's residual architecture): ``package.module:factory``
references for hwprune when ``scripts/`` is on the Python path."""
from __future__ import annotations

import torch.nn as nn


def _conv(cin: int, cout: int) -> list:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def vgg_small(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    """A plain VGG-style CNN for 28x28 digits: 3x3 conv pairs at width/2x/4x channels (32/64/128 by default),
    max-pooling, global average pooling and one linear classifier (no residual connections, unlike the demo)."""
    a, b, c = width, 2 * width, 4 * width
    return nn.Sequential(
        *_conv(in_channels, a), *_conv(a, a), nn.MaxPool2d(2),
        *_conv(a, b), *_conv(b, b), nn.MaxPool2d(2),
        *_conv(b, c), *_conv(c, c),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes),
    )


def vgg_wide(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """``vgg_small`` at twice the width (64/128/256 channels, 4x the MACs): slow enough on one CPU thread that
    latency keeps falling with MACs further than on the small one, whose fastest plans hit a fixed per-op floor."""
    return vgg_small(in_channels, num_classes, width=64)
