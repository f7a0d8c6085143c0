"""The conv / linear calls of a forward pass (with the BatchNorm and activation fused behind each), and the op key
that names one layer configuration in a latency table."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from hwprune.errors import ModelError

ACTIVATIONS = (
    "ReLU", "ReLU6", "Hardswish", "Hardsigmoid", "SiLU", "GELU", "LeakyReLU", "Sigmoid", "Tanh", "Mish", "ELU",
)


@dataclass(frozen=True)
class LayerCall:
    """One call of a conv / linear layer in a forward pass, with what is measured together with it."""

    name: str
    op: str  # module class name: Conv1d, Conv2d, Conv3d, Linear
    in_ch: int
    out_ch: int
    groups: int
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Any  # tuple of ints, or "same" / "valid"
    dilation: Tuple[int, ...]
    bias: bool
    padding_mode: str
    spatial: Tuple[int, ...]  # conv: input spatial size; linear: input dims between batch and features
    bn: bool
    act: str  # activation class name or ""

    def key(self, in_ch: Optional[int] = None, out_ch: Optional[int] = None, groups: Optional[int] = None) -> str:
        """The op configuration (what latency depends on) as a canonical string, optionally with other channels."""
        return op_key(self.family(), self.in_ch if in_ch is None else in_ch, self.out_ch if out_ch is None else out_ch,
                      self.groups if groups is None else groups)

    def family(self) -> list:
        """Everything but the channel counts and groups: entries of one family form an (in, out) grid."""
        pad = list(self.padding) if isinstance(self.padding, (tuple, list)) else self.padding
        return [self.op, list(self.kernel), list(self.stride), pad, list(self.dilation), self.bias, self.padding_mode,
                list(self.spatial), self.bn, self.act]

    def depthwise(self) -> bool:
        return self.op != "Linear" and self.groups > 1 and self.groups == self.in_ch

    def pruned_groups(self, in_ch: int) -> int:
        """The groups of this layer when its input has ``in_ch`` channels (depthwise stays depthwise)."""
        return in_ch if self.depthwise() else self.groups

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("kernel", "stride", "dilation", "spatial"):
            d[k] = list(d[k])
        if isinstance(d["padding"], tuple):
            d["padding"] = list(d["padding"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerCall":
        d = dict(d)
        for k in ("kernel", "stride", "dilation", "spatial"):
            d[k] = tuple(d[k])
        if isinstance(d["padding"], list):
            d["padding"] = tuple(d["padding"])
        return cls(**d)

    def module(self, in_ch: int, out_ch: int, groups: int):
        """A standalone module of this op at the given channels: layer [+ BatchNorm] [+ activation]."""
        import torch.nn as nn

        if self.op == "Linear":
            layer = nn.Linear(in_ch, out_ch, bias=self.bias)
            norm = nn.BatchNorm1d(out_ch) if self.bn else None
        else:
            cls = getattr(nn, self.op)
            layer = cls(in_ch, out_ch, self.kernel, self.stride, self.padding, self.dilation, groups, self.bias,
                        self.padding_mode)
            norm = getattr(nn, f"BatchNorm{len(self.kernel)}d")(out_ch) if self.bn else None
        parts = [layer] + ([norm] if norm is not None else []) + ([getattr(nn, self.act)()] if self.act else [])
        return nn.Sequential(*parts).eval()

    def input_shape(self, batch: int, in_ch: int) -> Tuple[int, ...]:
        if self.op == "Linear":
            return (batch, *self.spatial, in_ch)
        return (batch, in_ch, *self.spatial)


def op_key(family: list, in_ch: int, out_ch: int, groups: int) -> str:
    return json.dumps([*family, int(in_ch), int(out_ch), int(groups)], separators=(",", ":"))


def split_key(key: str) -> Tuple[str, int, int, int]:
    """An op key as (family as a canonical string, in, out, groups)."""
    parts = json.loads(key)
    return json.dumps(parts[:-3], separators=(",", ":")), int(parts[-3]), int(parts[-2]), int(parts[-1])


def _tuple(v) -> Tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),)


def trace_layers(model, input_shape: Sequence[int]) -> List[LayerCall]:
    """Every conv / linear call of ``model`` on one input of ``input_shape`` (no batch), in call order, with the
    BatchNorm and activation modules that directly consume its output."""
    import torch
    import torch.nn as nn

    from hwprune.graph import ROOT_TYPES

    records: List[Tuple[str, nn.Module, Any, Any]] = []  # tensors kept alive so identities stay unique
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(mod, inp, out):
        records.append((names.get(mod, ""), mod, inp[0] if inp else None, out))

    for m in model.modules():
        if isinstance(m, ROOT_TYPES) or isinstance(m, nn.modules.batchnorm._BatchNorm) or \
                type(m).__name__ in ACTIVATIONS:
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0)))
    except Exception as e:
        raise ModelError(f"the model does not run on input {tuple(input_shape)} ({type(e).__name__}: {e})") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    consumers: Dict[int, List[int]] = {}
    for i, (_, _, x, _) in enumerate(records):
        if x is not None:
            consumers.setdefault(id(x), []).append(i)

    def next_of(i: int, kinds) -> Optional[int]:
        out = records[i][3]
        for j in consumers.get(id(out), []):
            if j > i and kinds(records[j][1]):
                return j
        return None

    calls = []
    for i, (name, m, x, out) in enumerate(records):
        if not isinstance(m, ROOT_TYPES):
            continue
        j = next_of(i, lambda mod: isinstance(mod, nn.modules.batchnorm._BatchNorm))
        k = next_of(j if j is not None else i, lambda mod: type(mod).__name__ in ACTIVATIONS)
        act = type(records[k][1]).__name__ if k is not None else ""
        if isinstance(m, nn.Linear):
            calls.append(LayerCall(name, "Linear", m.in_features, m.out_features, 1, (), (), (), (), m.bias is not None,
                                   "zeros", tuple(int(d) for d in x.shape[1:-1]), j is not None, act))
        else:
            pad = m.padding if isinstance(m.padding, str) else _tuple(m.padding)
            calls.append(LayerCall(name, type(m).__name__, m.in_channels, m.out_channels, m.groups,
                                   _tuple(m.kernel_size),
                                   _tuple(m.stride), pad, _tuple(m.dilation), m.bias is not None, m.padding_mode,
                                   tuple(int(d) for d in x.shape[2:]), j is not None, act))
    return calls
