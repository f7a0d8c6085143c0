"""Dependency-aware physical pruning. The only module that imports torch_pruning (the engine; we never trace
graphs ourselves).

A *group* is a set of coupled channels that must be removed together (conv -> BN -> residual add -> the next
convs' input channels). Groups are named by their root module's qualified name, which is what plans store.

Architecture adapters (hwprune/adapters) supply what torch-pruning cannot infer (layers to keep, attention head
counts, a traceable stand-in for an op, attribute fix-ups after pruning); they apply on every path here.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hwprune import adapters
from hwprune.adapters import ROOT_TYPES, auto_ignored, fixup_after_pruning
from hwprune.errors import ModelError
from hwprune.rounding import ratio_keeping_round_to

__all__ = ["ROOT_TYPES", "PrunableGroup", "auto_ignored", "build_graph", "list_groups", "prune_groups", "replay",
           "channel_counts", "global_ratios", "fixup_after_pruning"]


def _tp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_pruning as tp
    return tp


@dataclass(frozen=True)
class PrunableGroup:
    name: str  # root module's qualified name
    channels: int  # prunable channels in the group
    members: Tuple[str, ...]  # every module the group touches


def _names(model: nn.Module) -> Dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _modules_by_name(model: nn.Module, names: Sequence[str]) -> List[nn.Module]:
    table = dict(model.named_modules())
    return [table[n] for n in names if n in table]


def _ignored_modules(model: nn.Module, ignored: Sequence[str]) -> List[nn.Module]:
    """The user's ignored layers plus those the architecture adapters keep."""
    return _modules_by_name(model, list(dict.fromkeys(list(ignored) + list(auto_ignored(model)))))


def _group_options(model: nn.Module) -> dict:
    # Fresh dicts on every call: torch-pruning's defaults for these are shared mutable dicts that it updates.
    return {"out_channel_groups": adapters.channel_groups(model), "in_channel_groups": {}, "num_heads": {}}


def build_graph(model: nn.Module, example_input: torch.Tensor):
    tp = _tp()
    try:
        # torch-pruning traces autograd, so it needs grad on
        with torch.enable_grad(), warnings.catch_warnings(), adapters.tracing(model):
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    except Exception as e:
        raise ModelError(f"torch-pruning could not trace the model's dependency graph ({type(e).__name__}: {e})") from e


def list_groups(
    model: nn.Module, example_input: torch.Tensor, ignored: Sequence[str] = ()
) -> List[PrunableGroup]:
    """Every prunable dependency group, in model order. ``ignored`` module names never lose output channels."""
    dg = build_graph(model, example_input)
    names = _names(model)
    groups = []
    seen = set()
    for group in dg.get_all_groups(ignored_layers=_ignored_modules(model, ignored), root_module_types=ROOT_TYPES):
        root = group[0].dep.target.module
        name = names.get(root)
        if name is None or name in seen:
            continue
        seen.add(name)
        members = []
        for dep, _ in group:
            for m in (dep.source.module, dep.target.module):
                n = names.get(m)
                if n is not None and n not in members:
                    members.append(n)
        groups.append(PrunableGroup(name, int(dg.get_out_channels(root)), tuple(members)))
    order = {n: i for i, n in enumerate(names.values())}
    return sorted(groups, key=lambda g: order[g.name])


def _importance(criterion: str, scores: Optional[Dict[nn.Module, torch.Tensor]] = None):
    tp = _tp()
    imp = tp.importance
    if scores:
        return _GivenImportance(_importance("l1" if criterion == "fisher" else criterion), scores)
    if criterion in ("l1", "fisher"):  # fisher: data-driven scores where given (heads, MLP), magnitude elsewhere
        return imp.MagnitudeImportance(p=1)
    if criterion == "l2":
        return imp.MagnitudeImportance(p=2)
    if criterion == "bn_scale":
        return imp.BNScaleImportance()
    if criterion == "taylor":
        return imp.TaylorImportance()
    if criterion == "random":
        return imp.RandomImportance()
    raise ModelError(f"unknown importance criterion {criterion!r}; choose l1, l2, bn_scale, taylor, random or fisher")


class _GivenImportance:
    """torch-pruning importance that ranks a group rooted at a module with precomputed scores (one per root
    channel, e.g. ``hwprune.fisher``) and every other group with ``fallback``."""

    def __init__(self, fallback, scores: Dict[nn.Module, torch.Tensor]):
        self.fallback, self.scores = fallback, scores

    def __call__(self, group, **kwargs):
        given = self.scores.get(group[0].dep.target.module)
        idxs = list(group[0].root_idxs) if hasattr(group[0], "root_idxs") else list(group[0].idxs)
        if given is None or any(i is None or i >= len(given) for i in idxs):
            return self.fallback(group, **kwargs)
        return given.to(torch.float32)[torch.tensor(idxs, dtype=torch.long)]


