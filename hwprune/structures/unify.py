"""``unify``: micro-structured weight unification and pruning (Lin et al., arXiv:2106.08301).

Groups are b x b tiles of the GEMM weight (as ``block``). The ratio is the fraction of tiles that lose their free
values; they are ranked by the unification error e_u(B) = sum (|w| - mean|w|)^2 (cheapest first). Of those k tiles,
round(prune_share * k) with the smallest pruning error e_p(B) = sum w^2 are set to zero; the rest share one absolute
value u_B = mean|w| with their signs kept. Realization is masked/unified dense (no commodity kernel exploits it);
the report gives the multiplications a unification-aware kernel needs (y_o += u_B * sum_i s_oi x_i: one multiply per
tile row) and the bits stored. ``unify_project`` is the ADMM Z-step; ``admm_unify`` a short ADMM loop.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterable, Tuple

import torch
from torch import nn

from hwprune.errors import ConfigError
from hwprune.structures.base import (
    LayerReport, Structure, bytes_dense, bytes_unified, dense_macs, gemm_shape, keep_mask, module_bias_numel,
    n_removed, positions, removal_order,
)
from hwprune.structures.block import block_index


def _block_stats(v: torch.Tensor, idx: torch.Tensor, n: int):
    a = v.detach().to(torch.float64).reshape(-1)
    i = idx.reshape(-1)
    cnt = torch.zeros(n, dtype=torch.float64).index_add_(0, i, torch.ones_like(a))
    s1 = torch.zeros(n, dtype=torch.float64).index_add_(0, i, a.abs())
    s2 = torch.zeros(n, dtype=torch.float64).index_add_(0, i, a * a)
    u = s1 / cnt.clamp_min(1)
    e_u = (s2 - 2 * u * s1 + cnt * u * u).clamp_min(0)  # sum (|v| - u)^2
    return u, e_u, s2, cnt


def unify_assign(v: torch.Tensor, idx: torch.Tensor, n: int, ratio: float, prune_share: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(unified, pruned) boolean masks over tiles, under the mask contract (k = n_removed(n, ratio) selected)."""
    u, e_u, e_p, _ = _block_stats(v, idx, n)
    sel = ~keep_mask(e_u, ratio)
    k = int(sel.sum())
    pruned = torch.zeros(n, dtype=torch.bool)
    kp = int(math.floor(prune_share * k + 0.5))
    if kp:
        cand = torch.nonzero(sel).reshape(-1)
        order = removal_order(e_p[cand])
        pruned[cand[order[:kp]]] = True
    return sel & ~pruned, pruned


