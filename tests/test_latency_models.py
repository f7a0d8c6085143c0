"""Tiny ONNX models for the latency tests (built with onnx.helper: no export, milliseconds to make), and checks
that they are what the other tests assume. Other test files import ``conv_onnx`` and ``torch_conv_net``."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def conv_onnx(path, channels: int = 8, in_channels: int = 3, layers: int = 2, seed: int = 0) -> str:
    """[N, in_channels, H, W] -> `layers` x (3x3 conv, ReLU) -> global average pool; dynamic N, H, W.
    Cost grows with channels**2, so two sizes give two models of known, different cost."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, cin = "x", in_channels
    for i in range(layers):
        w = numpy_helper.from_array((rng.standard_normal((channels, cin, 3, 3)) * 0.1).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}")
        inits += [w, b]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, cin = f"r{i}", channels
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_channels, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def torch_conv_net(channels: int = 8):
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
    )


def test_conv_onnx_runs_with_dynamic_batch(tmp_path):
    p = conv_onnx(tmp_path / "m.onnx", channels=4)
    sess = ort.InferenceSession(p, providers=["CPUExecutionProvider"])
    for n in (1, 3):
        (y,) = sess.run(None, {"x": np.ones((n, 3, 8, 8), np.float32)})
        assert y.shape == (n, 4, 1, 1)


def test_torch_export_of_two_layer_net_matches_torch(tmp_path):
    import torch

    net = torch_conv_net(4).eval()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "t.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "N"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(y, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)
