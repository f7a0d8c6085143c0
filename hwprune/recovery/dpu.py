"""``dpu``: dynamic masks with straight-through gradients (Hu et al., IEEE Access 2023; the authors' operator).

Forward uses W * M, backward passes the gradient to every weight (the mask is not applied to it), so pruned
weights keep training and may return when M is recomputed from |W| every ``interval`` steps. The masked layers
restart from their dense weights. ``one_stage``: the ratio ramps from 0 to the target over the dynamic phase (cubic);
``multi_step``: ``stages`` equal steps s_k = k/K * target, each held for an equal share of the phase; ``fixed``: the
target from the first step (no ramp), i.e. the one-shot magnitude mask that ``finetune`` keeps, but recomputed every
``interval`` steps so that a pruned weight whose straight-through updates make it large comes back (the
"dynamic pruning with feedback" of Lin et al., ICLR 2020, with DPU's operator). After the dynamic phase
(``1 - finetune_fraction`` of the budget) W <- W * M at the target and the rest fine-tunes masked.

Guard (``ste_clip``, on by default): the straight-through gradient of the masked weights of a layer is capped at
the norm of its kept weights' gradient, and is zero for a filter whose every weight is masked. Such a filter whose every weight is masked feeds BatchNorm a constant channel,
whose input gradient BN scales by 1/sqrt(eps) (~316); measured on the tiny digits CNN with kernel masks (the stem
has one input channel, so a kernel is a whole filter): stem weights grew to |w| = 415, became the largest and so
the kept ones at the next mask update, and accuracy fell to chance (0.10); the norm cap alone still let multi_step
flip between filter sets (0.10).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from hwprune.recover import recalibrate_bn, train_budget
from hwprune.recovery.base import RecoveryMethod, cubic_ratio, split_steps


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, mask):
        return w * mask

    @staticmethod
    def backward(ctx, g):
        return g, None


class StraightThroughMask(nn.Module):
    """Parametrization W -> W * M with the identity gradient (DPU's operator)."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep.float())

    def forward(self, w):
        return _StraightThrough.apply(w, self.keep)


class Dpu(RecoveryMethod):
    name = "dpu"
    description = "dynamic masks recomputed every k steps, straight-through gradients (one_stage, multi_step, fixed)"
    param_types = {"mode": (str, None, None, "one_stage"), "interval": (int, 1, None, 10),
                   "stages": (int, 1, None, 3), "finetune_fraction": (float, 0.0, 1.0, 0.2),
                   "ste_clip": (bool, None, None, True)}
    choices = {"mode": ("one_stage", "multi_step", "fixed")}

    def why_not(self, layer):
        if layer.structure.name == "unify":
            return "dpu masks groups; 'unify' ties tiles instead (use admm or finetune)"
        return None

    def ratio_at(self, p, target: float, t: int, phase: int) -> float:
        if p["mode"] == "fixed":
            return target
        if p["mode"] == "multi_step":
            k = min(p["stages"], 1 + t * p["stages"] // max(phase, 1))
            return target * k / p["stages"]
        return cubic_ratio(target, t, phase)

    def run(self, model, data, budget, teacher=None, seed=0, log=None):
        p = self.params(budget)
        layers = self.layers(model, log)
        phase, rest = split_steps(budget.finetune_steps, 1.0 - p["finetune_fraction"])
        masks = {}
        for layer in layers:
            layer.restart_dense()  # hold's own mask is all ones during the dynamic phase
            masks[layer.name] = StraightThroughMask(layer.keep_at(self.ratio_at(p, layer.spec["ratio"], 0, phase)))
            parametrize.register_parametrization(layer.module, "weight", masks[layer.name])

        def update(step):
            t = step + 1
            if t < phase and t % p["interval"] == 0:
                for layer in layers:
                    keep = layer.keep_at(self.ratio_at(p, layer.spec["ratio"], t, phase))
                    masks[layer.name].keep.copy_(keep.float())

        @torch.no_grad()
        def cap(step):
            for layer in layers:
                g = layer.module.parametrizations.weight.original.grad
                if g is None:
                    continue
                keep = masks[layer.name].keep
                dead = keep.flatten(1).sum(1) == 0  # filters with every weight masked: BN-amplified noise
                g[dead] = 0
                kept, masked = (g * keep).norm(), (g * (1 - keep)).norm()
                if masked > kept:
                    g.mul_(keep + (1 - keep) * (kept / masked))

        try:
            train_budget(model, data, budget, phase, teacher, seed, on_step=update,
                         before_step=cap if p["ste_clip"] else None)
        finally:
            for layer in layers:  # finalize from the dense (straight-through) weights: W <- W * M at the target
                parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=False)
                layer.finalize()
        recalibrate_bn(model, data, budget.bn_recalibration_batches, budget.batch_size, seed)
        return train_budget(model, data, budget, rest, teacher, seed + 1)
