"""The mask contract, the ``Structure`` interface, per-layer reports and closed-form cost helpers.

Mask contract (every structure in the registry meets it)
--------------------------------------------------------
A structure partitions a layer's weight into ``n`` groups and gives each group a score (low = cheap to remove).
For a ratio ``r`` in [0, 1] exactly ``k = n_removed(n, r) = floor(r * n + 0.5)`` groups are removed (round half up,
computed in float64, clipped to [0, n]). Groups are ranked once by (score ascending, flat group index ascending) with a
stable sort, and the first ``k`` are removed; so masks are nested as the ratio grows, ratio 0 removes nothing
(identity), and equal scores are broken by index (deterministic replay).

"Removed" means what the structure does to a group: zeroed (filter, kernel, block ...), replaced by its shortcut
(depth), made strided (strided: the group is an input channel whose kernels keep every s-th position), made N:M sparse
(nm: the group is an M-window), or given one shared absolute value (unify). ``mixed`` meets the contract per part.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from hwprune.errors import ConfigError

FP32_BYTES = 4
INDEX_BYTES = 4  # int32 indices in CSR / BSR / block lists


# ----------------------------------------------------------------------------------------------- mask contract
def n_removed(n_groups: int, ratio: float) -> int:
    """Number of groups removed at ``ratio``: floor(ratio * n + 0.5) (round half up), clipped to [0, n]."""
    check_ratio(ratio)
    return int(min(n_groups, max(0, math.floor(float(ratio) * n_groups + 0.5))))


def check_ratio(ratio: float, what: str = "ratio") -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) <= 1.0):
        raise ConfigError(f"{what} {ratio!r} is not a number in [0, 1]; give a fraction such as 0.5")


def removal_order(scores: torch.Tensor) -> torch.Tensor:
    """Flat group indices in removal order: score ascending, ties by index (stable)."""
    s = scores.detach().reshape(-1).to(torch.float64).cpu().numpy()
    if np.isnan(s).any():
        raise ValueError("group scores contain NaN; check the weights or the calibration gradients")
    return torch.from_numpy(np.argsort(s, kind="stable").copy())


def keep_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean keep-mask over groups (shape of ``scores``) removing exactly ``n_removed(n, ratio)`` groups."""
    n = scores.numel()
    k = n_removed(n, ratio)
    keep = torch.ones(n, dtype=torch.bool)
    if k:
        keep[removal_order(scores)[:k]] = False
    return keep.reshape(scores.shape)


def keep_from_removed(n_groups: int, removed: Sequence[int]) -> torch.Tensor:
    """Keep-mask from an explicit list of removed flat group indices (e.g. a particle-filter result in a plan)."""
    keep = torch.ones(n_groups, dtype=torch.bool)
    idx = [int(i) for i in removed]
    bad = [i for i in idx if not 0 <= i < n_groups]
    if bad:
        raise ConfigError(f"removed group indices {bad[:5]} are outside 0..{n_groups - 1}; replay the plan on the model it was made for")
    keep[idx] = False
    return keep


# ----------------------------------------------------------------------------------------------- reports
@dataclass
class LayerReport:
    """What a structure did to one layer, and what it costs as realized.

    ``macs_effective``: multiply-accumulates the realized module executes in PyTorch (skipped work is counted
    only where the executed form skips it). ``macs_onnx``: the same for its ONNX export (sparse formats export dense).
    ``bytes_deployed``: weight+bias storage in ``format``; ``bytes_dense``: the same tensors stored dense fp32.
    MACs are per forward pass at the recorded input shape, None when no input shape was known.
    """

    structure: str
    ratio: float
    params: Dict[str, Any]
    layer: str = ""
    groups: int = 0
    groups_removed: int = 0
    weights: int = 0  # weight elements before
    weights_kept: int = 0  # non-zero (or remaining) weight elements after
    executed: str = "dense-masked"  # physical | gather | bsr | csr | semi-structured | dense-masked | identity
    format: str = "dense"  # deployed storage format
    macs_dense: Optional[int] = None
    macs_effective: Optional[int] = None
    macs_onnx: Optional[int] = None
    bytes_dense: int = 0
    bytes_deployed: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- costs
def bytes_dense(numel: int) -> int:
    return FP32_BYTES * int(numel)


def bytes_csr(nnz: int, rows: int) -> int:
    """CSR: fp32 values + int32 column index per non-zero + int32 row pointers (rows + 1)."""
    return int(nnz) * (FP32_BYTES + INDEX_BYTES) + (int(rows) + 1) * INDEX_BYTES


def bytes_bsr(n_blocks: int, block_r: int, block_c: int, block_rows: int) -> int:
    """BSR: dense fp32 b_r x b_c per stored block + int32 block-column index per block + block-row pointers."""
    return int(n_blocks) * (block_r * block_c * FP32_BYTES + INDEX_BYTES) + (int(block_rows) + 1) * INDEX_BYTES


