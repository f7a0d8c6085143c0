"""Data-driven importance of attention heads and MLP neurons: the Fisher information of a mask on each (importance
criterion ``fisher``).

Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for Transformers") put a mask variable m = 1 on every head's
output and every MLP neuron's activation and rank them by the diagonal Fisher information of the mask,
``I_i = sum over samples of (dL/dm_i)^2``: the second-order estimate of how much the loss rises when m_i goes to 0.
Magnitude cannot see what a head *does* on the user's inputs (a large head whose attention lands on padding, or
whose output the next layer cancels, scores high); the Fisher does, from a few dozen calibration samples.

The loss follows the search objective, so no label is needed unless the objective is accuracy:

* ``cosine`` (embeddings): the output is observed as a Gaussian around the normalised embedding; its Fisher is
  ``J^T J``, estimated without the full Jacobian by random projections v ~ N(0, I): ``E[(v . dE/dm)^2]``.
* ``kl`` / ``agreement`` (logits): the true Fisher, cross-entropy against labels drawn from the model's own softmax.
* ``accuracy``: the empirical Fisher, cross-entropy against the data's labels (Kwon et al.'s choice).

The masks are inserted on a copy of the model as a forward pre-hook on the linear that reads the heads (the output
projection, whose input is head-major) and the linear that reads the MLP neurons (the MLP's second linear); the mask
gradient is then exactly sum over tokens of input * grad. Samples are taken one at a time, since the Fisher squares
per-sample gradients. Scores are computed once per (model, data, objective, groups) and reused by every trial.
"""
from __future__ import annotations

import copy
import weakref
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hwprune import transformer_groups as tg
from hwprune.errors import DataError
from hwprune.inputs import call_model

DEFAULT_SAMPLES = 128
DEFAULT_DRAWS = 4

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _samples(batches: Iterable, limit: int):
    """One (input, label) at a time from (inputs, labels) batches; padded token positions past the sample's last
    kept token are dropped (they reach no output)."""
    taken = 0
    for x, y in batches:
        n = len(y) if y is not None else _batch_size(x)
        for i in range(n):
            if taken >= limit:
                return
            yield _one(x, i), (y[i:i + 1] if y is not None else None)
            taken += 1


def _batch_size(x) -> int:
    if isinstance(x, dict):
        return len(next(iter(x.values())))
    if isinstance(x, (tuple, list)):
        return len(x[0])
    return len(x)


def _one(x, i: int):
    if isinstance(x, dict):
        one = {k: v[i:i + 1] for k, v in x.items()}
        mask = one.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.sum() > 0:
            length = int(mask[0].nonzero().max()) + 1
            one = {k: (v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v) for k, v in one.items()}
        return one
    if isinstance(x, (tuple, list)):
        return type(x)(v[i:i + 1] for v in x)
    return x[i:i + 1]


def _losses(out, x, y, objective: str, draws: int, generator: torch.Generator) -> List[torch.Tensor]:
    """The ``draws`` scalar losses whose squared mask gradients, averaged, estimate this sample's Fisher."""
    from hwprune.fidelity import comparable

    z = comparable(out, x)
    if objective == "cosine":
        e = F.normalize(z.float(), dim=-1)
        return [(e * torch.randn(e.shape, generator=generator)).sum() for _ in range(draws)]
    logits = z.float()
    if objective == "accuracy":
        if y is None or y.dtype not in (torch.int64, torch.int32):
            raise DataError("the fisher criterion with the accuracy objective needs class labels; use the agreement "
                            "or kl objective on unlabelled data")
        return [F.cross_entropy(logits, y.long())]
    probs = logits.detach().softmax(-1)
    return [F.cross_entropy(logits, torch.multinomial(probs, 1, generator=generator).squeeze(1))
            for _ in range(draws)]


class _Masks:
    """Mask leaves of ones, multiplied into the input of the linear reading each group (its last dimension)."""

    def __init__(self):
        self.masks: Dict[str, torch.Tensor] = {}
        self.repeat: Dict[str, int] = {}
        self.handles = []

    def add(self, group: str, reader: nn.Module, units: int, repeat: int) -> None:
        self.masks[group] = torch.ones(units, requires_grad=True)
        self.repeat[group] = repeat

        def hook(module, args, group=group):
            m = self.masks[group]
            scale = m.repeat_interleave(self.repeat[group]) if self.repeat[group] > 1 else m
            return (args[0] * scale.to(args[0].dtype), *args[1:])

        self.handles.append(reader.register_forward_pre_hook(hook))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _instrument(model: nn.Module, groups: Sequence[str], readers: Dict[str, str], masks: _Masks) -> None:
    """Insert masks for the heads: / mlp: groups of ``model`` (a copy: attention modules are converted to their
    explicit-projection forms, whose output projection is called as a module, so its hook fires)."""
    attention = tg.find_attention(model)
    table = dict(model.named_modules())
    for name in groups:
        kind, target = tg.kind_of(name), tg.module_of(name)
        if kind == tg.HEADS and target in attention:
            a = attention[target]
            a.remove([])
            masks.add(name, a.projections()[3], a.num_heads, a.head_dim)
        elif kind == tg.MLP and isinstance(table.get(target), nn.Linear) and isinstance(table.get(readers.get(name)),
                                                                                       nn.Linear):
            masks.add(name, table[readers[name]], table[target].out_features, 1)


