"""Modules that run a sparse copy of their (masked, dense) weight: the copy is derived state, rebuilt rather than
copied. torch cannot deepcopy or pickle BSR/CSR tensors ("Cannot access storage of SparseCsrTensorImpl"), and
``module.to(device/dtype)`` would not move a plain tensor attribute; both are what a latency backend does to every
module it times."""
from __future__ import annotations

from typing import Any, Dict

from torch import nn


class DerivedSparseWeight(nn.Module):
    """Base for modules whose ``_sparse`` attribute is built from ``weight`` by ``refresh()``.

    Deepcopy and pickle carry everything but ``_sparse`` and rebuild it; ``.to()`` / ``.half()`` / ``.cuda()`` move
    the dense weight and rebuild it on the new device and dtype."""

    _sparse: Any = None

    def refresh(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_sparse", None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.refresh()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.refresh()
        return out