def _keep_at_least_round_to(module: nn.Module, ratio: float, round_to: Optional[int]) -> float:
    """The ratio to ask torch-pruning for at ``module`` (see ``rounding.ratio_keeping_round_to``)."""
    weight = getattr(module, "weight", None)
    if not round_to or weight is None or weight.dim() == 0:
        return ratio
    return ratio_keeping_round_to(int(weight.shape[0]), ratio, round_to)


def prune_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    ratios: Dict[str, float],
    criterion: str = "l1",
    round_to: Optional[int] = None,
    ignored: Sequence[str] = (),
    calibration: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    inplace: bool = False,
    scores: Optional[Dict[str, torch.Tensor]] = None,
) -> Tuple[nn.Module, list]:
    """Physically remove ``ratios[group]`` of each group's channels (rounded so that a multiple of ``round_to``
    channels remains). Returns the pruned model and torch-pruning's pruning history, which ``replay`` applies
    exactly to a fresh copy of the same model. ``calibration`` (inputs, labels) is needed by the Taylor criterion.
    ``scores``: precomputed importance per root module name (one per channel), used for those groups.
    """
    tp = _tp()
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    table = dict(model.named_modules())
    unknown = [n for n in ratios if n not in table]
    if unknown:
        raise ModelError(f"plan names layers the model does not have: {unknown[:5]}")
    ratio_dict = {table[n]: _keep_at_least_round_to(table[n], float(r), round_to) for n, r in ratios.items() if r > 0}
    if not ratio_dict:
        return model, []
    with warnings.catch_warnings(), adapters.tracing(model):
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            importance=_importance(criterion, {table[n]: v for n, v in (scores or {}).items() if n in table}),
            pruning_ratio=0.0,
            pruning_ratio_dict=ratio_dict,
            ignored_layers=_ignored_modules(model, ignored),
            round_to=round_to,
            root_module_types=list(ROOT_TYPES),
            **_group_options(model),
        )
        if criterion == "taylor":
            if calibration is None:
                raise ModelError("the taylor criterion needs a calibration batch (data); use l1 or l2 without data")
            x, y = calibration
            model.zero_grad()
            with torch.enable_grad():
                torch.nn.functional.cross_entropy(model(x), y).backward()
        pruner.step()
        model.zero_grad(set_to_none=True)
    fixup_after_pruning(model)
    return model.eval(), _jsonable(pruner.pruning_history())


def _jsonable(history) -> list:
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def replay(model: nn.Module, example_input: torch.Tensor, history: list, inplace: bool = False) -> nn.Module:
    """Apply a recorded pruning history to an unpruned copy of the model: the same architecture and weights."""
    if not inplace:
        model = copy.deepcopy(model)
    if history:
        dg = build_graph(model.eval(), example_input)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg.load_pruning_history([(n, o, list(i)) for n, o, i in history])
        fixup_after_pruning(model)
    return model.eval()


def channel_counts(model: nn.Module) -> Dict[str, int]:
    """Output channels / features of every conv and linear layer (the architecture a plan produced)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[n] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[n] = m.out_features
    return out


def global_ratios(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    groups: Sequence[str],
    criterion: str = "l1",
    round_to: Optional[int] = None,
    ignored: Sequence[str] = (),
    max_group_ratio: float = 0.9,
) -> Dict[str, float]:
    """torch-pruning's *global* pruning at ``ratio`` (channels ranked across all groups by normalised importance,
    as a practitioner's one ``MetaPruner(global_pruning=True)`` call does), read back as the fraction each group
    lost, so the result is an ordinary per-group plan."""
    tp = _tp()
    pruned = copy.deepcopy(model).eval()
    table = dict(pruned.named_modules())
    before = {g: int(getattr(table[g], "out_channels", getattr(table[g], "out_features", 0))) for g in groups}
    with warnings.catch_warnings(), adapters.tracing(pruned):
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            pruned, example_input, importance=_importance(criterion), global_pruning=True, pruning_ratio=ratio,
            max_pruning_ratio=max_group_ratio, ignored_layers=_ignored_modules(pruned, ignored), round_to=round_to,
            root_module_types=list(ROOT_TYPES), **_group_options(pruned),
        )
        pruner.step()
    after = channel_counts(pruned)
    return {g: (1.0 - after[g] / n if n else 0.0) for g, n in before.items()}
