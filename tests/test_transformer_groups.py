"""Transformer structures (heads:, mlp:, depth: groups) on tiny random-init BERT and ViT models built here."""
from __future__ import annotations

import copy
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import torch.nn as nn

from hwprune import graph
from hwprune import transformer_groups as tg
from hwprune.config import parse_search_space
from hwprune.errors import ConfigError
from hwprune.export import to_onnx
from hwprune.plan import PruningPlan, apply_plan, replay_plan

transformers = pytest.importorskip("transformers")
from torchvision.models import VisionTransformer  # noqa: E402

HEAD_DIM = 8  # hidden 32 / 4 heads in both tiny models


@pytest.fixture
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, attn_implementation="eager")
    return transformers.BertModel(config).eval()


@pytest.fixture
def tokens():
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # a padded sequence: the mask must reach every kept head
    return ids, mask


@pytest.fixture
def vit():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every output would be equal
    return model


@pytest.fixture
def image():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def hidden(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens[0], attention_mask=tokens[1]).last_hidden_state


def zero_value_rows(linear: nn.Linear, heads) -> None:
    """Silence heads in a dense model: a head whose value rows are zero adds nothing to the output projection."""
    with torch.no_grad():
        for h in heads:
            linear.weight[h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
            linear.bias[h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0


def test_groups_are_found_and_named(bert, tokens, vit, image):
    names = [g.name for g in tg.list_groups(bert, tokens, graph.list_groups(bert, tokens))]
    assert names == ["heads:encoder.layer.0.attention.self", "heads:encoder.layer.1.attention.self",
                     "mlp:encoder.layer.0.intermediate.dense", "mlp:encoder.layer.1.intermediate.dense",
                     "depth:encoder.layer"]
    groups = {g.name: g for g in tg.list_groups(vit, image, graph.list_groups(vit, image))}
    assert set(groups) == {"heads:encoder.layers.encoder_layer_0.self_attention",
                           "heads:encoder.layers.encoder_layer_1.self_attention",
                           "mlp:encoder.layers.encoder_layer_0.mlp.0", "mlp:encoder.layers.encoder_layer_1.mlp.0",
                           "depth:encoder.layers"}
    assert groups["heads:encoder.layers.encoder_layer_0.self_attention"].channels == 4
    assert groups["depth:encoder.layers"].channels == 2
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    assert tg.list_groups(cnn, image, graph.list_groups(cnn, image)) == []


def test_bert_heads_removed_equal_the_dense_model_with_those_heads_silenced(bert, tokens):
    group = "heads:encoder.layer.0.attention.self"
    pruned = tg.apply(bert, {}, tokens, removed={group: [1, 3]})[0]
    attention = pruned.encoder.layer[0].attention
    assert (attention.self.num_attention_heads, attention.self.all_head_size) == (2, 16)
    assert attention.self.query.out_features == attention.self.key.out_features == 16
    assert attention.output.dense.in_features == 16
    silenced = copy.deepcopy(bert)
    zero_value_rows(silenced.encoder.layer[0].attention.self.value, [1, 3])
    torch.testing.assert_close(hidden(pruned, tokens), hidden(silenced, tokens), rtol=1e-5, atol=1e-6)
    # a different pair of heads gives a different model: the check can fail
    other = copy.deepcopy(bert)
    zero_value_rows(other.encoder.layer[0].attention.self.value, [0, 2])
    assert not torch.allclose(hidden(pruned, tokens), hidden(other, tokens), atol=1e-4)
    assert bert.encoder.layer[0].attention.self.num_attention_heads == 4  # the dense model is untouched


def test_vit_heads_removed_equal_the_dense_model_with_those_heads_silenced(vit, image):
    group = "heads:encoder.layers.encoder_layer_0.self_attention"
    pruned = tg.apply(vit, {}, image, removed={group: [1, 3]})[0]
    attention = pruned.encoder.layers[0].self_attention
    assert isinstance(attention, tg.PrunedMultiheadAttention) and attention.num_heads == 2
    assert attention.q_proj.out_features == 16 and attention.out_proj.in_features == 16
    assert attention.embed_dim == 32
    silenced = copy.deepcopy(vit)
    dense_attention = tg.PrunedMultiheadAttention.from_torch(vit.encoder.layers[0].self_attention)
    silenced.encoder.layers[0].self_attention = dense_attention
    with torch.no_grad():
        torch.testing.assert_close(silenced(image), vit(image), rtol=1e-5, atol=1e-6)  # the replacement is exact
        zero_value_rows(dense_attention.v_proj, [1, 3])
        torch.testing.assert_close(pruned(image), silenced(image), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(pruned(image), vit(image), atol=1e-4)


def test_replacement_attention_matches_torch_with_weights_masks_and_sequence_first():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=False).eval()
    ours = tg.PrunedMultiheadAttention.from_torch(mha).eval()
    x = torch.randn(5, 2, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        for kwargs in ({"need_weights": False}, {"need_weights": True}, {"key_padding_mask": pad}):
            expected, expected_w = mha(x, x, x, **kwargs)
            got, got_w = ours(x, x, x, **kwargs)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            if expected_w is not None:
                torch.testing.assert_close(got_w, expected_w, rtol=1e-5, atol=1e-6)


def test_heads_by_ratio_remove_the_smallest_whole_heads(bert, tokens):
    group = "heads:encoder.layer.1.attention.self"
    attention = tg.find_attention(bert)["encoder.layer.1.attention.self"]
    with torch.no_grad():  # make heads 0 and 2 clearly the least important
        for proj in attention.projections()[:3]:
            proj.weight[0:HEAD_DIM] *= 0.01
            proj.weight[2 * HEAD_DIM:3 * HEAD_DIM] *= 0.01
    _, _, removed = tg.apply(bert, {group: 0.5}, tokens)
    assert removed == {group: [0, 2]}
    assert tg.count_removed(0.75, 4) == 3 and tg.count_removed(0.99, 4) == 3  # at least one head is kept
    assert tg.count_removed(0.1, 4) == 0 and tg.count_removed(0.125, 4) == 1  # whole heads, half rounds up


def test_depth_drop_equals_skipping_the_blocks(bert, tokens, vit, image):
    pruned, _, removed = tg.apply(bert, {"depth:encoder.layer": 0.5}, tokens)
    scores, returns_tuple = tg.block_importance(bert, ["encoder.layer.0", "encoder.layer.1"], tokens)
    dropped = removed["depth:encoder.layer"]
    assert dropped == [int(scores.argmin())]  # the block with the smallest residual update goes
    skipped = copy.deepcopy(bert)
    skipped.encoder.layer = nn.ModuleList([b for i, b in enumerate(skipped.encoder.layer) if i not in dropped])
    torch.testing.assert_close(hidden(pruned, tokens), hidden(skipped, tokens))
    assert not torch.allclose(hidden(pruned, tokens), hidden(bert, tokens), atol=1e-4)

    pruned = tg.apply(vit, {}, image, removed={"depth:encoder.layers": [0]})[0]
    assert isinstance(pruned.encoder.layers[0], tg.SkippedBlock)
    skipped = copy.deepcopy(vit)
    skipped.encoder.layers = nn.Sequential(skipped.encoder.layers[1])
    with torch.no_grad():
        torch.testing.assert_close(pruned(image), skipped(image))


def test_a_dropped_block_takes_its_heads_and_mlp_groups_with_it(bert, tokens):
    plan = PruningPlan(ratios={"depth:encoder.layer": 0.5, "heads:encoder.layer.0.attention.self": 0.5,
                               "heads:encoder.layer.1.attention.self": 0.5,
                               "mlp:encoder.layer.0.intermediate.dense": 0.5,
                               "mlp:encoder.layer.1.intermediate.dense": 0.5})
    model, plan, _ = apply_plan(bert, plan, tokens)
    kept = 1 - plan.removed["depth:encoder.layer"][0]
    assert set(plan.removed) == {"depth:encoder.layer", f"heads:encoder.layer.{kept}.attention.self"}
    layer = model.encoder.layer[kept]
    assert layer.attention.self.num_attention_heads == 2 and layer.intermediate.dense.out_features == 32
    assert hidden(model, tokens).shape == (2, 8, 32)


def test_mlp_width_prunes_through_torch_pruning_and_exports(vit, image, tmp_path):
    plan = PruningPlan(ratios={"mlp:encoder.layers.encoder_layer_0.mlp.0": 0.5,
                               "mlp:encoder.layers.encoder_layer_1.mlp.0": 0.25}, round_to=8)
    model, plan, _ = apply_plan(vit, plan, image[:1])
    assert [b.mlp[0].out_features for b in model.encoder.layers] == [32, 48]
    assert [b.mlp[3].in_features for b in model.encoder.layers] == [32, 48]
    assert plan.history and not plan.removed  # the engine pruned it, and its history replays it
    path = to_onnx(model, (1, 3, 32, 32), tmp_path / "vit.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(image[:1]).numpy()
    np.testing.assert_allclose(session.run(None, {"input": image[:1].numpy()})[0], expected, rtol=1e-4, atol=1e-5)


class LastHidden(nn.Module):
    """A text encoder's embedding output, called with input ids and attention mask (ONNX takes two inputs)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def test_pruned_bert_and_vit_export_to_onnx_equal_to_pytorch(bert, tokens, vit, image, tmp_path):
    bert_plan = PruningPlan(ratios={"heads:encoder.layer.0.attention.self": 0.5,
                                    "heads:encoder.layer.1.attention.self": 0.25,
                                    "mlp:encoder.layer.1.intermediate.dense": 0.5,
                                    "depth:encoder.layer": 0.0}, round_to=8)
    model = LastHidden(apply_plan(bert, bert_plan, tokens)[0]).eval()
    path = tmp_path / "bert.onnx"
    with torch.no_grad():
        torch.onnx.export(model, tokens, str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False)
        expected = model(*tokens).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": tokens[0].numpy(), "attention_mask": tokens[1].numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    vit_plan = PruningPlan(ratios={"heads:encoder.layers.encoder_layer_0.self_attention": 0.75,
                                   "depth:encoder.layers": 0.5})
    model = apply_plan(vit, vit_plan, image[:1])[0]
    path = to_onnx(model, (1, 3, 32, 32), tmp_path / "vit.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(image[:1]).numpy()
    np.testing.assert_allclose(session.run(None, {"input": image[:1].numpy()})[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["bert", "vit"])
def test_plan_json_round_trip_replays_the_identical_model(which, bert, tokens, vit, image):
    if which == "bert":
        dense, example = bert, tokens
        ratios = {"heads:encoder.layer.0.attention.self": 0.5, "heads:encoder.layer.1.attention.self": 0.75,
                  "mlp:encoder.layer.0.intermediate.dense": 0.5, "depth:encoder.layer": 0.0}
    else:
        dense, example = vit, image[:1]
        ratios = {f"{kind}:encoder.layers.encoder_layer_{i}.{module}": 0.5 for i in (0, 1)
                  for kind, module in (("heads", "self_attention"), ("mlp", "mlp.0"))}
        ratios["depth:encoder.layers"] = 0.5  # one block dropped: its heads and MLP go with it
    model, plan, _ = apply_plan(dense, PruningPlan(ratios=ratios, round_to=8), example)
    assert plan.removed
    stored = json.loads(plan.to_json())["removed"]
    replayed = replay_plan(dense, PruningPlan.from_json(plan.to_json()), example)
    assert stored == plan.removed
    assert str(replayed) == str(model)
    a, b = model.state_dict(), replayed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the record is what replays: other heads recorded give another model
    other = dict(plan.removed)
    heads = next(k for k in other if k.startswith("heads:"))
    other[heads] = sorted((h + 1) % 4 for h in other[heads])
    changed = replay_plan(dense, PruningPlan.from_json(json.dumps({**json.loads(plan.to_json()), "removed": other})),
                          example)
    c = changed.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_patterns_select_transformer_groups_only_by_their_kind(vit, image, bert, tokens):
    channel = graph.list_groups(vit, image, ["heads.head"])
    structure = tg.list_groups(vit, image, graph.list_groups(vit, image))
    space = parse_search_space({"prunable": ["heads:*", "mlp:*"], "ignore": ["heads:*encoder_layer_1*"]}, "t", "t")
    names = [g.name for g in tg.select(space, channel, structure)]
    assert names == ["heads:encoder.layers.encoder_layer_0.self_attention",
                     "mlp:encoder.layers.encoder_layer_0.mlp.0", "mlp:encoder.layers.encoder_layer_1.mlp.0"]
    # "*" keeps meaning the channel groups; a channel group that shares a module with a chosen group steps aside
    everything = parse_search_space({"prunable": ["*"]}, "all", "all")
    assert not any(tg.kind_of(g.name) for g in tg.select(everything, channel, structure))
    both = parse_search_space({"prunable": ["*", "mlp:*"]}, "both", "both")
    chosen = [g.name for g in tg.select(both, channel, structure)]
    assert "mlp:encoder.layers.encoder_layer_0.mlp.0" in chosen
    assert "encoder.layers.encoder_layer_0.mlp.0" not in chosen
    # heads cut q/k/v rows and the output projection's columns; the hidden width (rooted at the last MLP output,
    # reaching every attention module) cuts their other side, so it stays beside them
    with_heads = [g.name for g in tg.select(parse_search_space({"prunable": ["*", "heads:*"]}, "h", "h"), channel,
                                            structure)]
    assert "encoder.layers.encoder_layer_1.mlp.3" in with_heads
    assert "heads:encoder.layers.encoder_layer_1.self_attention" in with_heads
    # BERT: torch-pruning's group of the value rows (query, key, value, output projection) would break heads
    bert_channel = graph.list_groups(bert, tokens)
    assert "encoder.layer.0.attention.self.value" in [g.name for g in bert_channel]
    chosen = [g.name for g in tg.select(parse_search_space({"prunable": ["*", "heads:*"]}, "h", "h"), bert_channel,
                                        tg.list_groups(bert, tokens, bert_channel))]
    assert "encoder.layer.0.attention.self.value" not in chosen and "heads:encoder.layer.0.attention.self" in chosen


TINY_VIT_SOURCE = '''
import torch.nn as nn
from torchvision.models import VisionTransformer


def vit():
    """A tiny ViT for 1x8x8 digits: 2x2 patches, 2 blocks of 4 heads, 10 classes."""
    model = VisionTransformer(image_size=8, patch_size=2, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    model.conv_proj = nn.Conv2d(1, 32, kernel_size=2, stride=2)
    return model


def cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
'''


@pytest.fixture
def tiny_vit_factory(tmp_path, monkeypatch):
    name = "hwprune_test_tiny_vit"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TINY_VIT_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.slow
def test_search_on_a_tiny_vit_with_the_transformer_space_through_the_cli(tiny_vit_factory, tmp_path):
    from conftest import FAST_PROFILE_YAML
    from hwprune.cli import main

    (tmp_path / "fast-cpu.yaml").write_text(FAST_PROFILE_YAML)
    out = tmp_path / "run"
    args = ["search", "--model", f"{tiny_vit_factory}:vit", "--data", "digits", "--search-space", "transformer",
            "--profile", str(tmp_path / "fast-cpu.yaml"), "--trials", "3", "--out", str(out), "--no-progress",
            "--verify-rounds", "0"]
    assert main(args) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and (trials.state == "complete").all() and trials.accuracy.between(0, 1).all()
    plans = [PruningPlan.from_json(p) for p in trials.plan]
    assert all(set(p.ratios) == {"heads:encoder.layers.encoder_layer_0.self_attention",
                                 "heads:encoder.layers.encoder_layer_1.self_attention",
                                 "mlp:encoder.layers.encoder_layer_0.mlp.0", "mlp:encoder.layers.encoder_layer_1.mlp.0"}
               for p in plans)
    pruned = trials[trials.plan_summary != "dense"]
    dense = trials[trials.plan_summary == "dense"].iloc[0]
    assert (pruned.macs < dense.macs).all()
    # every exported front model runs in ONNX Runtime as in PyTorch, and its architecture is the plan's
    front = pd.read_csv(out / "pareto.csv")
    x = torch.randn(1, 1, 8, 8)
    for t in front.trial:
        folder = out / "models" / f"trial-{t}"
        model = torch.load(folder / "model.pt", weights_only=False).eval()
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0],
                                       model(x).numpy(), rtol=1e-4, atol=1e-5)
        plan = PruningPlan.from_json(trials[trials.trial == t].iloc[0].plan)
        for group, heads in plan.removed.items():
            attention = model.get_submodule(tg.module_of(group))
            assert attention.num_heads == 4 - len(heads)
    # `hwprune export` rebuilds the front from the stored plans: the same models
    assert main(["export", "--run", str(out), "--pareto", "--out", str(tmp_path / "exported")]) == 0
    for t in front.trial:
        again = torch.load(tmp_path / "exported" / f"trial-{t}" / "model.pt", weights_only=False).eval()
        first = torch.load(out / "models" / f"trial-{t}" / "model.pt", weights_only=False).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(x), first(x))


def test_a_transformer_pattern_on_a_model_without_attention_is_one_clear_error(tiny_vit_factory):
    from hwprune.workload import build_workload

    space = parse_search_space({"prunable": ["heads:*"]}, "heads", "heads.yaml")
    with pytest.raises(ConfigError, match=r"heads.yaml: prunable pattern 'heads:\*' matches no layer"):
        build_workload(f"{tiny_vit_factory}:cnn", "none", space, input_shape=(1, 8, 8), log=lambda _: None)
    vit_workload = build_workload(f"{tiny_vit_factory}:vit", "none", space, input_shape=(1, 8, 8), log=lambda _: None)
    assert [g.name for g in vit_workload.groups] == ["heads:encoder.layers.encoder_layer_0.self_attention",
                                                     "heads:encoder.layers.encoder_layer_1.self_attention"]


def test_attention_counts_the_same_macs_before_and_after_the_exact_replacement(vit, image):
    from hwprune.costs import count_macs

    replaced = copy.deepcopy(vit)
    for block in replaced.encoder.layers:
        block.self_attention = tg.PrunedMultiheadAttention.from_torch(block.self_attention)
    # nn.MultiheadAttention's fused inference op would count as zero MACs: the dense model must not look cheaper
    assert count_macs(vit, image[:1]) == count_macs(replaced, image[:1])
    fewer = tg.apply(vit, {"heads:encoder.layers.encoder_layer_0.self_attention": 0.5}, image[:1])[0]
    assert count_macs(fewer, image[:1]) < count_macs(vit, image[:1])


def tiny_window_models():
    from torchvision.models import MaxVit, SwinTransformer
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    swin = dict(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[2, 2], num_classes=10)
    return {
        "swin": SwinTransformer(**swin),
        "swin_v2": SwinTransformer(**swin, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2),
        "maxvit": MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                         block_layers=[2, 2], head_dim=4, stochastic_depth_prob=0.0, num_classes=10),
    }


@pytest.mark.parametrize("which", ["swin", "swin_v2", "maxvit"])
def test_window_attention_heads_removed_equal_those_heads_silenced(which, image, tmp_path):
    torch.manual_seed(0)
    model = tiny_window_models()[which].eval()
    groups = {g.name: g for g in tg.list_groups(model, image, [])}  # heads and depth need no channel tracing
    group = max((g for g in groups if g.startswith("heads:")), key=lambda g: groups[g].channels)  # the widest
    heads = groups[group].channels
    pruned = tg.apply(model, {}, image, removed={group: [1]})[0]
    attention = pruned.get_submodule(tg.module_of(group))
    assert type(attention).__name__.startswith("HeadPruned")
    assert getattr(attention, "num_heads", getattr(attention, "n_heads", None)) == heads - 1
    table = getattr(attention, "relative_position_bias_table", None)
    if which == "swin_v2":
        assert attention.cpb_mlp[-1].out_features == heads - 1 and attention.logit_scale.shape[0] == heads - 1
    else:
        assert table.shape[1] == heads - 1  # one bias column per kept head
    # the same forward with every head kept is exact; then the pruned model == the dense one with head 1 silenced
    silenced = tg.apply(model, {}, image, removed={group: []})[0]
    with torch.no_grad():
        torch.testing.assert_close(silenced(image), model(image), rtol=1e-5, atol=1e-6)
    found = tg.find_attention(silenced)[tg.module_of(group)]
    packed = getattr(found.module, found._linears[0])
    d = found.head_dim
    with torch.no_grad():
        packed.weight[2 * heads * d + d:2 * heads * d + 2 * d] = 0  # the value rows of head 1
        packed.bias[2 * heads * d + d:2 * heads * d + 2 * d] = 0
        torch.testing.assert_close(pruned(image), silenced(image), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(pruned(image), model(image), atol=1e-5)
    # saved whole and loaded in a fresh process (the pruned attention class is found by name), and to ONNX
    torch.save(pruned, tmp_path / "model.pt")
    torch.save(image[:1], tmp_path / "x.pt")
    import subprocess

    code = ("import torch; m = torch.load('model.pt', weights_only=False).eval(); x = torch.load('x.pt'); "
            "print(type(m.get_submodule(%r)).__name__); torch.save(m(x), 'y.pt')" % tg.module_of(group))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(tg.__file__).parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = pruned(image[:1])
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected)
    path = to_onnx(pruned, (1, 3, 32, 32), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": image[:1].numpy()})[0], expected.numpy(), rtol=1e-4,
                               atol=1e-5)


def test_swin_blocks_drop_within_their_stage(image):
    torch.manual_seed(0)
    model = tiny_window_models()["swin"].eval()
    names = [g.name for g in tg.list_groups(model, image, [])]
    assert "depth:features.1" in names and "depth:features.3" in names
    pruned, _, removed = tg.apply(model, {"depth:features.3": 0.5}, image)
    (dropped,) = removed["depth:features.3"]
    skipped = copy.deepcopy(model)
    skipped.features[3] = nn.Sequential(*[b for i, b in enumerate(skipped.features[3]) if i != dropped])
    with torch.no_grad():
        torch.testing.assert_close(pruned(image), skipped(image))


def test_maxvit_drops_attention_layers_but_never_a_downsampling_block(image):
    torch.manual_seed(0)
    model = tiny_window_models()["maxvit"].eval()
    groups = {g.name: g for g in tg.list_groups(model, image, []) if g.name.startswith("depth:")}
    # each MaxViT layer: MBConv (strided in a stage's first layer), window attention, grid attention
    assert groups["depth:blocks.0.layers.0.layers"].members == ("blocks.0.layers.0.layers.window_attention",
                                                               "blocks.0.layers.0.layers.grid_attention")
    pruned, _, removed = tg.apply(model, {"depth:blocks.1.layers.0.layers": 0.5}, image)
    (dropped,) = removed["depth:blocks.1.layers.0.layers"]
    assert dropped in (1, 2)  # a position among all the list's children: the MBConv (0) is never a candidate
    skipped = copy.deepcopy(model)
    skipped.blocks[1].layers[0].layers[dropped] = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(pruned(image), skipped(image))
