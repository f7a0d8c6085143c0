"""What an architecture adapter may tell hwprune's pruning path (see ``hwprune/adapters/__init__.py``)."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, Iterable, Tuple, Type

import torch.nn as nn


# Module types that root a dependency group (hwprune.graph re-exports this).
ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def all_roots_except(model: nn.Module, prunable: Iterable[str], reason: str) -> Dict[str, str]:
    """Every group root outside ``prunable``, each with ``reason``: for families where only some inner widths can be
    pruned safely, it is these, not the rest, that are listed (so a new layer type is kept, not broken)."""
    keep = set(prunable)
    return {n: reason for n, m in model.named_modules() if isinstance(m, ROOT_TYPES) and n not in keep}


class Adapter:
    """Family-specific knowledge that torch-pruning's generic tracing lacks. Every hook defaults to "nothing to
    add"; a family overrides only what it needs. ``triggers``: module types whose presence selects the adapter."""

    name: str = "adapter"
    triggers: Tuple[Type[nn.Module], ...] = ()

    def applies_to(self, model: nn.Module) -> bool:
        return any(isinstance(m, self.triggers) for m in model.modules())

    def ignored(self, model: nn.Module) -> Dict[str, str]:
        """Layers whose output channels must stay (module name -> one-line reason, reported to the user)."""
        return {}

    def channel_groups(self, model: nn.Module) -> Dict[nn.Module, int]:
        """Modules whose width splits into equal groups that must shrink equally (module -> groups), such as an
        attention module's heads: each head then loses the same dimensions (head-dim pruning)."""
        return {}

    def tracing(self, model: nn.Module) -> ContextManager:
        """A context in which torch-pruning traces the model (e.g. an op swapped for a traceable equivalent)."""
        return contextlib.nullcontext()

    def exporting(self, model: nn.Module) -> ContextManager:
        """A context in which the model is exported to ONNX (e.g. a fused kernel the exporter lacks turned off)."""
        return contextlib.nullcontext()

    def fixup(self, model: nn.Module) -> None:
        """Bring attributes that shapes are computed from in sync with the pruned weights (idempotent)."""
