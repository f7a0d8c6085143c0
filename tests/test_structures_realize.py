"""Realized structures compute what the masked model computes, and export to ONNX Runtime unchanged."""
import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hwprune.structures import (
    GatherConv2d, SparseLinear, get_structure, prune_conv_pair, silence_branch, structure_names,
)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _ort(module, x):
    import onnxruntime as ort

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), f, input_names=["x"], output_names=["y"], dynamo=False, opset_version=17)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0]


@pytest.fixture
def pair():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def test_filter_pair_physical_equals_masked(pair):
    x = torch.randn(2, 3, 7, 7)
    a, bn, b, keep = prune_conv_pair(pair[0], pair[3], 0.5, bn=pair[1])
    phys = nn.Sequential(a, bn, nn.ReLU(), b).eval()
    masked = copy.deepcopy(pair)
    with torch.no_grad():  # masked reference: filters and their BN channels zero -> next layer sees 0 there
        m = keep.float()
        masked[0].weight.mul_(m.view(-1, 1, 1, 1)); masked[0].bias.mul_(m)
        masked[1].weight.mul_(m); masked[1].bias.mul_(m)
        assert a.weight.shape[0] == 4 and b.weight.shape[1] == 4
        _close(phys(x), masked(x))
    np.testing.assert_allclose(_ort(phys, x), masked(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_channel_single_layer_slice_equals_masked():
    from hwprune.structures import slice_in

    torch.manual_seed(1)
    conv = nn.Conv2d(6, 4, 3, padding=1)
    st = get_structure("channel")
    keep = st.mask(st.scores(conv.weight), 0.5)
    x = torch.randn(1, 6, 5, 5)
    masked, _ = st.apply(conv, 0.5)
    with torch.no_grad():
        _close(slice_in(conv, keep)(x[:, keep]), masked(x))


def test_depth_resnet18_block_equals_silenced_branch():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(num_classes=10).eval()
    x = torch.randn(1, 64, 16, 16)
    st = get_structure("depth")
    for blk, xin in ((net.layer1[1], x), (net.layer2[0], x)):  # identity shortcut, downsample shortcut
        new, rep = st.apply(blk, 1.0, in_shape=tuple(xin.shape))
        assert rep.executed == "physical" and rep.macs_effective < rep.macs_dense
        with torch.no_grad():
            _close(new(xin), silence_branch(blk).eval()(xin))
        np.testing.assert_allclose(_ort(new, xin), new(xin).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_depth_mobilenet_and_declared():
    from torchvision.models.mobilenetv2 import InvertedResidual

    st = get_structure("depth")
    ir = InvertedResidual(8, 8, 1, 2).eval()
    assert st.applies_to(ir) and not st.applies_to(InvertedResidual(8, 16, 1, 2))
    new, _ = st.apply(ir, 1.0)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        _close(new(x), silence_branch(ir).eval()(x))

    class Res(nn.Module):
        hwprune_residual = True

        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.f(x)

    new, rep = st.apply(Res(), 1.0, in_shape=(2, 4))
    assert isinstance(new, nn.Identity) and rep.weights_kept == 0


@pytest.mark.parametrize("mode", ["concat", "sum"])
@pytest.mark.parametrize("conv_kw", [dict(padding=1), dict(padding=2, stride=2), dict(padding=0, dilation=2), dict(padding=1, bias=False)])
def test_strided_gather_equals_masked_conv(mode, conv_kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, **conv_kw).eval()
    st = get_structure("strided")
    x = torch.randn(2, 6, 11, 9)
    for s in (2, 3):
        new, rep = st.apply(conv, 0.67, {"s": s, "mode": mode}, in_shape=tuple(x.shape))
        assert isinstance(new, GatherConv2d)
        w = conv.weight.detach()
        keep = st.mask(st.scores(w, "l1", {"s": s}), 0.67)
        em = st.element_mask(w, keep, st.check_params({"s": s}))
        # constraint: every filter shares the pattern of an input channel
        assert bool((em == em[:1]).all())
        ref = nn.functional.conv2d(x, w * em, conv.bias, conv.stride, conv.padding, conv.dilation)
        with torch.no_grad():
            _close(new(x), ref)
        assert rep.weights_kept < rep.weights and rep.macs_effective < rep.macs_dense
        np.testing.assert_allclose(_ort(new, x), ref.detach().numpy(), rtol=1e-4, atol=1e-4)


def test_block_linear_executes_bsr_and_matches_mask():
    torch.manual_seed(0)
    lin = nn.Linear(10, 7)  # not divisible by b: padded
    st = get_structure("block")
    new, rep = st.apply(lin, 0.6, {"b": 4}, in_shape=(3, 10))
    assert isinstance(new, SparseLinear) and rep.executed == "bsr"
    x = torch.randn(3, 10)
    with torch.no_grad():
        _close(new(x), nn.functional.linear(x, new.weight, new.bias))
        assert int((new.weight == 0).sum()) > 0
    np.testing.assert_allclose(_ort(new, x), new(x).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in structure_names() if n != "depth"])
def test_every_realized_structure_exports_to_onnx(name):
    torch.manual_seed(0)
    st = get_structure(name)
    for m, x in ((nn.Conv2d(4, 6, 3, padding=1), torch.randn(1, 4, 6, 6)), (nn.Linear(16, 8), torch.randn(2, 16))):
        if not st.applies_to(m):
            continue
        ratio = 1.0 if name == "nm" else 0.5
        new, _ = st.apply(m, ratio)
        with torch.no_grad():
            ref = new(x).numpy()
        np.testing.assert_allclose(_ort(new, x), ref, rtol=1e-4, atol=1e-4)


def test_unify_blocks_share_abs_value_and_signs():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    st = get_structure("unify")
    new, rep = st.apply(lin, 0.5, {"b": 4, "prune_share": 0.5})
    w, w0 = new.weight.detach(), lin.weight.detach()
    assert rep.extra["tiles_unified"] == 1 and rep.extra["tiles_pruned"] == 1
    n_uni = 0
    for i in range(2):
        for j in range(2):
            t, t0 = w[4 * i: 4 * i + 4, 4 * j: 4 * j + 4], w0[4 * i: 4 * i + 4, 4 * j: 4 * j + 4]
            if bool((t == 0).all()):
                continue
            if torch.allclose(t.abs(), t.abs().mean().expand_as(t)) and not torch.equal(t, t0):
                n_uni += 1
                assert bool((torch.sign(t) == torch.sign(t0)).all())
                assert torch.isclose(t.abs()[0, 0], t0.abs().mean())
    assert n_uni == 1


def test_unify_projection_zstep():
    from hwprune.structures import unify_project

    v = torch.tensor([[1.0, -1.0, 0.1, 0.1], [1.0, 2.0, 0.1, -0.1], [3.0, 1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0]])
    z = unify_project(v, 2, unify_ratio=0.25, prune_ratio=0.5)
    # smallest sum v^2: tiles (1,1) = 0 and (0,1) = 0.04 -> zero; of the rest, smallest unification error: (0,0)
    assert bool((z[:2, 2:] == 0).all()) and bool((z[2:, 2:] == 0).all())
    # e_u(0,0) = 0.75 < e_u(1,0) = 3.0: tile (0,0) shares |value| 1.25 with its signs, tile (1,0) stays free
    assert torch.equal(z[:2, :2], torch.tensor([[1.25, -1.25], [1.25, 1.25]])) and torch.equal(z[2:, :2], v[2:, :2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse tensor cores need a CUDA GPU with compute capability >= 8.0")
def test_nm_semi_structured_cuda():  # pragma: no cover - no GPU here
    lin = nn.Linear(128, 128).half()
    new, rep = get_structure("nm").apply(lin, 1.0, {"execute": "semi_structured"})
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    dense = get_structure("nm").apply(lin, 1.0)[0].cuda()
    torch.testing.assert_close(new(x), dense(x), rtol=1e-2, atol=1e-2)
