"""Importance criteria: closed-form values and the particle filter's contract."""
import numpy as np
import pytest
import torch
from torch import nn

from hwprune.errors import ConfigError
from hwprune.importance import bn_scores, group_scores, particle_filter_mask, taylor_grads
from hwprune.structures import get_structure, n_removed


def test_elementwise_criteria_closed_form():
    w = torch.tensor([[3.0, -4.0], [1.0, 0.0]])
    idx = torch.tensor([[0, 0], [1, 1]])
    assert group_scores(w, idx, 2, "l1").tolist() == [7.0, 1.0]
    assert group_scores(w, idx, 2, "l2").tolist() == [5.0, 1.0]
    assert group_scores(w, idx, 2, "block_mean").tolist() == [1.0, 0.5 / 3.5]
    g = torch.tensor([[1.0, 1.0], [2.0, 5.0]])
    assert group_scores(w, idx, 2, "taylor", grad=g).tolist() == [1.0, 2.0]  # |3 - 4|, |2 + 0|
    with pytest.raises(ConfigError, match="taylor_grads"):
        group_scores(w, idx, 2, "taylor")
    with pytest.raises(ConfigError, match="valid criteria"):
        group_scores(w, idx, 2, "magic")


def test_block_mean_partial_blocks_use_real_size():
    w = torch.ones(3, 3)
    sc = get_structure("block").scores(w, "block_mean", {"b": 2})
    assert torch.allclose(sc, torch.ones(4, dtype=torch.float64))  # edge tiles average over their real elements


def test_bn_and_filter_bn_criterion():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    assert bn_scores(bn).tolist() == [0.5, 2.0, 1.0]
    conv = nn.Conv2d(2, 3, 1)
    keep = get_structure("filter").mask(get_structure("filter").scores(conv.weight, "bn", bn=bn), 1 / 3)
    assert keep.tolist() == [False, True, True]


def test_taylor_grads_match_autograd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    g = taylor_grads(net, nn.functional.cross_entropy, [(x, y)])
    nn.functional.cross_entropy(net(x), y).backward()
    assert torch.allclose(g["0"], net[0].weight.grad) and set(g) == {"0", "2"}


def test_particle_filter_finds_the_cheap_set_and_keeps_ratio():
    n, ratio = 12, 0.25
    bad = {0, 1, 2}  # removing these costs nothing; anything else costs 1/12 each

    def err(keep):
        return sum(1 for i in np.flatnonzero(~keep) if i not in bad) / n

    keep, info = particle_filter_mask(n, ratio, err, n_particles=16, iterations=8, seed=1)
    assert int((~keep).sum()) == n_removed(n, ratio)
    assert info["mcr"] == 0.0 and set(np.flatnonzero(~keep)) == bad
    assert info["evaluations"] <= 16 * 9
    keep0, _ = particle_filter_mask(n, 0.0, err)
    assert keep0.all()
