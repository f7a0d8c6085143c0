"""Depth pruning of CNN residual blocks: the demo's DemoBlock is a depth candidate like torchvision's BasicBlock,
a plan can drop blocks beside its channel ratios, and a search with the demo-depth space delivers models without
the dropped blocks."""
from __future__ import annotations

import textwrap

import onnx
import pandas as pd
import pytest
import torch

from conftest import FAST_PROFILE_YAML
from hwprune.cli import main
from hwprune.config import load_search_space
from hwprune.models import DemoNet
from hwprune.plan import PruningPlan, apply_plan
from hwprune.structures import Shortcut, get_structure, silence_branch


def _tiny_demo() -> DemoNet:
    torch.manual_seed(0)
    return DemoNet(widths=(8, 16, 16)).eval()


def test_demo_blocks_drop_to_their_shortcut():
    net = _tiny_demo()
    st = get_structure("depth")
    x = torch.relu(torch.randn(1, 8, 12, 12))  # a block's input follows a ReLU
    for blk, xin in ((net.layer1[1], x), (net.layer2[0], x)):  # identity shortcut, 1x1 downsample shortcut
        assert st.applies_to(blk)
        new, rep = st.apply(blk, 1.0, in_shape=tuple(xin.shape))
        assert isinstance(new, Shortcut) and rep.executed == "physical" and rep.macs_effective < rep.macs_dense
        with torch.no_grad():
            torch.testing.assert_close(new(xin), silence_branch(blk).eval()(xin), rtol=1e-5, atol=1e-5)


def test_a_plan_drops_blocks_beside_its_channel_ratios():
    net = _tiny_demo()
    x = torch.randn(2, 1, 16, 16)
    plan = PruningPlan(ratios={"layer2.1.conv1": 0.5},
                       structures={"layer1.1": {"structure": "depth", "ratio": 0.5},
                                   "layer3.1": {"structure": "depth", "ratio": 0.5}})
    pruned = apply_plan(net, plan, x)[0]
    assert isinstance(pruned.layer1[1], Shortcut) and isinstance(pruned.layer3[1], Shortcut)
    assert pruned.layer2[1].conv1.out_channels == 8
    with torch.no_grad():
        assert pruned(x).shape == (2, 10)


def test_the_demo_depth_space_names_the_demo_blocks():
    space = load_search_space("demo-depth")
    assert space.structures is not None and tuple(space.structures.allowed) == ("depth",)
    names = dict(DemoNet().named_modules())
    assert all(layer in names for layer in space.structures.layers)


SPACE = textwrap.dedent("""\
    prunable: ["*"]
    ratios: [0.0, 0.5]
    round_to: 4
    structures:
      layers: ["layer1.1", "layer2.1", "layer3.1"]
      allowed: [depth]
      ratios: [0.0, 0.5]
    recovery:
      bn_recalibration_batches: 1
      finetune_steps: 5
      batch_size: 32
      lr: 0.05
""")


def _search_tiny_demo(tmp_path, *args: str):
    """A random-sampler search of the tiny demo with the depth space on digits (no export, no verify): its run dir."""
    (tmp_path / "space.yaml").write_text(SPACE)
    (tmp_path / "prof.yaml").write_text(
        FAST_PROFILE_YAML.replace("accelerates: [filter, channel]", "accelerates: [filter, channel, depth]"))
    torch.save(_tiny_demo(), tmp_path / "demo.pt")
    run = tmp_path / "run"
    assert main(["search", "--model", str(tmp_path / "demo.pt"), "--trust-pickle", "--data", "digits",
                 "--search-space", str(tmp_path / "space.yaml"), "--profile", str(tmp_path / "prof.yaml"),
                 "--sampler", "random", "--no-export", "--verify-rounds", "0", "--out", str(run), "--no-progress",
                 *args]) == 0
    return run


