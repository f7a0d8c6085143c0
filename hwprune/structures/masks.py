"""Masks that hold: a layer realized by a mask-only structure carries its constraint, and every training step
projects its weight back onto it, so the zeros the plan asked for are still zeros in the delivered weights.

A masked module carries non-persistent buffers (never in ``state_dict``: delivered weights stay plain tensors;
they travel with ``copy.deepcopy`` and are dropped by ``strip`` before export):

* ``hw_keep``  bool, shape of ``weight``: False where the weight must stay 0;
* ``hw_tie``   long, shape of ``weight``: tile id of weights tied to one shared |value| (``unify``), -1 = free;
* ``hw_sign``  float, the fixed signs of tied weights;
* ``hw_dense`` the layer's weight before the structure was applied (methods that re-derive masks start there),

and a plain attribute ``hw_spec`` = {structure, ratio, params, criterion} so a recovery method can recompute the
structure's mask at another ratio (gradual and dynamic methods).

Why projection and not ``torch.nn.utils.parametrize``: both keep the zeros exactly and, measured on the demo model
(``scripts/bench_mask_hold.py``, README), cost the same within noise (under 2% of a step). Projection leaves the
delivered weights as the parameters themselves (nothing to remove before export), works in any training loop
through an optimizer step hook, and leaves parametrizations free for the methods that need a forward-time mask
(DPU's straight-through mask, CDP's skeleton), which would otherwise stack on top of it.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

KEEP, TIE, SIGN, DENSE = "hw_keep", "hw_tie", "hw_sign", "hw_dense"
_BUFFERS = (KEEP, TIE, SIGN, DENSE)


def attach(module: nn.Module, keep: torch.Tensor, spec: Optional[Dict[str, Any]] = None,
           dense: Optional[torch.Tensor] = None, tie: Optional[torch.Tensor] = None,
           sign: Optional[torch.Tensor] = None) -> nn.Module:
    """Give ``module.weight`` a constraint that holds through training; projects once right away."""
    w = module.weight
    if tuple(keep.shape) != tuple(w.shape):
        raise ValueError(f"mask shape {tuple(keep.shape)} differs from the weight shape {tuple(w.shape)}")
    module.register_buffer(KEEP, keep.to(device=w.device, dtype=torch.bool).clone(), persistent=False)
    if tie is not None:
        module.register_buffer(TIE, tie.to(device=w.device, dtype=torch.long).clone(), persistent=False)
        module.register_buffer(SIGN, sign.to(device=w.device, dtype=w.dtype).clone(), persistent=False)
    else:
        for name in (TIE, SIGN):
            module._buffers.pop(name, None)
    if dense is not None:
        module.register_buffer(DENSE, dense.detach().to(device=w.device, dtype=w.dtype).clone(), persistent=False)
    if spec is not None:
        module.hw_spec = dict(spec)
    project_module(module)
    return module


def is_masked(module: nn.Module) -> bool:
    return KEEP in getattr(module, "_buffers", {})


def masked_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_masked(m)]


@torch.no_grad()
def project_module(module: nn.Module) -> None:
    """Put the weight back onto its constraint: zeros where ``hw_keep`` is False, tied tiles at sign * mean."""
    w = _weight_tensor(module)
    keep = module._buffers[KEEP]
    tie = module._buffers.get(TIE)
    if tie is not None:
        sign = module._buffers[SIGN]
        tied = tie >= 0
        ids = tie[tied]
        n = int(ids.max()) + 1 if ids.numel() else 0
        if n:
            total = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, ids, (sign * w)[tied])
            count = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, ids, torch.ones_like(ids, dtype=w.dtype))
            w[tied] = sign[tied] * (total / count)[ids]
    w.mul_(keep.to(w.dtype))


def _weight_tensor(module: nn.Module) -> torch.Tensor:
    """The trainable weight tensor (under a parametrization: the original)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def project_(model: nn.Module) -> None:
    for _, m in masked_modules(model):
        project_module(m)


class hold:
    """Context manager: every ``optimizer.step()`` inside it is followed by a projection of the model's masked
    layers (and SparseLinear copies are refreshed on the next inference). Projects on entry and exit too."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.optimizer, self.model = optimizer, model
        self._handle = None

    def __enter__(self):
        project_(self.model)
        if masked_modules(self.model):
            self._handle = self.optimizer.register_step_post_hook(lambda opt, args, kwargs: project_(self.model))
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
        project_(self.model)
        return False


def strip(model: nn.Module) -> nn.Module:
    """Drop the constraint buffers and any parametrization (keeping the parametrized values): a plain model."""
    from torch.nn.utils import parametrize

    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        for name in _BUFFERS:
            m._buffers.pop(name, None)
        if "hw_spec" in m.__dict__:
            del m.__dict__["hw_spec"]
    return model


def iter_specs(model: nn.Module) -> Iterator[Tuple[str, nn.Module, Dict[str, Any]]]:
    """(name, module, spec) of masked layers whose structure can be recomputed from a dense weight."""
    for n, m in masked_modules(model):
        spec = getattr(m, "hw_spec", None)
        if spec is not None and DENSE in m._buffers:
            yield n, m, spec


def zero_fraction(model: nn.Module) -> Dict[str, float]:
    """Fraction of exactly-zero weights of every masked layer (what a test or a report checks)."""
    return {n: float((_weight_tensor(m) == 0).float().mean()) for n, m in masked_modules(model)}
