"""How many channels pruning a group removes: hwprune's round_to rule and torch-pruning's rounding, as pure
arithmetic (no torch), shared by the pruning adapter (graph.py) and the latency lookup table, which predicts
channel counts without pruning."""
from __future__ import annotations

from typing import Optional


def ratio_keeping_round_to(channels: int, ratio: float, round_to: Optional[int]) -> float:
    """The ratio hwprune asks torch-pruning for. torch-pruning rounds the channels that remain *down* to a multiple
    of ``round_to``; when that gives 0 it prunes nothing at all, so a larger ratio would leave a layer wider than a
    smaller one (8 channels, round_to 4: ratio 0.5 keeps 4, ratio 0.6 kept all 8). Ask instead for exactly
    ``round_to`` channels to remain there."""
    if not round_to or channels <= round_to or int(channels * (1 - ratio)) >= round_to:
        return ratio
    # torch-pruning keeps int(channels * (1 - ratio')) channels; the half channel guards against float rounding
    return 1.0 - (round_to + 0.5) / channels


def removed_channels(channels: int, ratio: float, round_to: Optional[int]) -> int:
    """Channels ``graph.prune_groups`` removes from a group of ``channels`` at ``ratio``: the ratio of
    ``ratio_keeping_round_to``, then torch-pruning's rounding (keep ``int(channels * (1 - ratio))``, rounded down to
    a multiple of ``round_to``; a group it would empty is left whole). A ratio of 0 prunes nothing. The latency table
    checks this against real pruning whenever it is built."""
    if ratio <= 0:
        return 0
    ratio = ratio_keeping_round_to(channels, ratio, round_to)
    keep = int(channels * (1 - ratio))
    if keep >= channels:
        return 0
    if round_to:
        keep -= keep % round_to
    return channels - keep if keep > 0 else 0
