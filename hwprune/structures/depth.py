"""``depth``: a residual block replaced by its shortcut (physically: the branch's layers are gone).

Recognised blocks (``residual_kind``):

* torchvision ``BasicBlock`` / ``Bottleneck``: out = relu(branch(x) + shortcut(x)) with shortcut = ``downsample``
  or identity -> replaced by ``Shortcut(downsample or Identity, ReLU)``;
* torchvision MobileNetV2 ``InvertedResidual`` with ``use_res_connect`` -> ``Identity``;
* any module with attribute ``hwprune_residual = True`` declaring out = x + f(x) (output shape = input shape;
  checked when the input shape is known) -> ``Identity``;
* any module with ``hwprune_residual = "resnet"``, declaring torchvision BasicBlock's form (``downsample`` or None,
  the branch ending in ``bn2``, a ReLU after the add; hwprune's own ``DemoBlock``) -> as BasicBlock;
* classes registered with ``register_residual(cls, to_shortcut, last_norm=None)``.

The group is the whole block (one group): ratio >= 0.5 removes it (the contract's round half up), below keeps it.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from hwprune.errors import ConfigError, ModelError
from hwprune.structures.base import LayerReport, Structure, bytes_dense, check_ratio, keep_mask

_REGISTERED: Dict[type, Tuple[Callable[[nn.Module], nn.Module], Optional[Callable[[nn.Module], nn.Module]]]] = {}


def register_residual(cls: type, to_shortcut: Callable[[nn.Module], nn.Module],
                      last_norm: Optional[Callable[[nn.Module], nn.Module]] = None) -> None:
    """Declare a residual block class: ``to_shortcut(block)`` builds what replaces it; ``last_norm(block)`` returns
    the norm layer whose zeroing silences the branch (used for the masked reference)."""
    _REGISTERED[cls] = (to_shortcut, last_norm)


class Shortcut(nn.Module):
    """What a removed residual block becomes: its shortcut, then the block's post-add activation."""

    def __init__(self, shortcut: nn.Module, post: nn.Module):
        super().__init__()
        self.shortcut, self.post = shortcut, post

    def forward(self, x):
        return self.post(self.shortcut(x))


def residual_kind(module: nn.Module) -> Optional[str]:
    if type(module) in _REGISTERED:
        return "registered"
    try:
        from torchvision.models.mobilenetv2 import InvertedResidual
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover
        BasicBlock = Bottleneck = InvertedResidual = ()
    if BasicBlock and isinstance(module, (BasicBlock, Bottleneck)):
        return "resnet"
    if getattr(module, "hwprune_residual", None) == "resnet":
        return "resnet"
    if InvertedResidual and isinstance(module, InvertedResidual) and getattr(module, "use_res_connect", False):
        return "inverted_residual"
    if getattr(module, "hwprune_residual", False) is True:
        return "declared"
    return None


def to_shortcut(block: nn.Module) -> nn.Module:
    kind = residual_kind(block)
    if kind == "registered":
        return _REGISTERED[type(block)][0](block)
    if kind == "resnet":
        sc = copy.deepcopy(block.downsample) if block.downsample is not None else nn.Identity()
        return Shortcut(sc, nn.ReLU(inplace=False))
    if kind in ("inverted_residual", "declared"):
        return nn.Identity()
    raise ModelError(
        f"{type(block).__name__} is not a recognised residual block; declare it with hwprune_residual = True "
        f"(out = x + f(x)) or hwprune.structures.register_residual"
    )


def last_norm(block: nn.Module) -> Optional[nn.Module]:
    """The norm layer at the end of the residual branch (zeroing its weight and bias silences the branch)."""
    kind = residual_kind(block)
    if kind == "registered":
        f = _REGISTERED[type(block)][1]
        return f(block) if f else None
    if kind == "resnet":
        return getattr(block, "bn3", None) or block.bn2
    if kind == "inverted_residual":
        return block.conv[-1]
    return None


def silence_branch(block: nn.Module) -> nn.Module:
    """A copy of ``block`` whose residual branch outputs zero (the masked reference of depth pruning)."""
    new = copy.deepcopy(block)
    bn = last_norm(new)
    if bn is None:
        raise ModelError(f"{type(block).__name__}: no norm layer known at the end of its residual branch")
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()
    return new


def count_macs(module: nn.Module, in_shape: Sequence[int]) -> int:
    """Conv2d/Linear MACs of one forward pass at ``in_shape`` (hooks; zeros input)."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total[0] += int(out.numel() * m.weight[0].numel())
        elif isinstance(m, nn.Linear):
            total[0] += int(out.numel() * m.in_features)

    hs = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    states = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(tuple(in_shape)))
    finally:
        for m, t in states:
            m.training = t
        for h in hs:
            h.remove()
    return total[0]


class DepthStructure(Structure):
    name = "depth"
    physical = True
    description = "residual block -> its shortcut (resnet Basic/Bottleneck, MobileNetV2 InvertedResidual, declared)"

    def applies_to(self, module):
        return residual_kind(module) is not None

    def group_index(self, weight, params):
        return torch.zeros(weight.shape, dtype=torch.long), 1

    def n_groups(self, module, params=None):
        return 1

    def scores(self, weight=None, criterion="l1", params=None, grad=None, module=None, bn=None):
        if module is None:
            return torch.zeros(1, dtype=torch.float64)
        ps = [p.detach().abs().mean() for p in module.parameters() if p.dim() > 1]
        return torch.tensor([float(sum(ps) / max(1, len(ps)))], dtype=torch.float64)

    def apply(self, module, ratio, params=None, criterion="l1", grad=None, in_shape=None, bn=None, removed=None):
        check_ratio(ratio)
        if not self.applies_to(module):
            raise ConfigError(
                f"structure 'depth' does not apply to a {type(module).__name__}; it needs a residual block "
                f"(BasicBlock, Bottleneck, InvertedResidual with a residual, or hwprune_residual = True)"
            )
        p = self.check_params(params)
        removed = p.pop("removed", removed)
        keep = keep_mask(self.scores(module=module), ratio) if removed is None else torch.tensor([0 not in list(removed)])
        new = copy.deepcopy(module) if bool(keep[0]) else to_shortcut(module)
        new.train(module.training)
        if not bool(keep[0]) and in_shape is not None and residual_kind(module) == "declared":
            with torch.no_grad():
                out = copy.deepcopy(module).eval()(torch.zeros(tuple(in_shape)))
            if tuple(out.shape) != tuple(in_shape):
                raise ModelError(
                    f"{type(module).__name__} is declared residual but maps {tuple(in_shape)} to {tuple(out.shape)}; "
                    f"only blocks with output shape = input shape can be replaced by an identity"
                )
        wb = sum(q.numel() for q in module.parameters())
        wa = sum(q.numel() for q in new.parameters())
        mb = count_macs(module, in_shape) if in_shape is not None else None
        ma = count_macs(new, in_shape) if in_shape is not None else None
        rep = LayerReport(
            structure=self.name, ratio=float(ratio), params=p, groups=1, groups_removed=int(not keep[0]),
            weights=wb, weights_kept=wa, executed="physical" if not keep[0] else "identity", format="dense",
            macs_dense=mb, macs_effective=ma, macs_onnx=ma, bytes_dense=bytes_dense(wb), bytes_deployed=bytes_dense(wa),
        )
        return new, rep
