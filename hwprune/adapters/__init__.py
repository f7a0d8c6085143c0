"""Architecture adapters: what torch-pruning (the engine) cannot work out alone, per model family.

``hwprune.graph`` applies them whenever it traces, prunes or replays a pruning history, so a search, an export and
a replay all rebuild the same model. An adapter is selected by the module types present in the model and may
- ignore layers automatically, each with a reason that is reported (``auto_ignored``), never skip a model;
- declare channel groups (attention heads), so every head loses the same dimensions (``channel_groups``);
- swap an op for a traceable equivalent while torch-pruning traces (``tracing``) or while exporting (``exporting``);
- bring shape attributes in sync with the pruned weights (``fixup_after_pruning``: usable by any code that
  changes widths, e.g. hwprune/transformer_groups.py).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch.nn as nn

from hwprune.adapters.base import ROOT_TYPES, Adapter
from hwprune.adapters.maxvit import MaxVitAdapter
from hwprune.adapters.shufflenet import ShuffleNetV2Adapter
from hwprune.adapters.swin import SwinAdapter
from hwprune.adapters.vit import MultiheadAttentionAdapter, VisionTransformerAdapter

ADAPTERS: List[Adapter] = [
    ShuffleNetV2Adapter(),
    MultiheadAttentionAdapter(),
    VisionTransformerAdapter(),
    SwinAdapter(),
    MaxVitAdapter(),
]

__all__ = ["ADAPTERS", "Adapter", "ROOT_TYPES", "adapters_for", "auto_ignored", "channel_groups", "tracing", "exporting",
           "fixup_after_pruning"]


def adapters_for(model: nn.Module) -> List[Adapter]:
    return [a for a in ADAPTERS if a.applies_to(model)]


def auto_ignored(model: nn.Module) -> Dict[str, str]:
    """Layers whose outputs the adapters keep (module name -> reason)."""
    out: Dict[str, str] = {}
    for a in adapters_for(model):
        for name, reason in a.ignored(model).items():
            out.setdefault(name, reason)
    return out


def channel_groups(model: nn.Module) -> Dict[nn.Module, int]:
    out: Dict[nn.Module, int] = {}
    for a in adapters_for(model):
        out.update(a.channel_groups(model))
    return out


@contextlib.contextmanager
def tracing(model: nn.Module) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for a in adapters_for(model):
            stack.enter_context(a.tracing(model))
        yield


@contextlib.contextmanager
def exporting(model: nn.Module) -> Iterator[None]:
    """The context hwprune.export exports in (same values, ops the ONNX exporter supports)."""
    with contextlib.ExitStack() as stack:
        for a in adapters_for(model):
            stack.enter_context(a.exporting(model))
        yield


def fixup_after_pruning(model: nn.Module) -> nn.Module:
    """Re-derive the shape attributes of every adapted module from its (pruned) weights; returns ``model``."""
    for a in adapters_for(model):
        a.fixup(model)
    return model