def mask_fisher(model: nn.Module, groups: Sequence[str], batches: Iterable, objective: str,
                samples: int = DEFAULT_SAMPLES, draws: int = DEFAULT_DRAWS, seed: int = 0,
                readers: Optional[Dict[str, str]] = None) -> Dict[str, torch.Tensor]:
    """Fisher information of a mask on every unit (head / MLP neuron) of the ``heads:`` and ``mlp:`` groups named,
    from up to ``samples`` calibration samples. Returns ``{group name: scores}`` (float64, one per unit, in the
    dense model's order); groups that cannot be instrumented are absent (callers fall back to magnitude).
    ``readers``: for ``mlp:`` groups, the name of the linear that reads the neurons (``mlp_readers``)."""
    wanted = [g for g in groups if tg.kind_of(g) in (tg.HEADS, tg.MLP)]
    if not wanted:
        return {}
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    masks = _Masks()
    _instrument(work, wanted, readers or {}, masks)
    fisher = {g: torch.zeros(len(m), dtype=torch.float64) for g, m in masks.masks.items()}
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    try:
        with torch.enable_grad(), tg.no_mha_fastpath():
            for x, y in _samples(batches, samples):
                losses = _losses(call_model(work, x), x, y, objective, draws, generator)
                for i, loss in enumerate(losses):
                    grads = torch.autograd.grad(loss, list(masks.masks.values()), retain_graph=i < len(losses) - 1,
                                                allow_unused=True)
                    for g, grad in zip(masks.masks, grads):
                        if grad is not None:
                            fisher[g] += grad.detach().double().pow(2) / len(losses)
                seen += 1
    finally:
        masks.close()
    if seen == 0:
        raise DataError("the fisher criterion needs calibration samples, and the training split gave none")
    return {g: f / seen for g, f in fisher.items()}


def cached_mask_fisher(model: nn.Module, groups: Sequence[str], data, objective: str,
                       samples: int = DEFAULT_SAMPLES, readers: Optional[Dict[str, str]] = None
                       ) -> Dict[str, torch.Tensor]:
    """``mask_fisher`` on ``data``'s training split (never the held-out one), once per model, data, objective and
    groups: every trial of a search ranks with the same scores."""
    key = (id(data), objective, tuple(sorted(groups)), samples)
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = mask_fisher(model, groups, data.loader("train", 16, shuffle=True, seed=0), objective,
                                     samples=samples, readers=readers)
    return per_model[key]


def mlp_readers(groups: Sequence) -> Dict[str, str]:
    """``{mlp group: reading linear}`` from the groups' members (the root linear and the one that reads it)."""
    out = {}
    for g in groups:
        if tg.kind_of(g.name) == tg.MLP:
            root = tg.module_of(g.name)
            others = [m for m in g.members if m != root]
            if len(others) == 1:
                out[g.name] = others[0]
    return out


def allocate(scores: Dict[str, torch.Tensor], unit_cost: Dict[str, float], fraction: float,
             keep_one: Sequence[str] = ()) -> Dict[str, int]:
    """Kwon et al.'s global allocation, greedily: remove units across all groups in increasing order of Fisher per
    unit of cost until ``fraction`` of the groups' total cost is removed. Returns units removed per group (each
    group's least important first, as ``apply`` removes them); groups in ``keep_one`` (heads) keep at least one."""
    total = sum(unit_cost[g] * len(s) for g, s in scores.items() if g in unit_cost)
    units = sorted((float(s[i]) / max(unit_cost[g], 1e-12), g, i)
                   for g, s in scores.items() if g in unit_cost and unit_cost[g] > 0 for i in range(len(s)))
    removed = {g: 0 for g in scores if g in unit_cost}
    # the sort is by (score / cost, group, position): within a group that is (score, position), the order in which
    # ``apply`` removes a group's units, so a count of k always means the group's k least important
    saved, target = 0.0, fraction * total
    for _, g, _ in units:
        if saved >= target:
            break
        if g in keep_one and removed[g] >= len(scores[g]) - 1:
            continue
        removed[g] += 1
        saved += unit_cost[g]
    return removed


__all__ = ["mask_fisher", "cached_mask_fisher", "mlp_readers", "allocate", "DEFAULT_SAMPLES"]
