"""The latency table: per-op entries, the dense model's layer calls and group dependencies, the calibration, JSON
persistence bound to a device fingerprint / search space / model, and prediction for pruned models and plans."""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy.interpolate import RegularGridInterpolator

from hwprune.errors import ConfigError, ModelError
from hwprune.latency.base import DeviceProfile, make_backend
from hwprune.latency.lut.coverage import channels_after
from hwprune.latency.lut.trace import LayerCall, split_key, trace_layers
from hwprune.latency.measure import fingerprint_hash
from hwprune.rounding import removed_channels

FORMAT = "hwprune-latency-table"
VERSION = 1


class TableMismatch(ConfigError):
    """A latency table built for another device fingerprint, search space or model."""


class TableMiss(ModelError):
    """A layer configuration the table neither holds nor can interpolate."""


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
        fam, i, o, g = split_key(key)
        raise TableMiss(
            f"latency table has no entry for {what or 'a layer'} ({json.loads(fam)[0]} in={i} out={o} groups={g})"
            + ("" if not interpolate else " and no entries around it to interpolate from")
            + f"; rebuild the table for the ratios/round_to in use (it covers search space {self.space!r})"
        )

    def _interpolate(self, key: str) -> Optional[float]:
        """Linear interpolation between the entries of the same op family: along the channels for depthwise convs
        (in == out == groups), else bilinear in (in, out) over the nearest grid cell whose four corners are held."""
        fam, i, o, g = split_key(key)
        grid: Dict[Tuple[int, int], float] = {}
        depthwise = g > 1 and g == i
        for k, v in self.entries.items():
            f2, i2, o2, g2 = split_key(k)
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
        cell = _cell(grid, i, o)
        if cell is None:
            return None
        values = np.array([[grid[(a, b)] for b in cell[1]] for a in cell[0]], dtype=np.float64)
        return float(RegularGridInterpolator(cell, values, method="linear")((i, o)))

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
            i, o = channels_after(c.name, (c.in_ch, c.out_ch), self.ins, self.outs, lost)
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


def _brackets(values: Sequence[int], x: int) -> List[Tuple[int, ...]]:
    """Grid axes around ``x``: the point itself, then its nearest neighbours on either side."""
    out = [(x,)] if x in values else []
    lo = [v for v in values if v < x]
    hi = [v for v in values if v > x]
    if lo and hi:
        out.append((max(lo), min(hi)))
    return out


def _cell(grid: Mapping[Tuple[int, int], float], i: int, o: int) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """The (in axis, out axis) of the nearest grid cell around (i, o) whose corners all have entries; an axis is
    a single point where the channel count is on the grid."""
    ins = sorted({a for a, _ in grid})
    outs = sorted({b for _, b in grid})
    for cell in itertools.product(_brackets(ins, i), _brackets(outs, o)):
        if all(corner in grid for corner in itertools.product(*cell)):
            return cell
    return None
