"""``iterative``: gradual magnitude pruning (Zhu & Gupta 2017; Huang et al.'s prune-retrain rounds in the limit).

The masked layers restart from their dense weights; every ``interval`` steps during the first ``ramp_fraction`` of
the budget their structure's mask is recomputed from the current weights at s_t = s_f (1 - (1 - t/T)^3) (pruned
groups are zero, so they stay pruned), held by projection; at T the target ratio is reached exactly and the rest
of the budget fine-tunes with that mask.
"""
from __future__ import annotations

from hwprune.recover import recalibrate_bn, train_budget
from hwprune.recovery.base import RecoveryMethod, cubic_ratio, split_steps


class Iterative(RecoveryMethod):
    name = "iterative"
    description = "gradual (cubic) magnitude schedule from the dense weights to the target, then fine-tuning"
    param_types = {"ramp_fraction": (float, 0.0, 1.0, 0.6), "interval": (int, 1, None, 10)}

    def why_not(self, layer):
        if layer.structure.name == "unify":
            return "iterative zeroes groups; 'unify' ties tiles instead (use admm or finetune)"
        return None

    def run(self, model, data, budget, teacher=None, seed=0, log=None):
        p = self.params(budget)
        layers = self.layers(model, log)
        ramp, _ = split_steps(budget.finetune_steps, p["ramp_fraction"])
        for layer in layers:
            layer.restart_dense()

        def on_step(step):
            t = step + 1
            if t <= ramp and (t % p["interval"] == 0 or t == ramp):
                for layer in layers:
                    if t == ramp:
                        layer.finalize()
                    else:
                        layer.set_keep(layer.keep_at(cubic_ratio(layer.spec["ratio"], t, ramp)))

        train_budget(model, data, budget, budget.finetune_steps, teacher, seed, on_step=on_step)
        if ramp == 0 or ramp >= budget.finetune_steps:  # the target mask was set last: nothing trained after it
            for layer in layers:
                layer.finalize()
            recalibrate_bn(model, data, budget.bn_recalibration_batches, budget.batch_size, seed)
        return model
