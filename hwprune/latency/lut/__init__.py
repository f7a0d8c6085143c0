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
     checked against the rounding rule ``hwprune.rounding.removed_channels`` (the one graph.py prunes with:
     keep ``int(C * (1 - r))`` channels, rounded down to a multiple of ``round_to``), which then also serves
     ratios outside the table's list.
  4. Every distinct op configuration (same type, in/out, kernel, stride, padding, groups, input size, BN and
     activation) is exported to ONNX and measured once on the profile's backend, at the profile's batch size.
  5. Calibration: the dense model, a few uniform plans and a few random plans are measured whole;
     ``measured = scale * sum(entries) + overhead_ms`` is fitted robustly, Theil-Sen (``scipy.stats.theilslopes``;
     with the dense model alone: scale 1, overhead = dense - sum).
     The overhead covers what the table does not hold (adds, pooling, reorders, session overhead); the scale
     absorbs the systematic difference between layers run alone and inside the model (layout conversions at
     their boundaries, weights that stay in cache when a layer runs alone, time slicing on a busy machine).

Prediction: ``scale * sum(entry for each layer call) + overhead_ms``. A configuration missing from the table
(a ratio or round_to outside the space it was built for) is interpolated bilinearly in (in, out) over the
nearest cell of the same op's grid whose corners are all held (``scipy.interpolate.RegularGridInterpolator``;
linearly in channels for depthwise convs); one that no grid brackets raises ``TableMiss``. ``predict(..., interpolate=False)`` raises on any miss instead.

A table is bound to the device fingerprint of the backend it was measured with and to the search space's name;
``LatencyTable.load(path, fingerprint=..., space=...)`` refuses another one with a one-line ``TableMismatch``.

Modules, by job: ``trace`` (the conv / linear calls of a forward pass, op keys), ``coverage`` (which channel counts
the space gives each layer, steps 2-3), ``build`` (measuring entries and calibration models, steps 4-5), ``stats``
(the calibration fit and the predictor's error and rank correlations), ``table`` (the table: persistence,
interpolation, prediction), ``screen`` (skipping candidates predicted over a latency budget).
"""
from __future__ import annotations

from hwprune.latency.lut.build import Progress, build_lut
from hwprune.latency.lut.coverage import MAX_COMBINATIONS, layer_configs
from hwprune.latency.lut.screen import LutScreen, screen
from hwprune.latency.lut.stats import fit_calibration, kendall, predictor_error, spearman
from hwprune.latency.lut.table import FORMAT, VERSION, LatencyTable, TableMismatch, TableMiss
from hwprune.latency.lut.trace import ACTIVATIONS, LayerCall, trace_layers
from hwprune.rounding import removed_channels

__all__ = [
    "ACTIVATIONS", "FORMAT", "MAX_COMBINATIONS", "VERSION", "LatencyTable", "LayerCall", "LutScreen", "Progress",
    "TableMismatch", "TableMiss", "build_lut", "fit_calibration", "kendall", "layer_configs", "predictor_error",
    "removed_channels", "screen", "spearman", "trace_layers",
]
