"""Per-layer latency lookup tables (NetAdapt / HALP style): measure every conv and linear layer of a model, as a
small standalone module, at every (in_channels, out_channels) combination a search space can produce, once per
device profile; then predict the latency of any pruned variant in microseconds instead of measuring it.

How a table is built (``build_lut``):
  1. A forward pass with hooks records every conv / linear call of the dense model: its attributes, its input's
     spatial size, and the BatchNorm and activation module that directly consume its output (found by tensor
     identity; functional activations such as ``F.relu`` are not seen and fall into the overhead).
  2. Which dependency group sets each layer's input and output channels is found by pruning each group alone
     with ``graph.prune_groups`` (the real torch-pruning engine) and watching which layers change, and by how
     many channels per channel of the group (a linear layer after a flatten loses H*W features per channel).
     A layer whose input and output follow the same group (depthwise convs) gets only in == out combinations.
  3. How many channels a group loses at each ratio is read from pruned models (one uniform plan per ratio), and
     checked against torch-pruning's rounding rule (keep ``int(C * (1 - r))`` channels, rounded down to a
     multiple of ``round_to``), which then also serves ratios outside the table's list.
  4. Every distinct op configuration (same type, in/out, kernel, stride, padding, groups, input size, BN and
     activation) is exported to ONNX and measured once on the profile's backend, at the profile's batch size.
  5. Calibration: the dense model, a few uniform plans and a few random plans are measured whole;
     ``measured = scale * sum(entries) + overhead_ms`` is fitted robustly, Theil-Sen (with the dense model alone:
     scale 1, overhead = dense - sum).
     The overhead covers what the table does not hold (adds, pooling, reorders, session overhead); the scale
     absorbs the systematic difference between layers run alone and inside the model (layout conversions at
     their boundaries, weights that stay in cache when a layer runs alone, time slicing on a busy machine).

Prediction: ``scale * sum(entry for each layer call) + overhead_ms``. A configuration missing from the table
(a ratio or round_to outside the space it was built for) is interpolated bilinearly in (in, out) between the
table's grid points of the same op (linearly in channels for depthwise convs); one that no grid brackets raises
``TableMiss``. ``predict(..., interpolate=False)`` raises on any miss instead.

A table is bound to the device fingerprint of the backend it was measured with and to the search space's name;
``LatencyTable.load(path, fingerprint=..., space=...)`` refuses another one with a one-line ``TableMismatch``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from hwprune.errors import ConfigError, ModelError
from hwprune.latency.base import DeviceProfile, LatencyBackend, MeasureSettings, make_backend, measure_candidate
from hwprune.latency.measure import fingerprint_hash

FORMAT = "hwprune-latency-table"
VERSION = 1
ACTIVATIONS = (
    "ReLU", "ReLU6", "Hardswish", "Hardsigmoid", "SiLU", "GELU", "LeakyReLU", "Sigmoid", "Tanh", "Mish", "ELU",
)
MAX_COMBINATIONS = 4096  # (in, out) combinations one layer may need before the table refuses to enumerate them

Progress = Union[bool, Callable[[int, int, str], None]]


class TableMismatch(ConfigError):
    """A latency table built for another device fingerprint, search space or model."""


class TableMiss(ModelError):
    """A layer configuration the table neither holds nor can interpolate."""


# ---------------------------------------------------------------------------------------------------------------
# Layer calls and their op keys


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
        return _key(self.family(), self.in_ch if in_ch is None else in_ch, self.out_ch if out_ch is None else out_ch,
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


def _key(family: list, in_ch: int, out_ch: int, groups: int) -> str:
    return json.dumps([*family, int(in_ch), int(out_ch), int(groups)], separators=(",", ":"))


def _split_key(key: str) -> Tuple[str, int, int, int]:
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


# ---------------------------------------------------------------------------------------------------------------
# How torch-pruning rounds, and which group sets which layer's channels


def removed_channels(channels: int, ratio: float, round_to: Optional[int]) -> int:
    """Channels ``graph.prune_groups`` removes from a group of ``channels`` at ``ratio``: torch-pruning keeps
    ``int(channels * (1 - ratio))`` and rounds that down to a multiple of ``round_to`` (a rounding to 0 prunes
    nothing); hwprune asks for exactly ``round_to`` channels where that would happen to a group wider than
    ``round_to``. A ratio of 0 prunes nothing. Checked against real pruning whenever a table is built."""
    if ratio <= 0:
        return 0
    if round_to and channels > round_to and int(channels * (1 - ratio)) < round_to:
        return channels - round_to
    n = channels - int(channels * (1 - ratio))
    if n <= 0:
        return 0
    if round_to:
        keep = channels - n
        keep -= keep % round_to
        if keep <= 0:
            return 0
        n = channels - keep
    return n


def _channels_by_layer(model) -> Dict[str, Tuple[int, int]]:
    import torch.nn as nn

    from hwprune.graph import ROOT_TYPES

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[n] = (m.in_features, m.out_features)
        elif isinstance(m, ROOT_TYPES):
            out[n] = (m.in_channels, m.out_channels)
    return out


def _prune(workload, ratios: Mapping[str, float]):
    from hwprune import graph

    # channel counts do not depend on the importance criterion; l1 needs no data
    model, _ = graph.prune_groups(workload.model, workload.example_input, dict(ratios), "l1",
                                  workload.round_to, list(workload.ignored))
    return model


@dataclass
class _Dependencies:
    ins: Dict[str, List[Tuple[str, int]]]  # layer -> [(group, channels lost per channel of the group)]
    outs: Dict[str, List[Tuple[str, int]]]
    removed: Dict[str, Dict[str, int]]  # group -> {ratio as str: channels removed}
    rounding_verified: bool


def _dependencies(workload, ratios: Sequence[float], log: Callable[[str], None]) -> _Dependencies:
    dense = _channels_by_layer(workload.model)
    rmax = max(r for r in ratios)
    ins: Dict[str, List[Tuple[str, int]]] = {}
    outs: Dict[str, List[Tuple[str, int]]] = {}
    probe_ratio = rmax if rmax > 0 else 0.5
    for g in workload.groups:
        pruned = _channels_by_layer(_prune(workload, {g.name: probe_ratio}))
        lost = dense[g.name][1] - pruned[g.name][1]
        if lost <= 0:
            continue  # this group never shrinks at these ratios: its layers keep constant channels
        for layer, (ci, co) in dense.items():
            pi, po = pruned[layer]
            for delta, table in ((ci - pi, ins), (co - po, outs)):
                if delta:
                    if delta % lost:
                        raise ModelError(
                            f"layer {layer!r} loses {delta} channels when group {g.name!r} loses {lost}; the latency "
                            f"table cannot model that layer"
                        )
                    table.setdefault(layer, []).append((g.name, delta // lost))
    removed: Dict[str, Dict[str, int]] = {g.name: {} for g in workload.groups}
    verified = True
    for r in sorted(set(float(r) for r in ratios)):
        pruned = _channels_by_layer(_prune(workload, {g.name: r for g in workload.groups})) if r > 0 else dense
        for g in workload.groups:
            n = dense[g.name][1] - pruned[g.name][1]
            removed[g.name][repr(r)] = n
            if n != removed_channels(g.channels, r, workload.round_to):
                verified = False
        # every layer's channels in the uniform plan must follow from the dependencies found above
        for layer, (ci, co) in dense.items():
            ei = ci - sum(f * removed[g][repr(r)] for g, f in ins.get(layer, []))
            eo = co - sum(f * removed[g][repr(r)] for g, f in outs.get(layer, []))
            if (ei, eo) != pruned[layer]:
                raise ModelError(
                    f"layer {layer!r} has {pruned[layer]} (in, out) channels at uniform ratio {r:g} but the group "
                    f"dependencies predict {(ei, eo)}; the latency table cannot model this model"
                )
    if not verified:
        log("latency table: torch-pruning's channel counts differ from the rounding rule; only the table's ratios "
            "can be predicted without pruning")
    return _Dependencies(ins, outs, removed, verified)


# ---------------------------------------------------------------------------------------------------------------
# The table


@dataclass
class LatencyTable:
    """Per-layer latencies of one model's search space on one device, plus the calibration that turns their sum
    into a whole-model latency: ``predicted_ms = scale * sum(entries) + overhead_ms``."""

    entries: Dict[str, float]  # op key -> median ms
    layers: List[LayerCall]  # the dense model's conv / linear calls
    ins: Dict[str, List[Tuple[str, int]]]
    outs: Dict[str, List[Tuple[str, int]]]
    removed: Dict[str, Dict[str, int]]
    round_to: Optional[int]
    rounding_verified: bool
    channels: Dict[str, int]  # group -> dense channels
    ratios: List[float]
    input_shape: Tuple[int, ...]
    batch_size: int
    fingerprint: Dict[str, Any]
    profile: str
    space: str
    model: str
    overhead_ms: float = 0.0
    scale: float = 1.0
    dense_ms: float = float("nan")
    calibration: List[Dict[str, Any]] = field(default_factory=list)  # {"plan", "table_sum_ms", "measured_ms"}
    spread: Dict[str, List[float]] = field(default_factory=dict)  # op key -> [p10_ms, p90_ms, n]
    build_seconds: float = 0.0
    source: Optional[str] = None

    # -- identity -------------------------------------------------------------------------------------------------
    @property
    def fingerprint_hash(self) -> str:
        return fingerprint_hash(self.fingerprint)

    def __len__(self) -> int:
        return len(self.entries)

    def check(self, fingerprint: Optional[Mapping[str, Any]] = None, space: Optional[str] = None,
              model: Optional[str] = None) -> "LatencyTable":
        """Raise TableMismatch unless the table was built for this device fingerprint, space and model."""
        where = self.source or "the latency table"
        if fingerprint is not None and fingerprint_hash(dict(fingerprint)) != self.fingerprint_hash:
            raise TableMismatch(
                f"{where} was measured on device fingerprint {self.fingerprint_hash} (profile {self.profile!r}), not "
                f"{fingerprint_hash(dict(fingerprint))}; rebuild the table on this device/profile"
            )
        if space is not None and space != self.space:
            raise TableMismatch(f"{where} was built for search space {self.space!r}, not {space!r}; rebuild it "
                                f"for {space!r}")
        if model is not None and model != self.model:
            raise TableMismatch(f"{where} was built for model {self.model!r}, not {model!r}; rebuild it for {model!r}")
        return self

    # -- persistence ----------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "fingerprint_hash": self.fingerprint_hash,
            "profile": self.profile,
            "space": self.space,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "batch_size": self.batch_size,
            "ratios": list(self.ratios),
            "round_to": self.round_to,
            "rounding_verified": self.rounding_verified,
            "channels": self.channels,
            "removed": self.removed,
            "overhead_ms": self.overhead_ms,
            "scale": self.scale,
            "dense_ms": self.dense_ms,
            "calibration": self.calibration,
            "build_seconds": self.build_seconds,
            "layers": [c.to_dict() for c in self.layers],
            "ins": {k: [list(x) for x in v] for k, v in self.ins.items()},
            "outs": {k: [list(x) for x in v] for k, v in self.outs.items()},
            "entries": [{"key": json.loads(k), "median_ms": v, "spread": self.spread.get(k)}
                        for k, v in sorted(self.entries.items())],
        }

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: Optional[str] = None) -> "LatencyTable":
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise TableMismatch(f"{source or 'data'} is not a version-{VERSION} hwprune latency table "
                                f"(format {d.get('format')!r}, version {d.get('version')!r}); rebuild it")
        entries, spread = {}, {}
        for e in d["entries"]:
            k = json.dumps(e["key"], separators=(",", ":"))
            entries[k] = float(e["median_ms"])
            if e.get("spread") is not None:
                spread[k] = list(e["spread"])
        return cls(
            entries=entries,
            layers=[LayerCall.from_dict(c) for c in d["layers"]],
            ins={k: [(g, int(f)) for g, f in v] for k, v in d["ins"].items()},
            outs={k: [(g, int(f)) for g, f in v] for k, v in d["outs"].items()},
            removed={g: {r: int(n) for r, n in v.items()} for g, v in d["removed"].items()},
            round_to=d.get("round_to"),
            rounding_verified=bool(d.get("rounding_verified", False)),
            channels={g: int(c) for g, c in d["channels"].items()},
            ratios=[float(r) for r in d["ratios"]],
            input_shape=tuple(d["input_shape"]),
            batch_size=int(d["batch_size"]),
            fingerprint=d["fingerprint"],
            profile=d["profile"],
            space=d["space"],
            model=d["model"],
            overhead_ms=float(d["overhead_ms"]),
            scale=float(d["scale"]),
            dense_ms=float(d["dense_ms"]),
            calibration=list(d.get("calibration", [])),
            spread=spread,
            build_seconds=float(d.get("build_seconds", 0.0)),
            source=source,
        )

    @classmethod
    def load(cls, path: Union[str, Path], fingerprint: Optional[Mapping[str, Any]] = None,
             space: Optional[str] = None, model: Optional[str] = None) -> "LatencyTable":
        """Read a table; with ``fingerprint`` / ``space`` / ``model`` given, refuse one built for others."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"latency table {str(path)!r} does not exist; build it first (build_lut)")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"latency table {str(path)!r} is not readable JSON ({e}); rebuild it") from e
        return cls.from_dict(d, source=str(path)).check(fingerprint, space, model)

    @classmethod
    def load_for(cls, path: Union[str, Path], profile: DeviceProfile, space: Optional[str] = None,
                 model: Optional[str] = None) -> "LatencyTable":
        """Load a table and check it against the fingerprint of ``profile``'s backend on this machine."""
        return cls.load(path, make_backend(profile).fingerprint(), space, model)

    # -- prediction -----------------------------------------------------------------------------------------------
    def lookup(self, key: str, interpolate: bool = True, what: str = "") -> float:
        """The latency of one op configuration: the entry, or a bilinear interpolation between entries."""
        v = self.entries.get(key)
        if v is not None:
            return v
        if interpolate:
            v = self._interpolate(key)
            if v is not None:
                return v
        fam, i, o, g = _split_key(key)
        raise TableMiss(
            f"latency table has no entry for {what or 'a layer'} ({json.loads(fam)[0]} in={i} out={o} groups={g})"
            + ("" if not interpolate else " and no entries around it to interpolate from")
            + f"; rebuild the table for the ratios/round_to in use (it covers search space {self.space!r})"
        )

    def _interpolate(self, key: str) -> Optional[float]:
        fam, i, o, g = _split_key(key)
        grid: Dict[Tuple[int, int], float] = {}
        depthwise = g > 1 and g == i
        for k, v in self.entries.items():
            f2, i2, o2, g2 = _split_key(k)
            if f2 == fam and (g2 == i2) == depthwise and (depthwise or g2 == g):
                grid[(i2, o2)] = v
        if not grid:
            return None
        if depthwise:  # in == out == groups (times a fixed multiplier): interpolate along the channels
            pts = sorted((a, b, v) for (a, b), v in grid.items() if b * i == o * a)
            xs = [p[0] for p in pts]
            if not xs or i < xs[0] or i > xs[-1]:
                return None
            return float(np.interp(i, xs, [p[2] for p in pts]))
        ins = sorted({a for a, _ in grid})
        outs = sorted({b for _, b in grid})
        for (i0, i1), (o0, o1) in itertools.product(_brackets(ins, i), _brackets(outs, o)):
            if all(c in grid for c in ((i0, o0), (i0, o1), (i1, o0), (i1, o1))):
                break
        else:
            return None
        ti = 0.0 if i1 == i0 else (i - i0) / (i1 - i0)
        to = 0.0 if o1 == o0 else (o - o0) / (o1 - o0)
        return float((1 - ti) * (1 - to) * grid[(i0, o0)] + (1 - ti) * to * grid[(i0, o1)]
                     + ti * (1 - to) * grid[(i1, o0)] + ti * to * grid[(i1, o1)])

    @property
    def dense_predicted_ms(self) -> float:
        """The table's own prediction for the dense model (the base of relative predictions)."""
        return self._total(sum(self.lookup(c.key(), True, c.name) for c in self.layers))

    def _total(self, sum_ms: float) -> float:
        return max(self.scale * sum_ms + self.overhead_ms, 1e-6)

    def layer_sum(self, model, interpolate: bool = True) -> float:
        """Sum of the table entries of a (pruned) model's layer calls, in ms (no calibration applied)."""
        return sum(self.lookup(c.key(), interpolate, c.name) for c in trace_layers(model, self.input_shape))

    def predict(self, model, interpolate: bool = True) -> float:
        """Predicted latency (ms per batch on the table's profile) of a pruned model: its conv / linear calls are
        traced with one forward pass at batch 1 and looked up."""
        return self._total(self.layer_sum(model, interpolate))

    def plan_keys(self, ratios: Union[Mapping[str, float], Any]) -> List[str]:
        """The op keys of every layer call under a plan (a PruningPlan or a {group: ratio} mapping), computed
        from the table alone without pruning."""
        ratios = getattr(ratios, "ratios", ratios)
        lost = {g: self._removed(g, float(ratios.get(g, 0.0))) for g in self.channels}
        keys = []
        for c in self.layers:
            i = c.in_ch - sum(f * lost[g] for g, f in self.ins.get(c.name, []))
            o = c.out_ch - sum(f * lost[g] for g, f in self.outs.get(c.name, []))
            keys.append(c.key(i, o, c.pruned_groups(i)))
        return keys

    def predict_plan(self, ratios: Union[Mapping[str, float], Any], interpolate: bool = True) -> float:
        """Predicted latency of a plan without building the pruned model (microseconds of arithmetic)."""
        return self._total(sum(self.lookup(k, interpolate) for k in self.plan_keys(ratios)))

    def _removed(self, group: str, ratio: float) -> int:
        known = self.removed.get(group, {})
        if repr(float(ratio)) in known:
            return known[repr(float(ratio))]
        if not self.rounding_verified:
            raise TableMiss(f"ratio {ratio:g} of group {group!r} is not among the table's ratios {self.ratios}; "
                            f"rebuild the table with it")
        return removed_channels(self.channels[group], ratio, self.round_to)


