"""End to end: a search that puts every mask-only structure on layers delivers weights that still hold the plan's
zeros, in the trials' recovered state_dicts and in the exported ONNX initializers (recovery used to train them
back while metrics.json still reported them pruned)."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import FAST_PROFILE_YAML, make_tiny_net
from hwprune.cli import main
from hwprune.plan import PruningPlan, apply_plan

pytestmark = pytest.mark.slow

MASK_STRUCTURES = ["kernel", "kernel_row", "kernel_column", "connection", "nm", "unify", "block", "mixed"]

SPACE = textwrap.dedent("""\
    prunable: ["*"]
    ratios: [0.0]
    round_to: 4
    structures:
      layers: ["layer*.conv*", "fc"]
      allowed: [{allowed}]
      ratios: [0.5, 0.75]
      explore_all: true
    recovery:
      bn_recalibration_batches: 1
      finetune_steps: 15
      batch_size: 32
      lr: 0.2
""")


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks-e2e")
    (root / "space.yaml").write_text(SPACE.format(allowed=", ".join(MASK_STRUCTURES)))
    (root / "fast-cpu.yaml").write_text(FAST_PROFILE_YAML)
    torch.save(make_tiny_net(), root / "tiny.pt")
    args = ["search", "--model", str(root / "tiny.pt"), "--trust-pickle", "--data", "digits", "--search-space", str(root / "space.yaml"),
            "--profile", str(root / "fast-cpu.yaml"), "--trials", "4", "--sampler", "random", "--no-export",
            "--out", str(root / "run"), "--no-progress"]
    assert main(args) == 0
    return root


def _trials(root):
    import pandas as pd

    df = pd.read_csv(root / "run" / "trials.csv")
    plans = [(int(r.trial), PruningPlan.from_json(r.plan)) for r in df.itertuples() if r.role != "dense"]
    return [(t, p) for t, p in plans if p.structures]  # warm-start baselines are channel plans (no masks)


def _planned_zeros(plan: PruningPlan):
    """{layer: bool tensor of the zeros the plan asks for}, from the plan applied to the dense model."""
    net = make_tiny_net()
    pruned = apply_plan(net, plan, torch.randn(1, 1, 8, 8))[0]
    mods = dict(pruned.named_modules())
    return {layer: (mods[layer].weight.detach() == 0) for layer in plan.structures}


def _unified_tiles(w: torch.Tensor, b: int) -> set:
    """Tiles (b x b in the GEMM view) whose weights all share one non-zero |value|."""
    g = w.detach().reshape(w.shape[0], -1).abs()
    out = set()
    for i in range(0, g.shape[0], b):
        for j in range(0, g.shape[1], b):
            t = g[i:i + b, j:j + b]
            if t.numel() > 1 and t.min() > 0 and float(t.max() - t.min()) <= 1e-6 * float(t.max()):
                out.add((i, j))
    return out


def _onnx_weight(model: onnx.ModelProto, delivered: np.ndarray) -> np.ndarray:
    """The initializer that holds ``delivered`` (by value; the exporter may rename it and fold BN scales per row)."""
    w = delivered.reshape(delivered.shape[0], -1)
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.shape != delivered.shape:
            continue
        a2 = a.reshape(a.shape[0], -1)
        s = (a2 * w).sum(1) / np.maximum((w * w).sum(1), 1e-30)
        if np.allclose(a2, s[:, None] * w, atol=1e-5):
            return a
    raise AssertionError(f"no ONNX initializer of shape {delivered.shape} holds the delivered weights")


def test_search_offers_every_mask_structure(masked_run):
    used = {s["structure"] for _, plan in _trials(masked_run) for s in plan.structures.values()}
    assert set(MASK_STRUCTURES) <= used, set(MASK_STRUCTURES) - used


def test_delivered_state_dicts_hold_the_planned_zeros(masked_run):
    checked = 0
    for trial, plan in _trials(masked_run):
        sd = torch.load(masked_run / "run" / "trials" / f"trial-{trial}" / "state_dict.pt", weights_only=True)
        planned = apply_plan(make_tiny_net(), plan, torch.randn(1, 1, 8, 8))[0]
        for layer, zeros in _planned_zeros(plan).items():
            w = sd[f"{layer}.weight"]
            spec = plan.structures[layer]
            if spec["structure"] == "unify":  # unified tiles keep one shared |value| (pruned ones are zeros too)
                tied = _unified_tiles(planned.get_submodule(layer).weight, spec["params"]["b"])
                assert tied and tied <= _unified_tiles(w, spec["params"]["b"]), (trial, layer)
            else:
                assert zeros.any(), layer
            assert bool((w[zeros] == 0).all()), (
                f"trial {trial} {layer} ({plan.structures[layer]['structure']}): "
                f"{int((w[zeros] != 0).sum())} of {int(zeros.sum())} planned zeros trained back")
            checked += 1
    assert checked >= 12


def test_exported_onnx_and_torch_hold_the_planned_zeros(masked_run, tmp_path):
    for trial, plan in _trials(masked_run):
        assert main(["export", "--run", str(masked_run / "run"), "--trust-pickle", "--trial", str(trial), "--out", str(tmp_path)]) == 0
        dest = tmp_path / f"trial-{trial}"
        model = onnx.load(str(dest / "model.onnx"))
        torch_model = torch.load(dest / "model.pt", weights_only=False)
        mods = dict(torch_model.named_modules())
        assert not any(n.startswith("hw_") for n, _ in torch_model.named_buffers())  # plain weights, no masks
        for layer, zeros in _planned_zeros(plan).items():
            w = mods[layer].weight.detach()
            assert bool((w[zeros] == 0).all()), (trial, layer)
            a = _onnx_weight(model, w.numpy())
            assert bool((a[zeros.numpy()] == 0).all()), (trial, layer)
        metrics = json.loads((dest / "metrics.json").read_text())
        for rep in metrics["structures"]:  # costs counted from the delivered weights
            assert rep["weights_kept"] == int((mods[rep["layer"]].weight != 0).sum())
