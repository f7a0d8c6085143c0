"""Dependency-graph pruning: coupled groups, physical shapes, round_to, replay, the classifier's outputs."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from hwprune import graph
from hwprune.errors import ModelError

from conftest import make_tiny_net


def _conv(model, name):
    return dict(model.named_modules())[name]


def _prune_all(model, x, ratio, ignored=("fc",), **kw):
    groups = graph.list_groups(model, x, ignored)
    return graph.prune_groups(model, x, {g.name: ratio for g in groups}, ignored=ignored, **kw)


def test_demonet_groups_couple_the_residual_chains(tiny_net, example_input):
    groups = {g.name: g for g in graph.list_groups(tiny_net, example_input, ignored=("fc",))}
    # one group per block-internal conv plus one per residual chain (stem + layer1, layer2, layer3)
    assert sorted(groups) == sorted([
        "stem.0", "layer1.0.conv1", "layer1.1.conv1",
        "layer2.0.conv1", "layer2.0.downsample.0", "layer2.1.conv1",
        "layer3.0.conv1", "layer3.0.downsample.0", "layer3.1.conv1",
    ])
    # the stem's outputs are added to both layer1 blocks' outputs: one coupled group
    assert {"stem.0", "layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv1"} <= set(groups["stem.0"].members)
    assert {"layer2.0.conv2", "layer2.1.conv2", "layer3.0.conv1"} <= set(groups["layer2.0.downsample.0"].members)
    # the last chain feeds the classifier's inputs
    assert "fc" in groups["layer3.0.downsample.0"].members
    assert groups["stem.0"].channels == 8 and groups["layer3.1.conv1"].channels == 16
    assert "fc" not in groups  # the classifier never loses outputs


def test_demonet_pruned_residual_chain_channels_equal(tiny_net, example_input):
    pruned, history = _prune_all(tiny_net, example_input, 0.5)
    c = graph.channel_counts(pruned)
    assert c["stem.0"] == c["layer1.0.conv2"] == c["layer1.1.conv2"] == 4
    assert _conv(pruned, "layer2.0.conv1").in_channels == 4 and _conv(pruned, "layer2.0.downsample.0").in_channels == 4
    assert c["layer2.0.conv2"] == c["layer2.0.downsample.0"] == c["layer2.1.conv2"] == 8
    assert c["layer3.0.conv2"] == c["layer3.0.downsample.0"] == c["layer3.1.conv2"] == 8
    assert c["layer1.0.conv1"] == 4 and c["layer3.1.conv1"] == 8
    assert pruned.fc.in_features == 8 and pruned.fc.out_features == 10
    # BN layers follow their convs
    assert _conv(pruned, "layer1.0.bn2").num_features == 4 and _conv(pruned, "stem.1").num_features == 4
    with torch.no_grad():
        assert pruned(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in tiny_net.parameters())
    json.dumps(history)  # plans store it as JSON


def test_prune_does_not_touch_the_input_model(tiny_net, example_input):
    before = copy.deepcopy(tiny_net.state_dict())
    _prune_all(tiny_net, example_input, 0.5)
    after = tiny_net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_resnet18_groups_and_pruned_shapes():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = graph.list_groups(model, x, ignored=("fc",))
    assert len(groups) == 12  # 4 chains + 8 block-internal convs
    pruned, _ = graph.prune_groups(model, x, {g.name: 0.5 for g in groups}, ignored=("fc",))
    c = graph.channel_counts(pruned)
    assert c["conv1"] == c["layer1.0.conv2"] == c["layer1.1.conv2"] == 32
    for stage, width in ((2, 64), (3, 128), (4, 256)):
        names = [f"layer{stage}.0.conv2", f"layer{stage}.0.downsample.0", f"layer{stage}.1.conv2"]
        assert {c[n] for n in names} == {width}
        assert c[f"layer{stage}.0.conv1"] == c[f"layer{stage}.1.conv1"] == width
    assert pruned.fc.in_features == 256 and pruned.fc.out_features == 10
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5, 0.6, 0.8])
def test_round_to_leaves_multiples(tiny_net, example_input, ratio):
    pruned, _ = _prune_all(tiny_net, example_input, ratio, round_to=4)
    dense = graph.channel_counts(tiny_net)
    for name, n in graph.channel_counts(pruned).items():
        if name == "fc":
            assert n == 10
            continue
        # the channels asked for, rounded down to a multiple of 4, but never below 4
        assert n == max(4, int(dense[name] * (1 - ratio)) // 4 * 4), (name, n)


def test_larger_ratio_never_leaves_a_layer_wider(tiny_net, example_input):
    """Regression: torch-pruning pruned nothing when rounding down left 0 channels (8 channels, round_to 4: ratio
    0.5 kept 4 but 0.6 kept all 8; 16 channels at 0.8 kept all 16)."""
    previous = graph.channel_counts(tiny_net)
    for ratio in (0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9):
        counts = graph.channel_counts(_prune_all(tiny_net, example_input, ratio, round_to=4)[0])
        assert all(counts[k] <= previous[k] for k in counts), (ratio, counts, previous)
        previous = counts
    assert previous["stem.0"] == 4 and previous["layer3.1.conv1"] == 4


def test_round_to_not_below_a_layers_width(example_input):
    """A group no wider than round_to cannot lose channels and keep a multiple: it stays as it is."""
    net = make_tiny_net()
    pruned, _ = _prune_all(net, example_input, 0.5, round_to=8)
    c = graph.channel_counts(pruned)
    assert c["stem.0"] == 8 and c["layer1.0.conv1"] == 8 and c["layer2.1.conv1"] == 8


def test_without_round_to_the_ratio_is_followed(tiny_net, example_input):
    pruned, _ = _prune_all(tiny_net, example_input, 0.25)
    dense = graph.channel_counts(tiny_net)
    for name, n in graph.channel_counts(pruned).items():
        if name != "fc":
            assert n == dense[name] - int(dense[name] * 0.25), (name, n)


def test_ratio_zero_and_partial_plans(tiny_net, example_input):
    same, history = graph.prune_groups(tiny_net, example_input, {"layer1.0.conv1": 0.0}, ignored=("fc",))
    assert history == [] and graph.channel_counts(same) == graph.channel_counts(tiny_net)
    one, _ = graph.prune_groups(tiny_net, example_input, {"layer2.1.conv1": 0.5}, ignored=("fc",))
    c, d = graph.channel_counts(one), graph.channel_counts(tiny_net)
    assert c["layer2.1.conv1"] == 8 and _conv(one, "layer2.1.conv2").in_channels == 8
    assert {k: v for k, v in c.items() if k != "layer2.1.conv1"} == {k: v for k, v in d.items() if k != "layer2.1.conv1"}


def test_replay_gives_identical_architecture_weights_and_outputs(tiny_net, example_input):
    pruned, history = _prune_all(tiny_net, example_input, 0.5, round_to=4)
    fresh = make_tiny_net()  # the same dense model, built again
    history = json.loads(json.dumps(history))  # as stored with a trial
    rebuilt = graph.replay(fresh, example_input, history)
    assert graph.channel_counts(rebuilt) == graph.channel_counts(pruned)
    a, b = pruned.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x), rtol=0, atol=0)


def test_pruned_equals_dense_with_removed_channels_masked():
    """Closed form: removing channels after a ReLU equals zeroing them in the dense model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():  # filters 1 and 4 are by far the largest: l1 keeps them
        net[0].weight.mul_(0.01)
        net[0].weight[[1, 4]] *= 1000
        net[2].weight.fill_(0.1)  # no help from the next layer's input weights in the group's score
    x = torch.randn(2, 2, 5, 5)
    pruned, history = graph.prune_groups(net, x, {"0": 4 / 6, "2": 0.0}, ignored=("6",))
    assert pruned[0].out_channels == 2 and pruned[2].in_channels == 2
    removed = {i for name, is_out, idxs in history if name == "0" and is_out for i in idxs}
    assert removed == {0, 2, 3, 5}
    torch.testing.assert_close(pruned[0].weight, net[0].weight[[1, 4]])
    mask = torch.zeros(1, 6, 1, 1)
    mask[0, [1, 4]] = 1
    h = net[1].register_forward_hook(lambda m, i, o: o * mask)
    with torch.no_grad():
        expected = net(x)
    h.remove()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected)