def _brackets(values: Sequence[int], x: int) -> List[Tuple[int, int]]:
    """Grid intervals that hold ``x``: the point itself, then its nearest neighbours on either side."""
    out = [(x, x)] if x in values else []
    lo = [v for v in values if v < x]
    hi = [v for v in values if v > x]
    if lo and hi:
        out.append((max(lo), min(hi)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Building


def _backend_and_profile(profile_or_backend, settings: Optional[MeasureSettings]):
    if isinstance(profile_or_backend, DeviceProfile):
        profile = profile_or_backend
        if settings is not None:
            profile = dataclasses.replace(profile, measure=settings)
        return make_backend(profile), profile
    backend = profile_or_backend
    if settings is not None:
        raise ConfigError("measure settings can be overridden only when a DeviceProfile is given, not a backend")
    return backend, getattr(backend, "profile", None)


def _progress_fn(progress: Progress, total: int, desc: str):
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return (lambda done, total, what: None), lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="op", dynamic_ncols=True)

    def step(done: int, total: int, what: str) -> None:
        bar.n = done
        bar.set_postfix_str(what[:40], refresh=False)
        bar.refresh()

    return step, bar.close


def layer_configs(workload, ratios: Sequence[float], deps: _Dependencies, calls: Sequence[LayerCall],
                  max_combinations: int = MAX_COMBINATIONS) -> Dict[str, LayerCall]:
    """Every op key the space can produce -> a layer call that has it (the template to build and measure)."""
    out: Dict[str, LayerCall] = {}
    for c in calls:
        spec_in, spec_out = deps.ins.get(c.name, []), deps.outs.get(c.name, [])
        groups = sorted({g for g, _ in spec_in} | {g for g, _ in spec_out})
        choices = [sorted(set(deps.removed[g].values())) for g in groups]
        n = math.prod(len(ch) for ch in choices) if choices else 1
        if n > max_combinations:
            raise ModelError(f"layer {c.name!r} depends on {len(groups)} groups ({n} channel combinations); the "
                             f"latency table caps one layer at {max_combinations}")
        for combo in itertools.product(*choices):
            lost = dict(zip(groups, combo))
            i = c.in_ch - sum(f * lost[g] for g, f in spec_in)
            o = c.out_ch - sum(f * lost[g] for g, f in spec_out)
            if i <= 0 or o <= 0:
                continue
            gr = c.pruned_groups(i)
            if i % gr or o % gr:
                continue  # a grouped conv torch-pruning would not produce with these counts
            out.setdefault(c.key(i, o, gr), c)
    return out


def build_lut(
    workload,
    profile_or_backend: Union[DeviceProfile, LatencyBackend],
    ratios: Optional[Sequence[float]] = None,
    progress: Progress = True,
    *,
    calibrate: int = 3,
    calibration_random: int = 3,
    calibration_rounds: int = 2,
    passes: int = 1,
    settings: Optional[MeasureSettings] = None,
    batch_size: Optional[int] = None,
    workdir: Optional[Union[str, Path]] = None,
    log: Callable[[str], None] = lambda s: None,
    max_combinations: int = MAX_COMBINATIONS,
) -> LatencyTable:
    """Measure every conv / linear op configuration ``workload``'s search space can produce on a device profile
    (or a backend object with ``fingerprint()`` and ``measure_onnx(path, shape)``), and calibrate the overhead.

    ``ratios``: the ratio choices (default: the search space's). Calibration measures whole models to fit
    ``measured = scale * sum(entries) + overhead``: ``calibrate`` uniform plans spread over the ratios (the first
    is the dense model) and ``calibration_random`` random plans (an independent ratio per group, seeded), each
    ``calibration_rounds`` times round-robin (lowest median kept); with the dense model alone the scale is 1.
    ``passes``: how many times every entry is measured (lowest median kept; more passes resist interference on a
    shared machine). ``settings`` overrides the profile's measure settings for the table's entries (not for the
    calibration). ``progress``: True for a bar, False for none, or ``fn(done, total, what)``.
    """
    from hwprune.export import to_onnx

    t0 = time.perf_counter()
    ratios = sorted(set(float(r) for r in (workload.space.ratios if ratios is None else ratios)) | {0.0})
    backend, profile = _backend_and_profile(profile_or_backend, settings)
    whole_backend = backend if settings is None else make_backend(profile_or_backend)
    batch = int(batch_size or (profile.batch_size if profile is not None else 1))
    calls = trace_layers(workload.model, workload.input_shape)
    log(f"latency table: {len(calls)} conv/linear calls, {len(workload.groups)} groups; finding channel dependencies")
    deps = _dependencies(workload, ratios, log)
    configs = layer_configs(workload, ratios, deps, calls, max_combinations)
    log(f"latency table: {len(configs)} distinct op configurations to measure")

    entries: Dict[str, float] = {}
    spread: Dict[str, List[float]] = {}
    step, close = _progress_fn(progress, len(configs), f"LUT {getattr(profile, 'name', 'backend')}")
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    try:
        for n, (key, call) in enumerate(sorted(configs.items())):
            _, i, o, g = _split_key(key)
            module = call.module(i, o, g)
            shape = call.input_shape(batch, i)
            path = to_onnx(module, shape, Path(tmp.name) / "op.onnx")
            st = measure_candidate(backend, str(path), module, shape)
            entries[key] = st.median_ms
            spread[key] = [st.p10_ms, st.p90_ms, st.n]
            step(n + 1, len(configs), f"{call.op} {i}->{o}")
        close()
        for _ in range(max(1, passes) - 1):  # further passes: keep each entry's lowest median
            for key, call in sorted(configs.items()):
                _, i, o, g = _split_key(key)
                module = call.module(i, o, g)
                shape = call.input_shape(batch, i)
                path = to_onnx(module, shape, Path(tmp.name) / "op.onnx")
                entries[key] = min(entries[key], measure_candidate(backend, str(path), module, shape).median_ms)

        # calibration: the dense model, uniform plans and random plans (what a search samples) measured whole,
        # round-robin, ``calibration_rounds`` times; the lowest median of each is kept (interference from other
        # processes only ever adds time)
        shape = (batch, *workload.input_shape)
        whole = []
        for j, (label, plan_ratios) in enumerate(_calibration_plans(workload, ratios, calibrate, calibration_random)):
            model = workload.model if not any(plan_ratios.values()) else _prune(workload, plan_ratios)
            path = to_onnx(model, shape, Path(tmp.name) / f"whole-{j}.onnx")
            table_sum = sum(entries[c.key()] for c in trace_layers(model, workload.input_shape))
            whole.append((label, model, path, table_sum))
        best = [math.inf] * len(whole)
        for _ in range(max(1, calibration_rounds)):
            for j, (_, model, path, _) in enumerate(whole):
                best[j] = min(best[j], measure_candidate(whole_backend, str(path), model, shape).median_ms)
        points = []
        for (label, _, _, table_sum), measured in zip(whole, best):
            points.append({"plan": label, "table_sum_ms": table_sum, "measured_ms": measured})
            log(f"latency table: {label}: measured {measured:.3f} ms, layer sum {table_sum:.3f} ms")
    finally:
        tmp.cleanup()

    scale, overhead = _fit(points)
    fp = backend.fingerprint()
    return LatencyTable(
        entries=entries,
        layers=list(calls),
        ins=deps.ins,
        outs=deps.outs,
        removed=deps.removed,
        round_to=workload.round_to,
        rounding_verified=deps.rounding_verified,
        channels={g.name: g.channels for g in workload.groups},
        ratios=ratios,
        input_shape=tuple(workload.input_shape),
        batch_size=batch,
        fingerprint=fp,
        profile=getattr(profile, "name", getattr(backend, "name", "backend")),
        space=workload.space.name,
        model=workload.model_ref,
        overhead_ms=overhead,
        scale=scale,
        dense_ms=points[0]["measured_ms"],
        calibration=points,
        spread=spread,
        build_seconds=time.perf_counter() - t0,
    )


def _spread_picks(ratios: Sequence[float], k: int) -> List[float]:
    if k <= 1 or len(ratios) == 1:
        return [0.0]
    idx = sorted({round(j * (len(ratios) - 1) / (k - 1)) for j in range(k)})
    return [ratios[j] for j in idx]


def _calibration_plans(
    workload, ratios: Sequence[float], uniform: int, random: int
) -> List[Tuple[str, Dict[str, float]]]:
    """The dense model first, then ``uniform`` - 1 more uniform plans spread over the ratios, then ``random``
    plans with an independent ratio per group (seeded: the same table is rebuilt the same way)."""
    plans = [(f"uniform {r:g}", {g.name: r for g in workload.groups}) for r in _spread_picks(ratios, max(1, uniform))]
    rng = np.random.default_rng(7919)  # a fixed stream of its own (benchmarks draw test plans from others)
    for k in range(max(0, random)):
        plans.append((f"random {k + 1}", {g.name: float(rng.choice(ratios)) for g in workload.groups}))
    return plans


def _fit(points: Sequence[Mapping[str, float]]) -> Tuple[float, float]:
    """``measured = scale * table_sum + overhead``, fitted robustly (Theil-Sen: the median of pairwise slopes, then
    the median intercept), so one calibration model caught by interference does not tilt the line. With one point
    (or a degenerate fit) the scale is 1 and the overhead the median residual."""
    s = np.array([p["table_sum_ms"] for p in points], dtype=np.float64)
    m = np.array([p["measured_ms"] for p in points], dtype=np.float64)
    slopes = [(m[j] - m[i]) / (s[j] - s[i]) for i in range(len(s)) for j in range(i + 1, len(s))
              if abs(s[j] - s[i]) > 1e-9 * max(1.0, abs(s[j]))]
    if slopes:
        scale = float(np.median(slopes))
        if 0.2 <= scale <= 5.0:
            return scale, float(np.median(m - scale * s))
    return 1.0, float(np.median(m - s))


# ---------------------------------------------------------------------------------------------------------------
# Screening and the predictor's own error


def screen(predicted_ms: float, budget_ms: float, margin: float = 0.1) -> bool:
    """True when a candidate should be measured: its prediction is not over the budget by more than ``margin``
    (relative: 0.1 lets predictions up to 1.1 x budget through to a real measurement)."""
    return predicted_ms <= budget_ms * (1.0 + margin)


class LutScreen:
    """Skips measurement (and training) of candidates the table predicts to be over the latency budget by more
    than ``margin``. Choose the margin above the table's measured error (``predictor_error``) so that a candidate
    near the budget is always measured."""

    def __init__(self, table: LatencyTable, budget_ms: float, margin: float = 0.1,
                 reference_ms: Optional[float] = None):
        """``reference_ms``: the dense model's latency as the search measures it now (e.g. a drift-corrected
        meter's reference). When given, predictions are relative to the table's own dense prediction and scaled to
        it (``predicted / table.dense_predicted_ms * reference_ms``), so a machine that is faster or slower than
        when the table was built shifts the prediction the same way as the measurements."""
        if budget_ms <= 0 or margin < 0:
            raise ConfigError(f"screening needs a positive budget and a margin >= 0, got {budget_ms!r}, {margin!r}")
        self.table = table
        self.budget_ms = float(budget_ms)
        self.margin = float(margin)
        self.reference_ms = reference_ms
        self._dense = table.dense_predicted_ms
        self.measured = 0
        self.skipped = 0

    def _decide(self, predicted: float) -> Tuple[bool, float]:
        if self.reference_ms is not None:
            predicted = predicted / self._dense * float(self.reference_ms)
        ok = screen(predicted, self.budget_ms, self.margin)
        if ok:
            self.measured += 1
        else:
            self.skipped += 1
        return ok, predicted

    def should_measure(self, model) -> Tuple[bool, float]:
        """(measure it?, predicted ms) for a pruned model."""
        return self._decide(self.table.predict(model))

    def should_measure_plan(self, plan) -> Tuple[bool, float]:
        """(measure it?, predicted ms) for a plan, before pruning (table arithmetic only)."""
        return self._decide(self.table.predict_plan(plan))

    def reason(self, predicted_ms: float) -> str:
        return (f"predicted latency {predicted_ms:.3f} ms on {self.table.profile} exceeds the budget "
                f"{self.budget_ms:g} ms by more than {self.margin:.0%} (not measured)")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    da, db = da[iu], db[iu]
    denom = math.sqrt(float(np.sum(da != 0)) * float(np.sum(db != 0)))
    return float(np.sum(da * db) / denom) if denom else float("nan")


def predictor_error(
    table: Optional[LatencyTable], models_and_measured: Iterable[Tuple[Any, float]]
) -> Dict[str, float]:
    """The table's error against real measurements. Each item is (pruned model | plan | {group: ratio} |
    predicted ms, measured ms). Returns mape (%), max_ape (%), bias (% mean signed error), spearman, kendall, n."""
    pred, meas = [], []
    for item, measured in models_and_measured:
        if isinstance(item, (int, float)):
            p = float(item)
        elif isinstance(item, Mapping) or hasattr(item, "ratios"):
            p = table.predict_plan(item)
        else:
            p = table.predict(item)
        pred.append(p)
        meas.append(float(measured))
    p, m = np.asarray(pred), np.asarray(meas)
    if len(p) == 0:
        raise ValueError("predictor_error needs at least one (model, measured_ms) pair")
    rel = (p - m) / m * 100.0
    return {
        "n": int(len(p)),
        "mape": float(np.mean(np.abs(rel))),
        "max_ape": float(np.max(np.abs(rel))),
        "bias": float(np.mean(rel)),
        "spearman": spearman(p, m) if len(p) > 1 else float("nan"),
        "kendall": kendall(p, m) if len(p) > 1 else float("nan"),
    }
