"""The pure channel-rounding rule (hwprune.rounding) against what graph.prune_groups really removes, across widths,
ratios and round_to values, including the edge where torch-pruning alone would round a group to nothing."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hwprune import graph
from hwprune.rounding import ratio_keeping_round_to, removed_channels


def two_convs(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 5, 1)).eval()


@pytest.mark.parametrize("width", [10, 16])
@pytest.mark.parametrize("round_to", [None, 4, 8])
def test_removed_channels_matches_real_pruning(width, round_to):
    model, x = two_convs(width), torch.randn(1, 3, 6, 6)
    for ratio in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9):  # 0.8 of 10 keeps int(1.99..) = 1 in floating point
        pruned, _ = graph.prune_groups(model, x, {"0": ratio}, "l1", round_to, ["2"])
        assert width - pruned[0].out_channels == removed_channels(width, ratio, round_to), (width, round_to, ratio)


def test_round_to_edge_keeps_exactly_round_to():
    # 8 channels, round_to 4: int(8 * 0.4) = 3 would round down to 0 (torch-pruning then prunes nothing)
    assert ratio_keeping_round_to(8, 0.6, 4) == pytest.approx(1 - 4.5 / 8)
    assert removed_channels(8, 0.6, 4) == 4 and removed_channels(8, 0.5, 4) == 4
    assert ratio_keeping_round_to(8, 0.5, 4) == 0.5 and ratio_keeping_round_to(4, 0.9, 4) == 0.9
    assert removed_channels(4, 0.9, 4) == 0  # a group no wider than round_to cannot shrink
    # without round_to, int(10 * (1 - 0.9)) is 0 in floating point: torch-pruning refuses to empty the group
    assert removed_channels(10, 0.9, None) == 0 and removed_channels(10, 0.5, None) == 5
    assert removed_channels(64, 0.0, 8) == 0 and removed_channels(64, 0.3, 8) == 24
