"""``finetune``: masked fine-tuning, masks fixed (the plan's), projected after every step."""
from __future__ import annotations

from hwprune.recover import train_budget
from hwprune.recovery.base import RecoveryMethod


class Finetune(RecoveryMethod):
    name = "finetune"
    description = "fine-tune with the plan's masks fixed (projected after every step)"

    def run(self, model, data, budget, teacher=None, seed=0, log=None):
        return train_budget(model, data, budget, budget.finetune_steps, teacher, seed)
