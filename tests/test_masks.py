"""Masks that hold: every mask-only structure keeps its zeros (and unify its tied tiles) through training; the
delivered-weight costs count what the final tensors hold; exported models are plain."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_net
from hwprune.config import RecoveryBudget
from hwprune.plan import PruningPlan, apply_plan
from hwprune.recover import recover, train
from hwprune.structures import SparseLinear, bytes_bsr, bytes_csr
from hwprune.structures.delivered import delivered_reports, nm_bytes
from hwprune.structures.masks import is_masked, masked_modules, strip

X = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
SPECS = {
    "kernel": {"structure": "kernel", "ratio": 0.5},
    "kernel_row": {"structure": "kernel_row", "ratio": 0.5},
    "kernel_column": {"structure": "kernel_column", "ratio": 0.5},
    "connection": {"structure": "connection", "ratio": 0.75},
    "nm": {"structure": "nm", "ratio": 1.0},
    "block": {"structure": "block", "ratio": 0.5, "params": {"b": 2}},
    "unify": {"structure": "unify", "ratio": 0.5, "params": {"b": 2, "prune_share": 0.5}},
    "mixed": {"structure": "mixed", "ratio": 0.5, "params": {"parts": "kernel_row+kernel_column"}},
    "mixed+strided": {"structure": "mixed", "ratio": 0.5, "params": {"parts": "kernel+strided"}},
}


def _plan(spec, layers=("layer1.0.conv1", "layer2.1.conv2", "fc")):
    return PruningPlan(ratios={}, structures={l: copy.deepcopy(spec) for l in layers
                                              if not (l == "fc" and "strided" in str(spec.get("params")))})


@pytest.mark.parametrize("name", list(SPECS))
def test_training_keeps_the_planned_zeros(name, tiny_digits):
    pruned, _, _ = apply_plan(make_tiny_net(), _plan(SPECS[name]), X)
    mods = dict(pruned.named_modules())
    layers = list(_plan(SPECS[name]).structures)
    zeros = {l: mods[l].weight.detach() == 0 for l in layers}
    assert all(z.any() for z in zeros.values())
    before = {l: mods[l].weight.detach().clone() for l in layers}
    train(pruned, tiny_digits, steps=8, lr=0.5, batch_size=32)
    for l in layers:
        w = mods[l].weight.detach()
        assert bool((w[zeros[l]] == 0).all()), f"{name} {l}: zeros trained back"
        assert not torch.equal(w, before[l]), f"{name} {l}: the kept weights did not train"


def test_unified_tiles_stay_tied_through_training(tiny_digits):
    pruned, _, reps = apply_plan(make_tiny_net(), _plan(SPECS["unify"], ("layer2.1.conv2",)), X)
    conv = pruned.get_submodule("layer2.1.conv2")
    tie = conv.hw_tie
    assert (tie >= 0).any()
    train(pruned, tiny_digits, steps=8, lr=0.5, batch_size=32)
    w = conv.weight.detach()
    for t in tie[tie >= 0].unique()[:20]:
        vals = w[tie == t].abs()
        assert float(vals.max() - vals.min()) <= 1e-6 * float(vals.max()) + 1e-12
    rep = delivered_reports(pruned, [r.to_dict() for r in reps])[0]
    assert rep["extra"]["tiles_unified"] == reps[0].extra["tiles_unified"]
    assert rep["extra"]["tiles_pruned"] == reps[0].extra["tiles_pruned"]


def test_sparse_linear_trains_and_its_sparse_copy_follows_the_weights(tiny_digits):
    pruned, _, _ = apply_plan(make_tiny_net(), _plan(SPECS["block"], ("fc",)), X)
    fc = pruned.fc
    assert isinstance(fc, SparseLinear) and fc.weight.requires_grad
    before = fc.weight.detach().clone()
    train(pruned, tiny_digits, steps=5, lr=0.5, batch_size=32)
    assert not torch.equal(before, fc.weight.detach())
    x = torch.randn(3, fc.in_features)
    with torch.no_grad():
        torch.testing.assert_close(fc(x), F.linear(x, fc.weight, fc.bias))
        fc.load_state_dict({"weight": torch.zeros_like(fc.weight), "bias": fc.bias.detach()})  # as export does
        torch.testing.assert_close(fc(x), fc.bias.expand(3, -1))


def test_strip_gives_a_plain_model_with_the_same_state_dict():
    pruned, _, _ = apply_plan(make_tiny_net(), _plan(SPECS["kernel"]), X)
    assert masked_modules(pruned)
    keys = set(pruned.state_dict())
    assert not any("hw_" in k for k in keys)  # masks are non-persistent: never in delivered weights
    plain = strip(copy.deepcopy(pruned))
    assert not masked_modules(plain) and set(plain.state_dict()) == keys
    assert not any(is_masked(m) or hasattr(m, "hw_spec") for m in plain.modules())


def test_delivered_costs_count_the_final_weights_not_the_plan(tiny_digits):
    """With the masks removed the zeros train back (the old bug): the delivered report must then show a dense layer."""
    pruned, _, reps = apply_plan(make_tiny_net(), _plan(SPECS["connection"], ("layer2.1.conv2",)), X)
    planned = reps[0].to_dict()
    held = delivered_reports(pruned, [planned])[0]
    assert held["format"] == "csr" and held["bytes_deployed"] == planned["bytes_deployed"]
    leaky = strip(copy.deepcopy(pruned))
    train(leaky, tiny_digits, steps=3, lr=0.5, batch_size=32)
    rep = delivered_reports(leaky, [planned])[0]
    w = leaky.get_submodule("layer2.1.conv2").weight
    assert rep["weights_kept"] == int((w != 0).sum()) > planned["weights_kept"]
    assert rep["format"] == "dense" and rep["bytes_deployed"] == 4 * w.numel()


def test_format_sizes_from_the_tensors():
    w = torch.zeros(4, 8)
    w[0, :2] = 1.0  # one 2x2 block row... in tile (0, 0)
    w[3, 7] = 2.0  # tile (1, 3)
    rep = {"layer": "m", "structure": "block", "executed": "dense-masked", "format": "bsr", "params": {"b": 2},
           "weights": 32, "macs_dense": 32, "extra": {}}
    m = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        m.weight.copy_(w)
    out = delivered_reports(nn.ModuleDict({"m": m}), [rep])[0]
    assert out["extra"]["blocks_kept"] == 2 and out["bytes_deployed"] == bytes_bsr(2, 2, 2, 2)
    # 2:4: each window of 4 stores 2 values (+2 bits each), whatever the windows hold, if none holds more than 2
    assert nm_bytes(w, 2, 4) == 4 * 2 * 2 * 4 + (4 * 2 * 2 * 2) // 8
    w[1, :3] = 1.0
    assert nm_bytes(w, 2, 4) is None  # a window with 3 non-zeros is not 2:4
    assert bytes_csr(3, 4) == 3 * 8 + 5 * 4


def test_recovery_keeps_masks_with_distillation_and_bn_recalibration(tiny_digits):
    pruned, _, _ = apply_plan(make_tiny_net(), _plan(SPECS["kernel"]), X)
    zeros = {n: m.weight.detach() == 0 for n, m in masked_modules(pruned)}
    budget = RecoveryBudget(finetune_steps=5, batch_size=32, lr=0.5, distill=True, bn_recalibration_batches=2)
    recover(pruned, tiny_digits, budget, teacher=make_tiny_net())
    for n, m in masked_modules(pruned):
        assert bool((m.weight[zeros[n]] == 0).all()), n
