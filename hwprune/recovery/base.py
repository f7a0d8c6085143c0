"""The recovery-method interface and what the methods share: the masked layers they act on, restarting those
layers from their dense weights, and re-imposing a structure's exact mask from the current weights."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from hwprune.config import RecoveryBudget
from hwprune.data import DataBundle
from hwprune.errors import ConfigError
from hwprune.structures import get_structure
from hwprune.structures.masks import DENSE, KEEP, SIGN, TIE, iter_specs, project_module


class Layer:
    """One masked layer a method works on: the module, its spec and structure."""

    def __init__(self, name: str, module: nn.Module, spec: Dict[str, Any]):
        self.name, self.module, self.spec = name, module, spec
        self.structure = get_structure(spec["structure"])
        self.params = self.structure.check_params(spec["params"])

    @property
    def weight(self) -> torch.Tensor:
        from hwprune.structures.masks import _weight_tensor

        return _weight_tensor(self.module)

    def keep_at(self, ratio: float, weight: Optional[torch.Tensor] = None, criterion: Optional[str] = None) -> torch.Tensor:
        """The structure's element keep-mask at ``ratio`` from ``weight`` (default: the current weight)."""
        w = self.weight if weight is None else weight
        return self.structure.element_keep(w.detach().cpu(), ratio, self.params,
                                           criterion or self.spec.get("criterion", "l1")).to(w.device)

    def set_keep(self, keep: torch.Tensor) -> None:
        self.module._buffers[KEEP] = keep.to(self.module._buffers[KEEP].device, torch.bool)
        project_module(self.module)

    def restart_dense(self) -> None:
        """Weights back to the dense values the plan pruned, nothing masked (gradual/dynamic methods start here)."""
        with torch.no_grad():
            self.weight.copy_(self.module._buffers[DENSE])
        self.module._buffers[KEEP] = torch.ones_like(self.module._buffers[KEEP])
        for name in (TIE, SIGN):  # unify's tied tiles are free again until the structure is re-imposed
            self.module._buffers.pop(name, None)

    def finalize(self, weight: Optional[torch.Tensor] = None) -> None:
        """Impose the structure at the spec's ratio, exactly (mask contract), from ``weight`` (default: current)."""
        self.structure.reattach(self.module, self.weight if weight is None else weight, self.spec)


class RecoveryMethod:
    """A way to spend the recovery budget. ``run`` trains ``model`` in place (at most ``budget.finetune_steps``
    optimizer steps in all) and returns it with every masked layer at its target structure."""

    name = ""
    description = ""
    # hyperparameters in the YAML section named after the method: key -> (type, min, max, default)
    param_types: Dict[str, Tuple[type, Any, Any, Any]] = {}
    choices: Dict[str, Tuple[str, ...]] = {}  # string hyperparameters and their valid values

    def params(self, budget: RecoveryBudget) -> Dict[str, Any]:
        p = {k: v[3] for k, v in self.param_types.items()}
        p.update(budget.method_params.get(self.name, {}))
        return p

    def why_not(self, layer: Layer) -> Optional[str]:
        """None when the method applies to the layer's structure, else the reason (one line)."""
        return None

    def layers(self, model: nn.Module, log: Optional[Callable[[str], None]]) -> List[Layer]:
        """The masked layers this method acts on; the others are only fine-tuned with their masks (said once)."""
        out, skipped = [], {}
        for name, module, spec in iter_specs(model):
            layer = Layer(name, module, spec)
            reason = self.why_not(layer)
            if reason is None:
                out.append(layer)
            else:
                skipped.setdefault(reason, []).append(name)
        if not out and not skipped and self.name != "finetune" and log is not None:
            log(f"recovery {self.name}: the plan has no mask-only layers (filter, channel, depth and strided are "
                f"removed physically); its budget fine-tunes the model")
        for reason, names in skipped.items():
            msg = f"recovery {self.name}: {reason}; layers {', '.join(names)} are fine-tuned with their masks"
            (log or (lambda m: None))(msg)
        return out

    def run(self, model: nn.Module, data: DataBundle, budget: RecoveryBudget, teacher: Optional[nn.Module] = None,
            seed: int = 0, log: Optional[Callable[[str], None]] = None) -> nn.Module:
        """Spend the budget's steps on ``model`` (in place; returned). ``teacher`` is the dense model when the caller
        has it: distilled from only where the budget distils (``train_budget`` decides), usable as a reference."""
        raise NotImplementedError


def split_steps(total: int, fraction: float) -> Tuple[int, int]:
    """(first phase, rest) of ``total`` steps."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"phase fraction {fraction!r} is not in [0, 1]")
    first = int(round(total * fraction))
    return first, total - first


def cubic_ratio(target: float, t: int, ramp: int) -> float:
    """Zhu & Gupta's gradual schedule s_t = s_f (1 - (1 - t/T)^3), s_T = s_f."""
    if ramp <= 0:
        return target
    return target * (1.0 - (1.0 - min(t, ramp) / ramp) ** 3)
