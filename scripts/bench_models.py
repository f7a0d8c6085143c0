"""Models the benchmarks train themselves (not the demo's residual architecture): ``package.module:factory``
references for hwprune when ``scripts/`` is on the Python path."""
from __future__ import annotations

import torch.nn as nn


def _conv(cin: int, cout: int) -> list:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def vgg_small(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A plain VGG-style CNN for 28x28 digits: 3x3 conv pairs at 32/64/128 channels, max-pooling, global average
    pooling and one linear classifier (no residual connections, unlike the demo)."""
    return nn.Sequential(
        *_conv(in_channels, 32), *_conv(32, 32), nn.MaxPool2d(2),
        *_conv(32, 64), *_conv(64, 64), nn.MaxPool2d(2),
        *_conv(64, 128), *_conv(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )
