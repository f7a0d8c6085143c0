"""Recovery methods: how a trial spends its training budget after pruning (``recovery.method`` in a search space).

Every method gets the same ``finetune_steps`` (its phases together never use more), starts from the model the plan
produced (BN recalibrated), and delivers a model whose masked layers meet their structure's target exactly.

  finetune   masked fine-tuning (masks fixed, projected after every step)
  iterative  gradual magnitude pruning from the dense weights to the target (Zhu & Gupta cubic), then fine-tuning
  dpu        dynamic masks recomputed every k steps, straight-through gradients (DPU; one_stage or multi_step)
  admm       ADMM towards the structure's constraint set (unify: Lin et al.), hard projection, masked fine-tuning
  cdp_dtc    learnable group skeleton with CDP's penalty and the dynamic threshold container, then fine-tuning
  reconstruct  least-squares refit of the layers consuming pruned heads/channels (Kwon et al. 2022), then fine-tuning
"""
from __future__ import annotations

from typing import Dict, Tuple

from hwprune.errors import ConfigError
from hwprune.recovery.base import RecoveryMethod

_METHODS: Dict[str, RecoveryMethod] = {}


def _register() -> None:
    from hwprune.recovery.admm import Admm
    from hwprune.recovery.cdp_dtc import CdpDtc
    from hwprune.recovery.dpu import Dpu
    from hwprune.recovery.finetune import Finetune
    from hwprune.recovery.iterative import Iterative
    from hwprune.recovery.reconstruct import Reconstruct

    for cls in (Finetune, Iterative, Dpu, Admm, CdpDtc, Reconstruct):
        _METHODS[cls.name] = cls()


def method_names() -> Tuple[str, ...]:
    if not _METHODS:
        _register()
    return tuple(_METHODS)


def get_method(name: str) -> RecoveryMethod:
    if not _METHODS:
        _register()
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"recovery method {name!r} is unknown; choose one of: {', '.join(_METHODS)}") from None
