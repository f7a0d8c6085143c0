"""The structure registry: name -> Structure instance."""
from __future__ import annotations

from typing import Dict, Tuple

from hwprune.errors import ConfigError
from hwprune.structures.base import Structure

_REGISTRY: Dict[str, Structure] = {}


def register_structure(structure: Structure) -> Structure:
    _REGISTRY[structure.name] = structure
    return structure


def structure_names() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def get_structure(name: str) -> Structure:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"structure {name!r} is unknown; valid structures: {', '.join(_REGISTRY)}") from None


def _register_builtins() -> None:
    from hwprune.structures.block import BlockStructure
    from hwprune.structures.depth import DepthStructure
    from hwprune.structures.filter_channel import ChannelStructure, FilterStructure
    from hwprune.structures.fine import ConnectionStructure, KernelColumnStructure, KernelRowStructure, KernelStructure
    from hwprune.structures.mixed import MixedStructure
    from hwprune.structures.nm import NMStructure
    from hwprune.structures.strided import StridedStructure
    from hwprune.structures.unify import UnifyStructure

    for cls in (FilterStructure, ChannelStructure, DepthStructure, StridedStructure, KernelStructure,
                KernelRowStructure, KernelColumnStructure, ConnectionStructure, BlockStructure, NMStructure,
                UnifyStructure, MixedStructure):
        register_structure(cls())


_register_builtins()