def unified_weight(v: torch.Tensor, idx: torch.Tensor, unified: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Unified tiles get sign(v) * mean|v|, pruned tiles 0, the rest stay."""
    n = unified.numel()
    u, _, _, _ = _block_stats(v, idx, n)
    uel = u[idx].to(v.dtype)
    out = torch.where(unified[idx], torch.sign(v) * uel, v)
    return torch.where(pruned[idx], torch.zeros_like(v), out)


def unify_project(v: torch.Tensor, b: int, unify_ratio: float, prune_ratio: float) -> torch.Tensor:
    """ADMM Z-step: Euclidean projection of V = W + U onto {prune_ratio of tiles zero, unify_ratio of tiles with one
    shared |value|}. Pruned: the tiles with the smallest sum v^2; unified: of the rest, the smallest sum (|v|-mean|v|)^2."""
    if unify_ratio + prune_ratio > 1 + 1e-12:
        raise ConfigError(f"unify_ratio + prune_ratio = {unify_ratio + prune_ratio} exceeds 1; lower one of them")
    idx, n = block_index(v, b, b)
    _, e_u, e_p, _ = _block_stats(v, idx, n)
    pruned = ~keep_mask(e_p, prune_ratio)
    unified = torch.zeros(n, dtype=torch.bool)
    ku = n_removed(n, unify_ratio)
    rest = torch.nonzero(~pruned).reshape(-1)
    if ku:
        unified[rest[removal_order(e_u[rest])[:ku]]] = True
    return unified_weight(v.detach(), idx, unified, pruned)


def admm_unify(
    model: nn.Module,
    layers: Dict[str, Tuple[int, float, float]],
    loss_fn: Callable,
    batches: Iterable,
    rounds: int = 3,
    steps_per_round: int = 20,
    rho: float = 1e-3,
    rho_growth: float = 2.0,
    lr: float = 1e-3,
) -> nn.Module:
    """Short ADMM loop (W-step: SGD on loss + rho/2 ||W - Z + U||^2; Z-step: ``unify_project``; U += W - Z), then a
    hard projection. ``layers``: {module name: (b, unify_ratio, prune_ratio)}. Returns a new model."""
    model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    missing = [n for n in layers if n not in mods]
    if missing:
        raise ConfigError(f"admm_unify: layers {missing} are not modules of the model; valid names come from named_modules()")
    W = {n: mods[n].weight for n in layers}
    Z = {n: unify_project(W[n].detach(), *layers[n]) for n in layers}
    U = {n: torch.zeros_like(W[n]) for n in layers}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    data = list(batches)
    model.train()
    for _ in range(rounds):
        for s in range(steps_per_round):
            x, y = data[s % len(data)]
            opt.zero_grad()
            loss = loss_fn(model(x), y) + sum(0.5 * rho * (W[n] - Z[n] + U[n]).pow(2).sum() for n in layers)
            loss.backward()
            opt.step()
        with torch.no_grad():
            for n in layers:
                Z[n] = unify_project(W[n] + U[n], *layers[n])
                U[n] += W[n] - Z[n]
        rho *= rho_growth
    with torch.no_grad():
        for n in layers:
            W[n].copy_(unify_project(W[n], *layers[n]))
    model.eval()
    return model


class UnifyStructure(Structure):
    name = "unify"
    description = "b x b tiles share one |value| (signs kept) or are zero; analytic multiply and bit savings"
    param_choices = {"b": (2, 4, 8), "prune_share": (0.0, 0.5)}
    default_params = {"b": 4, "prune_share": 0.0}

    def check_params(self, params):
        p = super().check_params(params)
        if not isinstance(p["b"], int) or p["b"] < 1:
            raise ConfigError(f"unify block size b={p['b']!r} is not a positive integer; use e.g. 4")
        if not 0.0 <= float(p["prune_share"]) <= 1.0:
            raise ConfigError(f"unify prune_share={p['prune_share']!r} is not in [0, 1]")
        return p

    def group_index(self, weight, params):
        return block_index(weight, params["b"], params["b"])

    def scores(self, weight, criterion="l1", params=None, grad=None, module=None, bn=None):
        p = self.check_params(params)
        idx, n = self.group_index(weight, p)
        return _block_stats(weight, idx, n)[1]  # unification error; the criterion does not apply

    def element_mask(self, weight, keep, params):
        idx, _ = self.group_index(weight, params)
        return keep.reshape(-1)[idx]  # False = tile lost its free values (unified or pruned)

    def _split(self, weight, keep, params):
        idx, n = self.group_index(weight, params)
        sel = ~keep.reshape(-1)
        _, _, e_p, _ = _block_stats(weight, idx, n)
        k = int(sel.sum())
        pruned = torch.zeros(n, dtype=torch.bool)
        kp = int(math.floor(float(params["prune_share"]) * k + 0.5))
        if kp:
            cand = torch.nonzero(sel).reshape(-1)
            pruned[cand[removal_order(e_p[cand])[:kp]]] = True
        return idx, sel & ~pruned, pruned

    def realize(self, module, emask, params, keep):
        new = copy.deepcopy(module)
        idx, unified, pruned = self._split(module.weight.detach(), keep, params)
        with torch.no_grad():
            new.weight.copy_(unified_weight(module.weight.detach(), idx, unified, pruned))
        return new

    def hold(self, module, new, emask, params, keep, spec):
        """Pruned tiles stay zero; unified tiles stay tied (one |value| per tile, signs frozen) through training."""
        from hwprune.structures.masks import attach

        w = module.weight.detach()
        idx, unified, pruned = self._split(w, keep, params)
        tie = torch.where(unified[idx], idx, torch.full_like(idx, -1))
        attach(new, ~pruned[idx], spec=spec, dense=w, tie=tie, sign=torch.sign(w))

    def report(self, module, new, emask, keep, ratio, params, in_shape):
        b = params["b"]
        rows, k = gemm_shape(module.weight)
        idx, unified, pruned = self._split(module.weight.detach(), keep, params)
        cnt = torch.bincount(idx.reshape(-1), minlength=keep.numel())
        nbr, nbc = math.ceil(rows / b), math.ceil(k / b)
        r_sz = torch.tensor([min(b, rows - i * b) for i in range(nbr)]).repeat_interleave(nbc)  # rows per tile
        free = ~unified & ~pruned
        pos = positions(module, in_shape)
        mult_per_pos = int(cnt[free].sum() + r_sz[unified].sum())
        nb = module_bias_numel(module)
        dm = dense_macs(module, in_shape)
        n_free, n_uni = int(free.sum()), int(unified.sum())
        stored = n_uni + n_free
        from hwprune.structures.delivered import unified_bytes

        deployed = unified_bytes(cnt, unified, free, nbr)  # = bytes_unified for full tiles
        return LayerReport(
            structure=self.name, ratio=float(ratio), params=dict(params), groups=int(keep.numel()),
            groups_removed=int((~keep).sum()), weights=int(module.weight.numel()),
            weights_kept=int((new.weight != 0).sum()), executed="dense-masked", format="unified",
            macs_dense=dm, macs_effective=dm, macs_onnx=dm,
            bytes_dense=bytes_dense(module.weight.numel() + nb), bytes_deployed=deployed + bytes_dense(nb),
            extra={
                "tiles_unified": int(unified.sum()), "tiles_pruned": int(pruned.sum()), "tiles_free": n_free,
                "mults_per_position": mult_per_pos,
                "mults_unified_kernel": None if pos is None else mult_per_pos * pos,
                "mults_saved": None if pos is None else (module.weight.numel() - mult_per_pos) * pos,
                "bits_stored": 8 * deployed,
            },
        )
