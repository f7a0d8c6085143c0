"""``admm``: ADMM towards the structure's constraint set, hard projection, masked fine-tuning (Lin et al. 2021).

The first ``admm_fraction`` of the budget runs ``rounds`` ADMM rounds on the masked layers (restarted from their
dense weights): W-step = training on loss + rho/2 ||W - Z + U||^2; Z-step = Z = Pi_S(W + U), the Euclidean
projection onto the structure's set at its ratio (unify: ``unify_project`` semantics via the structure's own
unify/prune split; group structures: the groups with the smallest L2 norm are zeroed); U += W - Z; rho grows
by ``rho_growth`` per round. Then W is hard-projected (the mask contract), and the rest fine-tunes with it held.
"""
from __future__ import annotations

import torch

from hwprune.recover import recalibrate_bn, train_budget
from hwprune.recovery.base import RecoveryMethod, split_steps


class Admm(RecoveryMethod):
    name = "admm"
    description = "ADMM with projection onto the structure's set (unify/structured), then masked fine-tuning"
    param_types = {"rounds": (int, 1, None, 4), "rho": (float, 0.0, None, 1e-3), "rho_growth": (float, 1.0, None, 2.0),
                   "admm_fraction": (float, 0.0, 1.0, 0.6)}

    def project(self, layer, v: torch.Tensor) -> torch.Tensor:
        """Pi_S(v): v with the structure imposed at the layer's ratio (a throw-away copy of the module)."""
        from hwprune.structures.base import _Weight

        probe = _Weight(v.detach().cpu().clone())
        layer.structure.reattach(probe, probe.weight, {**layer.spec, "criterion": "l2"})
        return probe.weight.detach().to(v.device)

    def run(self, model, data, budget, teacher=None, seed=0, log=None):
        p = self.params(budget)
        layers = self.layers(model, log)
        phase, rest = split_steps(budget.finetune_steps, p["admm_fraction"])
        if layers and phase:
            for layer in layers:
                layer.restart_dense()
            W = {l.name: l.weight for l in layers}
            Z = {l.name: self.project(l, W[l.name]) for l in layers}
            U = {l.name: torch.zeros_like(W[l.name]) for l in layers}
            rho = [p["rho"]]

            def penalty():
                return sum(0.5 * rho[0] * (W[n] - Z[n] + U[n]).pow(2).sum() for n in W)

            per_round = max(1, phase // p["rounds"])
            done = 0
            for r in range(p["rounds"]):
                n = per_round if r < p["rounds"] - 1 else phase - done
                if n <= 0:
                    break
                train_budget(model, data, budget, n, teacher, seed + r, extra_loss=penalty)
                done += n
                with torch.no_grad():
                    for layer in layers:
                        Z[layer.name] = self.project(layer, W[layer.name] + U[layer.name])
                        U[layer.name] += W[layer.name] - Z[layer.name]
                rho[0] *= p["rho_growth"]
        for layer in layers:
            layer.finalize()  # hard projection: the exact mask from the ADMM-trained weights
        recalibrate_bn(model, data, budget.bn_recalibration_batches, budget.batch_size, seed)
        return train_budget(model, data, budget, rest, teacher, seed + 100)
