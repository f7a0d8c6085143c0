"""Costs in closed form (MACs, params, bytes) and ONNX export that ONNX Runtime runs with PyTorch's numbers."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from hwprune import graph
from hwprune.costs import count_bytes, count_macs, count_params, measure_costs
from hwprune.errors import ModelError
from hwprune.export import save_torch, to_onnx


@pytest.mark.parametrize(
    "conv, hw, out_hw",
    [
        (nn.Conv2d(3, 8, 3, padding=1), 10, 10),
        (nn.Conv2d(3, 8, 3), 10, 8),
        (nn.Conv2d(4, 6, 5, stride=2, padding=2, bias=False), 9, 5),
        (nn.Conv2d(4, 8, 3, groups=2), 7, 5),
        (nn.Conv2d(6, 6, 3, padding=1, groups=6), 6, 6),  # depthwise
    ],
)
def test_conv_macs_closed_form(conv, hw, out_hw):
    x = torch.randn(1, conv.in_channels, hw, hw)
    kh, kw = conv.kernel_size
    expected = conv.out_channels * out_hw * out_hw * (conv.in_channels // conv.groups) * kh * kw
    assert count_macs(conv, x) == expected


def test_linear_macs_and_batch():
    lin = nn.Linear(20, 7)
    assert count_macs(lin, torch.randn(1, 20)) == 20 * 7
    assert count_macs(lin, torch.randn(3, 20)) == 3 * 20 * 7


def test_sequential_macs_add_up():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(1, 1, 6, 6)
    assert count_macs(net, x) == 4 * 36 * 9 + 144 * 5


def test_params_and_bytes_closed_form():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(5, 2, bias=False))
    params = (8 * 3 * 9 + 8) + (8 + 8) + 10
    assert count_params(net) == params
    # fp32 parameters + BN running mean/var; the int64 num_batches_tracked is not part of the deployed model
    assert count_bytes(net) == 4 * (params + 8 + 8)
    half = nn.Linear(4, 4).half()
    assert count_bytes(half) == 2 * (16 + 4)


def test_measure_costs_of_pruned_model_is_smaller(tiny_net, example_input):
    dense = measure_costs(tiny_net, example_input)
    assert dense.params == count_params(tiny_net) and dense.macs == count_macs(tiny_net, example_input)
    groups = graph.list_groups(tiny_net, example_input, ("fc",))
    pruned, _ = graph.prune_groups(tiny_net, example_input, {g.name: 0.5 for g in groups}, ignored=("fc",))
    small = measure_costs(pruned, example_input)
    # every conv loses half its inputs and half its outputs (except the stem's input): about a quarter remains
    assert 0.2 * dense.macs < small.macs < 0.3 * dense.macs
    assert small.params < dense.params and small.bytes < dense.bytes
    assert set(small.to_dict()) == {"macs", "params", "bytes"}


def _ort(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    return inp, sess.run(None, {inp.name: x.numpy()})[0]


def test_onnx_export_of_pruned_model_matches_pytorch(tmp_path, tiny_net, example_input):
    groups = graph.list_groups(tiny_net, example_input, ("fc",))
    pruned, _ = graph.prune_groups(tiny_net, example_input, {g.name: 0.5 for g in groups}, round_to=4,
                                   ignored=("fc",))
    path = to_onnx(pruned, (3, 1, 8, 8), tmp_path / "sub" / "pruned.onnx")
    assert path.is_file()
    x = torch.randn(3, 1, 8, 8)
    inp, y = _ort(path, x)
    assert list(inp.shape) == [3, 1, 8, 8]  # exported at exactly the measured shape
    with torch.no_grad():
        ref = pruned(x).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    # and the pruned graph really is smaller: its first conv has 4 filters
    import onnx

    m = onnx.load(str(path))
    shapes = {i.name: tuple(i.dims) for i in m.graph.initializer}
    assert any(s[:2] == (4, 1) and len(s) == 4 for s in shapes.values())
    assert not any(s[:2] == (8, 1) and len(s) == 4 for s in shapes.values())


def test_save_torch_round_trip(tmp_path, tiny_net, example_input):
    groups = graph.list_groups(tiny_net, example_input, ("fc",))
    pruned, _ = graph.prune_groups(tiny_net, example_input, {g.name: 0.5 for g in groups}, ignored=("fc",))
    path = save_torch(pruned, tmp_path / "out" / "model.pt")
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(example_input), pruned(example_input))


def test_export_failure_is_a_model_error(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot run\nsecond line")

    with pytest.raises(ModelError) as e:
        to_onnx(Broken(), (1, 3), tmp_path / "b.onnx")
    assert "ONNX export failed" in str(e.value) and "cannot run" in str(e.value) and "\n" not in str(e.value)