def bytes_nm(nnz: int, m: int) -> int:
    """N:M: fp32 kept values + ceil(log2 M) metadata bits per kept value (position inside its M-window)."""
    bits = max(1, math.ceil(math.log2(m)))
    return int(nnz) * FP32_BYTES + math.ceil(int(nnz) * bits / 8)


def bytes_unified(n_unified: int, n_free: int, block_elems: int, block_rows: int) -> int:
    """Unified micro-blocks: a unified block stores one fp32 value + one sign bit per weight; a free block stores
    its fp32 values; every stored block has an int32 block-column index and one kind bit; pruned blocks cost
    nothing beyond the block-row pointers (block_rows + 1 int32)."""
    stored = int(n_unified) + int(n_free)
    return (
        int(n_unified) * (FP32_BYTES + math.ceil(block_elems / 8))
        + int(n_free) * block_elems * FP32_BYTES
        + stored * INDEX_BYTES
        + math.ceil(stored / 8)
        + (int(block_rows) + 1) * INDEX_BYTES
    )


def conv_out_hw(module: nn.Conv2d, h: int, w: int) -> Tuple[int, int]:
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    ph, pw = module.padding if not isinstance(module.padding, str) else (0, 0)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def positions(module: nn.Module, in_shape: Optional[Sequence[int]]) -> Optional[int]:
    """How many times the layer's GEMM weight is applied per forward pass: N*Hout*Wout for conv, tokens for Linear."""
    if in_shape is None:
        return None
    if isinstance(module, nn.Conv2d):
        ho, wo = conv_out_hw(module, int(in_shape[-2]), int(in_shape[-1]))
        return int(in_shape[0]) * ho * wo
    if isinstance(module, nn.Linear):
        return int(np.prod([int(d) for d in in_shape[:-1]])) if len(in_shape) > 1 else 1
    return None


def gemm_shape(weight: torch.Tensor, module: Optional[nn.Module] = None) -> Tuple[int, int]:
    """(rows, cols) of the weight in GEMM view: Linear [O, I]; conv [O, C/g * kh * kw] (per group for grouped)."""
    return int(weight.shape[0]), int(weight[0].numel())


def dense_macs(module: nn.Module, in_shape: Optional[Sequence[int]]) -> Optional[int]:
    pos = positions(module, in_shape)
    if pos is None:
        return None
    return int(module.weight.numel()) * pos


# ----------------------------------------------------------------------------------------------- helpers
def is_conv2d(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and type(m) is not nn.ConvTranspose2d


def weighted_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "weight", None) is not None


def masked_copy(module: nn.Module, emask: torch.Tensor) -> nn.Module:
    """A deep copy of ``module`` whose weight is zero where ``emask`` is False (dense execution)."""
    new = copy.deepcopy(module)
    with torch.no_grad():
        new.weight.mul_(emask.to(new.weight.dtype))
    return new


def module_bias_numel(module: nn.Module) -> int:
    b = getattr(module, "bias", None)
    return int(b.numel()) if b is not None else 0


