"""Architecture adapters (hwprune/adapters): tiny torchvision ViT, Swin v1/v2, MaxViT and ShuffleNetV2 prune at 0.3
through hwprune.graph, run forward, export to ONNX that ONNX Runtime runs and that matches PyTorch, and replaying
the pruning history rebuilds the same model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from hwprune import graph
from hwprune.adapters import auto_ignored, fixup_after_pruning
from hwprune.export import to_onnx


def tiny_vit():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initialises it: outputs would all be 0
    return model, 32


def tiny_swin(v2: bool = False):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           stochastic_depth_prob=0.0, num_classes=10, **extra), 32


def tiny_maxvit():
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=8, partition_size=2, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10), 64


def tiny_shufflenet():
    from torchvision.models import shufflenet_v2_x0_5

    return shufflenet_v2_x0_5(num_classes=10), 64


MODELS = {
    "vit": tiny_vit,
    "swin": tiny_swin,
    "swin_v2": lambda: tiny_swin(v2=True),
    "maxvit": tiny_maxvit,
    "shufflenet_v2": tiny_shufflenet,
}


def _build(name):
    torch.manual_seed(0)
    model, size = MODELS[name]()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model.eval(), x


def _prune(model, x, ratio=0.3):
    """The workload's path: list the groups (classifier kept), then prune every one at ``ratio``."""
    classifier = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    groups = graph.list_groups(model, x, classifier)
    assert groups, "no prunable group"
    return graph.prune_groups(model, x, {g.name: ratio for g in groups}, ignored=classifier), groups


@pytest.mark.parametrize("name", list(MODELS))
def test_prunes_runs_exports_and_replays(name, tmp_path):
    import onnxruntime as ort

    model, x = _build(name)
    params = sum(p.numel() for p in model.parameters())
    (pruned, history), groups = _prune(model, x)
    assert sum(p.numel() for p in pruned.parameters()) < params, "nothing was removed"
    with torch.no_grad():
        y = pruned(x)
    assert y.shape == (1, 10) and torch.isfinite(y).all() and y.abs().max() > 0

    path = to_onnx(pruned, tuple(x.shape), tmp_path / f"{name}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y_ort,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(y_ort, y.numpy(), rtol=1e-4, atol=1e-5)

    replayed = graph.replay(model, x, history)
    assert graph.channel_counts(replayed) == graph.channel_counts(pruned)
    with torch.no_grad():
        torch.testing.assert_close(replayed(x), y)


def test_vit_width_drops_equally_in_every_head():
    model, x = _build("vit")
    (pruned, _), _ = _prune(model, x)
    mha = pruned.encoder.layers[0].self_attention
    assert pruned.hidden_dim == pruned.conv_proj.out_channels < 32
    assert mha.embed_dim == pruned.hidden_dim and mha.embed_dim % mha.num_heads == 0
    assert mha.head_dim == mha.embed_dim // mha.num_heads


@pytest.mark.parametrize("name, kept", [
    ("swin", "features.1.0.attn.qkv"),
    ("maxvit", "blocks.0.layers.0.layers.window_attention.attn_layer.1.to_qkv"),
    ("shufflenet_v2", "stage2.0.branch2.5"),
])
def test_ignored_layers_are_reported_and_keep_their_width(name, kept):
    model, x = _build(name)
    reasons = auto_ignored(model)
    assert kept in reasons and "torch-pruning cannot map" in reasons[kept]
    (pruned, _), groups = _prune(model, x)
    assert kept not in {g.name for g in groups}
    before, after = graph.channel_counts(model), graph.channel_counts(pruned)
    assert all(after[n] == before[n] for n in reasons), "an automatically ignored layer lost outputs"


def test_convnets_get_no_adapter():
    from torchvision.models import resnet18

    assert auto_ignored(resnet18(num_classes=10)) == {}


def test_fixup_after_pruning_is_idempotent_and_reusable():
    """What other width-changing code (e.g. transformer_groups) calls after it edits weights."""
    model, x = _build("vit")
    model.hidden_dim = 999  # stale, as after a hand-made width change
    fixup_after_pruning(fixup_after_pruning(model))
    assert model.hidden_dim == 32
    with torch.no_grad():
        assert model(x).shape == (1, 10)


def test_build_workload_reports_automatically_ignored_layers(tmp_path, monkeypatch, space_file):
    """The user's path: a model factory reference; the search never sees the groups an adapter keeps."""
    import textwrap

    (tmp_path / "tiny_swin_factory.py").write_text(textwrap.dedent('''
        from torchvision.models.swin_transformer import SwinTransformer

        def tiny():
            return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                   window_size=[4, 4], num_classes=10)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    from hwprune.workload import build_workload

    lines = []
    workload = build_workload("tiny_swin_factory:tiny", "none", str(space_file), input_shape=(3, 32, 32),
                              log=lines.append)
    names = {g.name for g in workload.groups}
    assert names and all(n.endswith(".mlp.0") for n in names)
    assert any("automatically" in ln and "Swin" in ln for ln in lines), lines


def test_swin_patch_merging_stand_in_matches_torchvision():
    """The concat torch-pruning traces (positive dim) gives torchvision's values, odd sizes padded alike."""
    import torchvision.models.swin_transformer as tv_swin

    from hwprune.adapters.swin import _patch_merging_pad_positive_dim

    x = torch.randn(2, 7, 5, 3)
    torch.testing.assert_close(_patch_merging_pad_positive_dim(x), tv_swin._patch_merging_pad(x))
