"""Sparse formats (BSR Linear) on torch profiles: copied, moved and measured like any module, and searched end to
end on torch-cpu (issue 12: deepcopy of a BSR tensor crashed ``structures --measure`` and block searches)."""
from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from hwprune.latency import DeviceProfile, MeasureSettings
from hwprune.latency.torch_backend import TorchBackend
from hwprune.structures.block import SparseLinear

FAST = MeasureSettings(warmup=1, min_repeats=3, max_repeats=5, target_rel_ci=0.5, time_cap_s=0.5)


def _bsr_net() -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight[:, :16] = 0  # whole 4x4 tiles empty
    return nn.Sequential(nn.Flatten(), SparseLinear(lin, "bsr", 4), nn.ReLU())


def test_sparse_linear_survives_deepcopy_pickle_and_dtype_moves():
    net = _bsr_net().eval()
    x = torch.randn(2, 32)
    ref = net(x)
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        torch.testing.assert_close(other(x), ref)
        assert other[1]._sparse.layout == torch.sparse_bsr
        assert other[1]._sparse.values().data_ptr() != net[1]._sparse.values().data_ptr()
    half = copy.deepcopy(net).to(torch.float64)  # the sparse copy follows the dense weight's dtype
    assert half[1]._sparse.dtype == torch.float64
    torch.testing.assert_close(half(x.double()).float(), ref, rtol=1e-4, atol=1e-5)


def test_torch_backend_measures_a_bsr_module():
    b = TorchBackend(DeviceProfile(name="t", backend="torch", options={"threads": 1}, measure=FAST))
    assert b.measure_module(_bsr_net(), (1, 32)).median_ms > 0


def test_structures_measure_on_torch_cpu(capsys):
    from hwprune.cli import main

    assert main(["structures", "--measure", "--profile", "torch-cpu"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| block "))
    assert "x)" in row  # a measured speedup, not a declared yes/no


@pytest.mark.slow
def test_block_structure_search_on_torch_cpu(tmp_path: Path):
    """A tiny search whose per-layer catalog offers ``block`` on the torch-cpu profile, end to end."""
    from conftest import FAST_SPACE_YAML, make_tiny_net
    from hwprune.cli import main

    space = FAST_SPACE_YAML + "structures:\n  layers: ['fc']\n  allowed: [block]\n" \
                              "  ratios: [0.5, 0.75]\n"
    (tmp_path / "space.yaml").write_text(space)
    (tmp_path / "torch-fast.yaml").write_text(
        "backend: torch\nbatch_size: 1\nchannel_multiple: 8\noptions: {device: cpu, threads: 1}\n"
        "measure: {warmup: 1, min_repeats: 3, max_repeats: 5, target_rel_ci: 0.5, time_cap_s: 0.5}\n"
        "accelerates: [filter, channel, block]\n")
    model_path = tmp_path / "tiny.pt"
    net = make_tiny_net()
    torch.save(net, model_path)
    args = ["search", "--model", str(model_path), "--trust-pickle", "--data", "digits", "--search-space", str(tmp_path / "space.yaml"),
            "--profile", str(tmp_path / "torch-fast.yaml"), "--trials", "4", "--out", str(tmp_path / "run"),
            "--no-progress", "--sampler", "random"]
    assert main(args) == 0
    df = pd.read_csv(tmp_path / "run" / "trials.csv")
    # a warm-start plan that builds an earlier trial's model is a repeat (its results stand, nothing re-measured)
    assert df.state.isin(["complete", "repeat"]).all() and (df.state == "complete").sum() >= 4, \
        df[["trial", "state"]].to_string()
    assert df.plan.str.contains('"block"').any()  # some trial did take the BSR structure
    assert df.plan.str.contains('"round_to": 8').all()  # the profile's channel_multiple (space: round_to 4)
