"""A pruning plan: the per-layer choices of one candidate, stored as JSON with every trial so it can be
replayed exactly (export rebuilds models from plans, never from pickles of search state)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from hwprune import graph, transformer_groups

PLAN_VERSION = 1


@dataclass
class PruningPlan:
    ratios: Dict[str, float]  # dependency group (root module name) -> fraction of its channels removed
    criterion: str = "l1"
    round_to: Optional[int] = None
    ignored: List[str] = field(default_factory=list)  # modules whose output channels are never removed
    structures: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # layer -> {structure, ratio, params}
    structure_importance: str = "l1"
    history: List[list] = field(default_factory=list)  # torch-pruning history, filled when the plan is applied
    # transformer groups (hwprune.transformer_groups): the heads / block positions removed, filled when applied
    removed: Dict[str, List[int]] = field(default_factory=dict)
    recovery_method: Optional[str] = None  # how the trial's recovery budget is spent (None: the space's first method)
    version: int = PLAN_VERSION

    @property
    def is_dense(self) -> bool:
        return all(r == 0 for r in self.ratios.values()) and all(
            s.get("ratio", 0) == 0 for s in self.structures.values()
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        d = json.loads(text)
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')} is not supported (expected {PLAN_VERSION})")
        return cls(**d)

    def realized_key(self) -> str:
        """What identifies the model an applied plan built: the channels, heads and blocks it removed, its
        per-layer structures and its recovery method (not the ratios asked for: 0.75 and 0.875 of 16 channels
        both keep 8 when rounded to multiples of 8, and build one model)."""
        import hashlib

        made = {"history": self.history, "removed": self.removed, "structures": self.structures,
                "recovery_method": self.recovery_method, "criterion": self.criterion}
        return hashlib.sha1(json.dumps(made, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def summary(self) -> str:
        pruned = {k: v for k, v in self.ratios.items() if v > 0}
        if not pruned and not self.structures:
            return "dense"
        parts = [f"{k}={v:g}" for k, v in pruned.items()]
        parts += [f"{k}:{s.get('structure')}={s.get('ratio', 0):g}" for k, s in self.structures.items()
                  if s.get("ratio", 0) > 0]
        if not parts:
            return "dense"
        return " ".join(parts)


def apply_plan(
    model: nn.Module,
    plan: PruningPlan,
    example_input: torch.Tensor,
    calibration: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    scores: Optional[Dict[str, torch.Tensor]] = None,
) -> Tuple[nn.Module, PruningPlan, list]:
    """A new, physically smaller model (the input model is untouched), the plan with its history recorded, and
    one report per layer that took a catalog structure (its executed form, format, effective MACs and bytes).
    ``scores``: data-driven importance per ``heads:`` / ``mlp:`` group (``hwprune.fisher``; criterion ``fisher``)."""
    # heads and blocks first (their choice is recorded); the channel groups, MLP widths included, after
    model, channel_ratios, removed = transformer_groups.apply(model, plan.ratios, example_input, plan.criterion,
                                                              scores=scores)
    mlp_scores = {transformer_groups.module_of(g): s for g, s in (scores or {}).items()
                  if transformer_groups.kind_of(g) == transformer_groups.MLP}
    pruned, history = graph.prune_groups(
        model, example_input, channel_ratios, plan.criterion, plan.round_to, plan.ignored, calibration,
        scores=mlp_scores,
    )
    plan = PruningPlan(**{**asdict(plan), "history": history, "removed": removed})
    pruned, reports = _apply_structures(pruned, plan, example_input)
    return pruned, plan, reports


def replay_plan(model: nn.Module, plan: PruningPlan, example_input: torch.Tensor) -> nn.Module:
    """Rebuild a plan's model exactly from its recorded history (same channels kept, same weights)."""
    if plan.history or plan.removed or all(r == 0 for r in plan.ratios.values()):
        model = transformer_groups.apply(model, {}, example_input, plan.criterion, removed=plan.removed)[0]
        pruned = graph.replay(model, example_input, plan.history)
        return _apply_structures(pruned, plan, example_input)[0]
    return apply_plan(model, plan, example_input)[0]


def _apply_structures(model: nn.Module, plan: PruningPlan, example_input: torch.Tensor) -> Tuple[nn.Module, list]:
    specs = {k: s for k, s in plan.structures.items() if s.get("ratio", 0) > 0}
    if not specs:
        return model, []
    from hwprune.structures import apply_layer_structures  # the catalog: masks, strided, depth, block, N:M, ...

    # Filter/channel pruning already happened through the dependency graph; these are the per-layer structures.
    return apply_layer_structures(model, specs, criterion=plan.structure_importance, example_input=example_input,
                                  physical="skip")
