"""``cdp_dtc``: CDP's penalty on a learnable skeleton with the dynamic threshold container (Li et al., AI Comm. 2023).

The authors' skeleton is one scalar per stripe W[o,:,i,j]; here it is one scalar per group of the layer's structure
(per kernel for ``kernel``, per weight for ``connection`` ...), which needs groups that nest inside one filter:
W_eff = W * FS[group], FS in R^{O x g} starts at 1. Loss = CE + penalty per layer:

* ``code_faithful``: 2 * prop * ||FS||_1 (what the released code computes: its previous-step snapshot is always
  empty and its G term equals the L1 norm);
* ``intended``: b * sum_o ||FS_o||_2 + a * ||FS||_1 with a = prop * S_last / S_now, b = prop * S_now / S_last,
  S = sum_o sim(FS_o, mean_o FS), sim = 1 - arccos(cos)/pi, S_last a detached snapshot of the previous step.

DTC, after every backward and before the step: t_o = T * mean_o'(||FS_o'||_1) / ||FS_o||_1; skeleton entries with
|FS| <= t_o and their gradients are zeroed. After the first ``cdp_fraction`` of the budget the skeleton is folded
into W, the structure's exact mask is taken from the folded weights (mask contract; DTC-zeroed groups go first)
and the rest fine-tunes with it held. The released code prunes with a fixed T and no fine-tuning; an exact ratio
per layer is what a plan asks for here.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from hwprune.recover import recalibrate_bn, train_budget
from hwprune.recovery.base import RecoveryMethod, split_steps


class Skeleton(nn.Module):
    """Parametrization W -> W * FS[group of each element]."""

    def __init__(self, index: torch.Tensor, n_out: int, n_groups: int, device):
        super().__init__()
        self.register_buffer("index", index.to(device))
        self.fs = nn.Parameter(torch.ones(n_out, n_groups // n_out, device=device))

    def forward(self, w):
        return w * self.fs.reshape(-1)[self.index]


def _similarity(fs: torch.Tensor) -> torch.Tensor:
    """sum_o (1 - arccos(cos(FS_o, mean FS)) / pi)."""
    mean = fs.mean(0, keepdim=True)
    cos = nn.functional.cosine_similarity(fs, mean.expand_as(fs), dim=1, eps=1e-8).clamp(-1 + 1e-7, 1 - 1e-7)
    return (1 - torch.arccos(cos) / math.pi).sum()


class CdpDtc(RecoveryMethod):
    name = "cdp_dtc"
    description = "CDP penalty on a learnable group skeleton + dynamic threshold container, then masked fine-tuning"
    param_types = {"mode": (str, None, None, "intended"), "prop": (float, 0.0, None, 1e-3),
                   "threshold": (float, 0.0, None, 0.01), "cdp_fraction": (float, 0.0, 1.0, 0.6)}
    choices = {"mode": ("intended", "code_faithful")}

    def why_not(self, layer):
        if layer.structure.name in ("nm", "unify", "mixed", "block"):
            return f"cdp_dtc needs groups nested in one filter (kernel, kernel_row, kernel_column, connection), not {layer.structure.name!r}"
        idx, n = layer.structure.group_index(layer.weight.detach().cpu(), layer.params)
        o = layer.weight.shape[0]
        rows = torch.arange(o).reshape(-1, *([1] * (layer.weight.dim() - 1)))
        if n % o or not bool((idx // (n // o) == rows).all()):
            return f"cdp_dtc needs groups nested in one filter; {layer.structure.name!r} groups span filters here"
        return None

    def run(self, model, data, budget, teacher=None, seed=0, log=None):
        p = self.params(budget)
        layers = self.layers(model, log)
        phase, rest = split_steps(budget.finetune_steps, p["cdp_fraction"])
        skel = {}
        for layer in layers:
            layer.restart_dense()
            idx, n = layer.structure.group_index(layer.weight.detach().cpu(), layer.params)
            skel[layer.name] = Skeleton(idx, layer.weight.shape[0], n, layer.weight.device)
            parametrize.register_parametrization(layer.module, "weight", skel[layer.name])
        last = {}

        def penalty():
            total = 0.0
            for name, s in skel.items():
                fs = s.fs
                l1 = fs.abs().sum()
                if p["mode"] == "code_faithful":
                    total = total + 2 * p["prop"] * l1
                    continue
                g = fs.norm(dim=1).sum()
                s_now = _similarity(fs)
                if name in last:
                    ratio = float(last[name] / s_now.detach().clamp_min(1e-12))
                    a, b = p["prop"] * ratio, p["prop"] / max(ratio, 1e-12)
                else:
                    a = b = p["prop"]
                last[name] = s_now.detach()
                total = total + b * g + a * l1
            return total

        @torch.no_grad()
        def dtc(step):
            for s in skel.values():
                n_o = s.fs.abs().sum(1)
                t_o = p["threshold"] * n_o.mean() / n_o  # n_o = 0 gives inf: stays pruned
                keep = (s.fs.abs() > t_o[:, None]).to(s.fs.dtype)
                s.fs.mul_(keep)
                if s.fs.grad is not None:
                    s.fs.grad.mul_(keep)

        try:
            train_budget(model, data, budget, phase, teacher, seed, extra_loss=penalty if layers else None,
                         before_step=dtc if layers else None)
        finally:
            for layer in layers:  # fold the skeleton into W, then the exact mask from the folded weights
                parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=True)
                layer.finalize()
        recalibrate_bn(model, data, budget.bn_recalibration_batches, budget.batch_size, seed)
        return train_budget(model, data, budget, rest, teacher, seed + 1)