def test_ignored_classifier_keeps_outputs_even_when_asked(tiny_net, example_input):
    pruned, _ = graph.prune_groups(tiny_net, example_input, {"fc": 0.5, "layer3.1.conv1": 0.5}, ignored=("fc",))
    assert pruned.fc.out_features == 10 and pruned.layer3[1].conv1.out_channels == 8


def test_unknown_layer_in_ratios(tiny_net, example_input):
    with pytest.raises(ModelError, match="layer9.conv"):
        graph.prune_groups(tiny_net, example_input, {"layer9.conv": 0.5})


def test_taylor_needs_calibration_and_works_with_it(tiny_net, example_input):
    with pytest.raises(ModelError, match="calibration"):
        graph.prune_groups(tiny_net, example_input, {"layer1.0.conv1": 0.5}, criterion="taylor", ignored=("fc",))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    pruned, _ = graph.prune_groups(tiny_net, example_input, {"layer1.0.conv1": 0.5}, criterion="taylor",
                                   ignored=("fc",), calibration=(x, y))
    assert pruned.layer1[0].conv1.out_channels == 4
    assert all(p.grad is None for p in pruned.parameters())
    assert all(p.grad is None for p in tiny_net.parameters())


def test_unknown_criterion(tiny_net, example_input):
    with pytest.raises(ModelError, match="unknown importance criterion 'l7'"):
        graph.prune_groups(tiny_net, example_input, {"layer1.0.conv1": 0.5}, criterion="l7")


def test_untraceable_model_is_a_model_error():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(ModelError, match="could not trace"):
        graph.list_groups(Weird(), torch.randn(1, 1, 8, 8))
