"""Sparse structures: a registry of structure families that all meet one mask contract (see ``base``), their
realization in forms hardware can use, per-layer cost reports and hardware capability.

Public API::

    get_structure(name) -> Structure            structure_names() -> tuple
    Structure.apply(module, ratio, params, criterion, grad=None, in_shape=None, bn=None) -> (module, LayerReport)
    apply_layer_structures(model, specs, criterion="l1", example_input=None, ...) -> (model, [LayerReport])
    suggest_layer(trial, layer_name, module, allowed, ratios) -> spec | None
    capability(profile, measure=False) ; structures_table(profiles, measure=False) -> str
"""
from hwprune.structures.base import (  # noqa: F401
    LayerReport, Structure, bytes_bsr, bytes_csr, bytes_dense, bytes_nm, bytes_unified, keep_mask, n_removed,
)
from hwprune.structures.registry import get_structure, register_structure, structure_names  # noqa: F401
from hwprune.structures.block import SparseLinear  # noqa: F401
from hwprune.structures.depth import Shortcut, register_residual, residual_kind, silence_branch  # noqa: F401
from hwprune.structures.filter_channel import prune_conv_pair, realize_physical, slice_bn, slice_in, slice_out  # noqa: F401
from hwprune.structures.strided import GatherConv2d  # noqa: F401
from hwprune.structures.unify import admm_unify, unify_project  # noqa: F401
from hwprune.structures.model import apply_layer_structures, normalize_spec, suggest_layer  # noqa: F401
from hwprune.structures.capability import capability, declared_capability, structures_table  # noqa: F401
