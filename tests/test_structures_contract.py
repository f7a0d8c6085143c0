"""Property tests of the mask contract for every registered structure."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from hwprune.errors import ConfigError
from hwprune.structures import get_structure, keep_mask, n_removed, structure_names

MASKED = [s for s in structure_names() if s not in ("depth", "mixed")]
ratios = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def layer(kind, o, c, k, seed):
    torch.manual_seed(seed)
    if kind == "conv":
        return nn.Conv2d(c, o, k, padding=k // 2)
    return nn.Linear(c * 3, o)


@pytest.mark.parametrize("name", MASKED)
@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["conv", "linear"]), o=st.integers(1, 9), c=st.integers(1, 7), k=st.sampled_from([1, 3]),
       r1=ratios, r2=ratios, seed=st.integers(0, 10_000), crit=st.sampled_from(["l1", "l2", "block_mean"]))
def test_contract(name, kind, o, c, k, r1, r2, seed, crit):
    s = get_structure(name)
    m = layer(kind, o, c, k, seed)
    if not s.applies_to(m):
        return
    lo, hi = sorted((r1, r2))
    p = s.check_params({})
    w = m.weight.detach()
    sc = s.scores(w, crit, p, module=m)
    n = sc.numel()
    assert n == s.group_index(w, p)[1]
    k_lo, k_hi = s.mask(sc, lo), s.mask(sc, hi)
    assert int((~k_lo).sum()) == n_removed(n, lo)  # exact count
    assert int((~k_hi).sum()) == n_removed(n, hi)
    assert bool((k_hi <= k_lo).all())  # nested: removed(lo) subset of removed(hi)
    e_lo, e_hi = s.element_mask(w, k_lo, p), s.element_mask(w, k_hi, p)
    assert e_lo.shape == w.shape and bool((e_hi <= e_lo).all())  # element masks nested too
    assert bool(s.element_mask(w, s.mask(sc, 0.0), p).all())  # ratio 0 keeps every weight


@pytest.mark.parametrize("name", MASKED + ["mixed"])
def test_ratio_zero_is_identity(name):
    torch.manual_seed(0)
    s = get_structure(name)
    for m, x in ((nn.Conv2d(4, 5, 3, padding=1), torch.randn(2, 4, 6, 6)), (nn.Linear(12, 8), torch.randn(3, 12))):
        if not s.applies_to(m):
            continue
        new, rep = s.apply(m, 0.0)
        assert rep.groups_removed == 0
        with torch.no_grad():
            torch.testing.assert_close(new(x), m(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 200), r=ratios)
def test_rounding_is_half_up(n, r):
    k = n_removed(n, r)
    assert 0 <= k <= n and k == min(n, math.floor(r * n + 0.5))


def test_rounding_examples_and_ties():
    assert n_removed(3, 0.5) == 2 and n_removed(5, 0.1) == 1 and n_removed(10, 0.04) == 0 and n_removed(4, 1.0) == 4
    keep = keep_mask(torch.tensor([1.0, 0.0, 1.0, 0.0]), 0.75)  # ties broken by index
    assert keep.tolist() == [False, False, True, False]
    with pytest.raises(ConfigError):
        n_removed(4, 1.5)


@settings(max_examples=20, deadline=None)
@given(r1=ratios, r2=ratios, seed=st.integers(0, 1000), parts=st.sampled_from(["kernel+strided", "kernel_row+kernel_column", "block+connection"]))
def test_mixed_contract_per_part(r1, r2, seed, parts):
    torch.manual_seed(seed)
    m = nn.Conv2d(5, 6, 3, padding=1)
    s = get_structure("mixed")
    lo, hi = sorted((r1, r2))
    a, ra = s.apply(m, lo, {"parts": parts})
    b, rb = s.apply(m, hi, {"parts": parts})
    za = (_dense_weight(a) == 0)  # element masks nested: zeros at lo stay zeros at hi
    zb = (_dense_weight(b) == 0)
    assert bool((za <= zb).all())
    total = sum(n_removed(g, lo) for g in _part_groups(m, parts))
    assert ra.groups_removed == total


def _dense_weight(mod):
    from hwprune.structures import GatherConv2d

    if isinstance(mod, GatherConv2d):  # scatter the gathered rows back into a dense kernel
        w = torch.zeros(mod.out_channels, mod.in_channels, *mod.kernel_size)
        col = 0
        for i, j in mod.positions:
            idx = getattr(mod, f"idx_{i}_{j}")
            w[:, idx, i, j] = mod.weight[:, col: col + len(idx), 0, 0]
            col += len(idx)
        return w
    return mod.weight


def _part_groups(m, parts):
    return [get_structure(p).group_index(m.weight, get_structure(p).check_params({}))[1] for p in parts.split("+")]


@settings(max_examples=20, deadline=None)
@given(r=ratios)
def test_depth_contract(r):
    from torchvision.models.resnet import BasicBlock

    s = get_structure("depth")
    new, rep = s.apply(BasicBlock(4, 4), r)
    assert rep.groups == 1 and rep.groups_removed == n_removed(1, r)