class _Weight(nn.Module):
    """Stands in for a module whose weight is ``weight`` (re-deriving masks from trained weights)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


class Structure:
    """A sparse structure family. Subclasses define groups, scores, masks and the realized module."""

    name: str = ""
    physical: bool = False  # the realized model is a smaller dense computation
    description: str = ""
    param_choices: Dict[str, Tuple[Any, ...]] = {}  # what suggest_layer may choose (Optuna categorical values)
    default_params: Dict[str, Any] = {}
    fixed_ratio: Optional[float] = None  # the ratio suggest_layer uses instead of searching one (nm)

    # -- parameters
    def check_params(self, params: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        p = dict(self.default_params)
        unknown = set(params or {}) - set(self.default_params) - {"removed"}
        if unknown:
            raise ConfigError(
                f"structure {self.name!r}: unknown params {sorted(unknown)}; valid params: "
                f"{', '.join(sorted(self.default_params)) or 'none'}"
            )
        p.update(params or {})
        return p

    def applies_to(self, module: nn.Module) -> bool:
        return weighted_layer(module)

    # -- groups
    def group_index(self, weight: torch.Tensor, params: Dict[str, Any]) -> Tuple[torch.Tensor, int]:
        """Long tensor shaped like ``weight`` mapping every element to its flat group id, and the group count."""
        raise NotImplementedError

    def n_groups(self, module: nn.Module, params: Optional[Dict[str, Any]] = None) -> int:
        return self.group_index(module.weight, self.check_params(params))[1]

    def scores(
        self,
        weight: torch.Tensor,
        criterion: str = "l1",
        params: Optional[Dict[str, Any]] = None,
        grad: Optional[torch.Tensor] = None,
        module: Optional[nn.Module] = None,
        bn: Optional[nn.Module] = None,
    ) -> torch.Tensor:
        from hwprune.importance import group_scores

        p = self.check_params(params)
        idx, n = self.group_index(weight, p)
        return group_scores(weight, idx, n, criterion, grad=grad)

    def mask(self, scores: torch.Tensor, ratio: float) -> torch.Tensor:
        return keep_mask(scores, ratio)

    def element_mask(self, weight: torch.Tensor, keep: torch.Tensor, params: Dict[str, Any]) -> torch.Tensor:
        """Element keep-mask (shape of ``weight``) from the group keep-mask."""
        idx, _ = self.group_index(weight, params)
        return keep.reshape(-1)[idx]

    # -- realization
    def realize(self, module: nn.Module, emask: torch.Tensor, params: Dict[str, Any], keep: torch.Tensor) -> nn.Module:
        return masked_copy(module, emask)

    def apply(
        self,
        module: nn.Module,
        ratio: float,
        params: Optional[Dict[str, Any]] = None,
        criterion: str = "l1",
        grad: Optional[torch.Tensor] = None,
        in_shape: Optional[Sequence[int]] = None,
        bn: Optional[nn.Module] = None,
        removed: Optional[Sequence[int]] = None,
    ) -> Tuple[nn.Module, LayerReport]:
        """Realize the structure on one module; returns a new module (the input is not modified) and its report."""
        check_ratio(ratio)
        if not self.applies_to(module):
            raise ConfigError(
                f"structure {self.name!r} does not apply to a {type(module).__name__}; "
                f"choose a structure listed by `hwprune structures` for this layer type"
            )
        p = self.check_params(params)
        removed = p.pop("removed", removed)
        w = module.weight.detach()
        if removed is not None:
            keep = keep_from_removed(self.group_index(w, p)[1], removed)
        else:
            sc = self.scores(w, criterion, p, grad=grad, module=module, bn=bn)
            keep = self.mask(sc, ratio)
        emask = self.element_mask(w, keep, p)
        new = self.realize(module, emask, p, keep)
        if not self.physical:
            self.hold(module, new, emask, p, keep, {"structure": self.name, "ratio": float(ratio), "params": dict(p),
                                                    "criterion": criterion})
        rep = self.report(module, new, emask, keep, ratio, p, in_shape)
        return new, rep

    def element_keep(self, weight: torch.Tensor, ratio: float, params: Dict[str, Any], criterion: str = "l1") -> torch.Tensor:
        """The element keep-mask of this structure at ``ratio`` computed from ``weight`` (what gradual and dynamic
        recovery methods recompute as the weights train)."""
        p = self.check_params(params)
        return self.element_mask(weight, self.mask(self.scores(weight.detach(), criterion, p), ratio), p)

    def reattach(self, module: nn.Module, weight: torch.Tensor, spec: Dict[str, Any]) -> None:
        """Re-derive the mask of an already masked ``module`` from ``weight`` at ``spec``'s ratio (exactly, by the
        mask contract) and impose it; the remembered dense weights stay."""
        from hwprune.structures.masks import DENSE

        w = weight.detach().cpu()
        p = self.check_params(spec["params"])
        crit = spec.get("criterion", "l1")
        crit = crit if crit in ("l1", "l2", "block_mean") else "l1"  # taylor/bn/pf need inputs a trained model lacks
        keep = self.mask(self.scores(w, crit, p), spec["ratio"])
        dense = module._buffers.get(DENSE)
        self.hold(_Weight(w), module, self.element_mask(w, keep, p), p, keep, spec)
        if dense is not None:
            module._buffers[DENSE] = dense

    def hold(self, module: nn.Module, new: nn.Module, emask: torch.Tensor, params: Dict[str, Any], keep: torch.Tensor,
             spec: Dict[str, Any]) -> None:
        """Make the realized module carry its mask through training (see ``masks``); dense-shaped weights only."""
        from hwprune.structures.masks import attach

        w = getattr(new, "weight", None)
        if isinstance(w, torch.Tensor) and w.layout == torch.strided and tuple(w.shape) == tuple(emask.shape):
            attach(new, emask, spec=spec, dense=module.weight.detach())

    def report(self, module, new, emask, keep, ratio, params, in_shape) -> LayerReport:
        """Default: dense-masked execution (counted dense), deployed as CSR when that is smaller than dense."""
        nnz = int(emask.sum())
        rows, _ = gemm_shape(module.weight)
        dm = dense_macs(module, in_shape)
        bd = bytes_dense(module.weight.numel() + module_bias_numel(module))
        csr = bytes_csr(nnz, rows) + bytes_dense(module_bias_numel(module))
        return LayerReport(
            structure=self.name, ratio=float(ratio), params=dict(params), groups=int(keep.numel()),
            groups_removed=int((~keep).sum()), weights=int(module.weight.numel()), weights_kept=nnz,
            executed="dense-masked", format="csr" if csr < bd else "dense",
            macs_dense=dm, macs_effective=dm, macs_onnx=dm, bytes_dense=bd, bytes_deployed=min(csr, bd),
        )
