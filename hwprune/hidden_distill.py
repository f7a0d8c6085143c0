"""Layer-wise distillation: the student's intermediate hidden states pulled toward the dense model's.

Matching only the final output leaves the student free to reach it any way it can, and after heads and MLP
channels are removed the early blocks drift while the last ones compensate. Matching every block's output as well
(TinyBERT, Jiao et al. 2020; CoFi, Xia et al. 2022) gives each block its own target. Width pruning of a transformer
keeps the residual stream's width, so each block's output has the dense block's shape and the two compare directly.

The blocks are the entries of the model's longest ``nn.ModuleList`` (a transformer's layers), or the modules the
space names by glob patterns; a block whose output shape differs from the dense block's (a narrowed CNN stage, say)
is skipped, as nothing would make the comparison meaningful without a learned projection.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from hwprune.errors import ConfigError


def default_blocks(model: nn.Module) -> List[str]:
    """Names of the entries of the model's longest ModuleList (the first of equal length): its stack of blocks."""
    best: List[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best):
            best = [f"{name}.{i}" if name else str(i) for i in range(len(m))]
    return best


def chosen_blocks(model: nn.Module, patterns: Sequence[str] = ()) -> List[str]:
    """The modules whose outputs are matched: by ``patterns`` (glob on module names) or the default stack."""
    if not patterns:
        return default_blocks(model)
    names = [n for n, _ in model.named_modules() if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ConfigError(f"recovery.distill_hidden_layers {list(patterns)} matches no module of the model; give "
                          f"glob patterns on module names (e.g. 'encoder.layer.*') or leave it empty for the default")
    return names


def _first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class HiddenStates:
    """Records the outputs of ``names`` in ``model`` on every forward pass while entered."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        self.names = [n for n in names if n in modules]
        self._modules = [modules[n] for n in self.names]
        self.outputs: Dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "HiddenStates":
        for name, m in zip(self.names, self._modules):
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(_m, _args, output):
            t = _first_tensor(output)
            if t is not None:
                self.outputs[name] = t
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.outputs.clear()


def hidden_loss(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor],
                mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Mean over matched blocks of the student's squared error relative to the dense output's energy,
    ||s - t||^2 / ||t||^2 over the tokens ``mask`` keeps (padding carries no meaning), so blocks whose activations
    differ in scale weigh alike. None when no block's shapes agree."""
    terms = []
    for name, t in teacher.items():
        s = student.get(name)
        if s is None or s.shape != t.shape:
            continue
        if mask is not None and t.dim() == 3 and mask.shape == t.shape[:2]:
            keep = mask.bool()
            s, t = s[keep], t[keep]
        t = t.float()
        terms.append((s.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean() if terms else None
