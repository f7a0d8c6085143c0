"""``reconstruct``: layer-wise least-squares reconstruction, then the budget's (distillation) fine-tuning.

After heads or MLP channels are removed, the layer that consumes them (an attention output projection, an MLP's
output dense) still has the weights that were fitted to the full input. Kwon et al. 2022 ("A Fast Post-Training
Pruning Framework for Transformers") show that refitting such a layer by linear least squares, so that its output
on the pruned model's own activations matches the dense model's output on calibration inputs, recovers most of the
loss without any training. Layers are refitted in forward order, each on inputs that already pass through the
refitted layers before it, so errors do not accumulate. The refit needs only forward passes; the optimizer steps
of the budget are then spent as ``finetune`` spends them.

Refitted: every plain ``nn.Linear`` whose input width is smaller than the dense model's same-named layer and whose
output width is unchanged (a masked layer keeps its mask contract and is left to fine-tuning).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from hwprune.recover import train_budget
from hwprune.recovery.base import RecoveryMethod
from hwprune.structures.masks import KEEP


def refittable_layers(model: nn.Module, teacher: nn.Module) -> List[str]:
    """Names of the Linear layers whose input the plan narrowed and whose output it kept, in forward order."""
    dense = dict(teacher.named_modules())
    out = []
    for name, m in model.named_modules():
        d = dense.get(name)
        if (isinstance(m, nn.Linear) and isinstance(d, nn.Linear) and KEEP not in m._buffers
                and m.in_features < d.in_features and m.out_features == d.out_features):
            out.append(name)
    return out


def _rows(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Activations as rows of features; for token activations [B, L, D] only the positions the mask keeps."""
    if t.dim() == 3 and mask is not None and mask.shape == t.shape[:2]:
        return t[mask.bool()]
    return t.reshape(-1, t.shape[-1])


def _capture(module: nn.Module, store: Dict[str, torch.Tensor], key: str, what: str):
    def hook(_m, args, output):
        store[key] = (args[0] if what == "input" else output).detach()
    return module.register_forward_hook(hook)


def refit_linear(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, ridge: float) -> float:
    """Set ``layer`` to the ridge least-squares fit of ``y`` from ``x`` (bias included); returns the relative
    residual ||xW + b - y|| / ||y|| after the fit."""
    x64 = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    y64 = y.double()
    gram = x64.T @ x64
    reg = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    eye[-1, -1] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(gram + reg * eye, x64.T @ y64)
    with torch.no_grad():
        layer.weight.copy_(solution[:-1].T.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(solution[-1].to(layer.bias.dtype))
        else:  # no bias to take the intercept: refit without it
            solution = torch.linalg.solve(x64[:, :-1].T @ x64[:, :-1] + reg * eye[:-1, :-1], x64[:, :-1].T @ y64)
            layer.weight.copy_(solution.T.to(layer.weight.dtype))
    with torch.no_grad():
        fitted = layer(x.to(layer.weight.dtype))
    return float((fitted - y).norm() / y.norm().clamp_min(1e-12))


def reconstruct(model: nn.Module, teacher: nn.Module, batches: list, ridge: float = 1e-3,
                log=None) -> Dict[str, float]:
    """Refit every refittable layer of ``model`` in forward order against ``teacher``; {layer: relative residual}."""
    from hwprune.fidelity import forward

    names = refittable_layers(model, teacher)
    if not names:
        return {}
    modules, dense = dict(model.named_modules()), dict(teacher.named_modules())
    model.eval()
    teacher.eval()
    masks = [x.get("attention_mask") if isinstance(x, dict) else None for x in batches]
    # the dense targets of every layer, from one teacher pass per batch
    targets: Dict[str, list] = {n: [] for n in names}
    for x, mask in zip(batches, masks):
        store: Dict[str, torch.Tensor] = {}
        hooks = [_capture(dense[n], store, n, "output") for n in names]
        try:
            with torch.no_grad():
                forward(teacher, x)
        finally:
            for h in hooks:
                h.remove()
        for n in names:
            targets[n].append(_rows(store[n], mask))
    residuals = {}
    for name in names:  # in forward order: each layer sees the refitted layers before it
        xs = []
        for x, mask in zip(batches, masks):
            store = {}
            hook = _capture(modules[name], store, "x", "input")
            try:
                with torch.no_grad():
                    forward(model, x)
            finally:
                hook.remove()
            xs.append(_rows(store["x"], mask))
        residuals[name] = refit_linear(modules[name], torch.cat(xs), torch.cat(targets.pop(name)), ridge)
    if log:
        worst = max(residuals.values())
        log(f"reconstruct: {len(residuals)} layers refitted by least squares (worst relative residual {worst:.3f})")
    return residuals


class Reconstruct(RecoveryMethod):
    name = "reconstruct"
    description = ("least-squares refit of the layers consuming pruned heads/channels against the dense model "
                   "(Kwon et al. 2022), then fine-tuning")
    # calibration batches (of the budget's batch size) from the training split; ridge relative to the mean diagonal
    param_types = {"calibration_batches": (int, 1, 1000, 16), "ridge": (float, 0.0, 1.0, 1e-3)}

    def run(self, model, data, budget, teacher=None, seed=0, log=None):
        if teacher is not None:
            p = self.params(budget)
            loader = data.loader("train", budget.batch_size, shuffle=True, seed=seed)
            batches = []
            for x, _ in loader:
                batches.append(x)
                if len(batches) >= p["calibration_batches"]:
                    break
            reconstruct(model, teacher, batches, p["ridge"], log)
        elif log:
            log("reconstruct: no dense teacher was given (recovery.distill is off), so no refit; fine-tuning only")
        return train_budget(model, data, budget, budget.finetune_steps, teacher, seed)