@pytest.mark.slow
def test_a_search_with_depth_delivers_models_without_the_dropped_blocks(tmp_path):
    run = _search_tiny_demo(tmp_path, "--trials", "6")
    df = pd.read_csv(run / "trials.csv")
    done = df[df.state == "complete"]
    # dropped blocks are gone from the counted model: no second subtraction (it once gave negative MACs)
    assert (done.macs_effective == done.macs).all() and (done.bytes_deployed == done.bytes).all()
    import optuna

    study = optuna.load_study(study_name="hwprune", storage=f"sqlite:///{run / 'study.db'}")
    warm = [t for t in study.trials if t.user_attrs.get("baseline")]
    assert len(warm) >= 1  # the uniform sweep ran, and as channel plans only: no block of a baseline is dropped
    assert all(not PruningPlan.from_json(t.user_attrs["plan"]).structures for t in warm)
    dense_convs = None
    seen = 0
    for r in df.itertuples():
        if r.state not in ("complete", "COMPLETE"):
            continue
        plan = PruningPlan.from_json(r.plan)
        dropped = sorted(k for k, s in plan.structures.items() if s.get("ratio", 0) >= 0.5)
        out = tmp_path / "export"
        assert main(["export", "--run", str(run), "--trust-pickle", "--trial", str(r.trial), "--out", str(out)]) == 0
        graph = onnx.load(str(out / f"trial-{r.trial}" / "model.onnx")).graph
        convs = sum(1 for n in graph.node if n.op_type == "Conv")
        if r.role == "dense":
            dense_convs = convs
            continue
        model = torch.load(out / f"trial-{r.trial}" / "model.pt", weights_only=False)
        for layer in dropped:
            assert isinstance(model.get_submodule(layer), Shortcut), (r.trial, layer)
        assert convs == 15 - 2 * len(dropped), (r.trial, dropped, convs)  # two 3x3 convs per dropped block
        seen += bool(dropped)
    assert dense_convs == 15 and seen >= 1, (dense_convs, seen)


@pytest.mark.slow
def test_proposals_drop_blocks_and_fix_every_structure_parameter(tmp_path, monkeypatch):
    """With depth in the space, the hardware-aware proposals weigh dropping each block against the channel
    cuts, and an enqueued proposal builds exactly its plan: no structure parameter is left to the sampler."""
    import dataclasses

    import optuna

    from hwprune import proposals as proposals_module

    measured = proposals_module.measure_effects

    def effects_with_steady_latency(*args, **kwargs):
        # The probes run for real (pruning, BN recalibration, accuracy, timing), but the tiny model runs in
        # 0.07 ms, where a single group's saving is below the timing noise of a busy 2-core host: once every probe
        # read slower than dense and no plan was proposed. The savings are replaced by a noise-free stand-in
        # (ratio-proportional, a block worth two groups) so this test checks the plans, not the host's noise.
        return [dataclasses.replace(e, latency_saved_ms=0.002 * e.ratio * (2.0 if e.kind == "depth" else 1.0))
                for e in measured(*args, **kwargs)]

    monkeypatch.setattr(proposals_module, "measure_effects", effects_with_steady_latency)
    run = _search_tiny_demo(tmp_path, "--trials", "8", "--proposals")
    effects = pd.read_csv(run / "sensitivity.csv")
    assert sorted(effects[effects.kind == "depth"].group) == ["layer1.1", "layer2.1", "layer3.1"]
    study = optuna.load_study(study_name="hwprune", storage=f"sqlite:///{run / 'study.db'}")
    proposals = [t for t in study.trials if t.user_attrs.get("proposal")]
    assert proposals and all(t.user_attrs.get("structures_enqueued") for t in proposals)
    # the greedy over the probed effects (blocks' inner groups: the tiny demo's conv1 groups) decides each plan
    from hwprune.proposals import GroupEffect, greedy_plans

    fx = [GroupEffect(**r) for r in effects.to_dict("records")]
    groups = sorted(set(effects[effects.kind == "channels"].group))
    blocks = ["layer1.1", "layer2.1", "layer3.1"]
    expected = dict(greedy_plans(fx, groups, study.user_attrs["reference_ms"]["prof"],
                                 inside={b: [g for g in groups if g.startswith(b + ".")] for b in blocks}))
    for t in proposals:
        plan = PruningPlan.from_json(t.user_attrs["plan"])
        enqueued = {k[: -len(".depth.ratio")] for k, v in t.params.items() if k.endswith(".depth.ratio") and v > 0}
        assert {k for k, s in plan.structures.items() if s["structure"] == "depth"} == enqueued, t.number
        assert len([k for k in t.params if k.endswith(".depth.ratio")]) == 3  # every block decided, none drawn
        assert enqueued == {b for b in blocks if expected[t.user_attrs["proposal"]][b] > 0}, t.number
