"""Importance criteria: how a structure scores its groups (low score = removed first).

Element-wise criteria are aggregated over each structure's groups (``group_scores``):

* ``l1``          sum |w| over the group                                    (DPU demo, SPP columns)
* ``l2``          sqrt(sum w^2) over the group                              (group lasso, Lin et al.)
* ``block_mean``  mean |w| over the elements actually in the group, divided by the layer's maximum (Huang et al.;
                  partial edge blocks are averaged over their real size)
* ``taylor``      |sum w * dL/dw| over the group (first-order Taylor; needs ``taylor_grads`` from a few calibration
                  batches of the model the structure is applied to)
* ``bn``          |gamma| of the BatchNorm that follows the layer (filter groups only)

Zero-order search:

* ``particle_filter_mask``  Anwar et al.: particles = removal sets of exactly k groups, weighted by validation
                            misclassification, resampled and perturbed; returns the best mask found. Cost is bounded
                            by ``n_particles * iterations`` evaluations.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from hwprune.errors import ConfigError

CRITERIA = ("l1", "l2", "block_mean", "taylor", "bn", "pf")
ELEMENTWISE = ("l1", "l2", "block_mean", "taylor")


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ConfigError(f"importance criterion {criterion!r} is unknown; valid criteria: {', '.join(CRITERIA)}")


def saliency(weight: torch.Tensor, criterion: str, grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Element-wise saliency in float64 (what is summed per group)."""
    w = weight.detach().to(torch.float64)
    if criterion in ("l1", "block_mean"):
        return w.abs()
    if criterion == "l2":
        return w * w
    if criterion == "taylor":
        if grad is None:
            raise ConfigError(
                "importance criterion 'taylor' needs gradients; compute them with hwprune.importance.taylor_grads "
                "(a few calibration batches and the loss) and pass grads= to apply_layer_structures"
            )
        if tuple(grad.shape) != tuple(weight.shape):
            raise ConfigError(
                f"taylor gradient shape {tuple(grad.shape)} does not match weight shape {tuple(weight.shape)}; "
                f"compute taylor_grads on the model after physical pruning"
            )
        return w * grad.detach().to(torch.float64)
    check_criterion(criterion)
    raise ConfigError(f"importance criterion {criterion!r} is not element-wise; use it through apply_layer_structures")


def group_scores(
    weight: torch.Tensor,
    group_index: torch.Tensor,
    n_groups: int,
    criterion: str = "l1",
    grad: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-group scores (float64, shape [n_groups]) from an element->group index map."""
    check_criterion(criterion)
    s = saliency(weight, criterion, grad).reshape(-1)
    idx = group_index.reshape(-1)
    tot = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, s)
    if criterion == "l1":
        return tot
    if criterion == "l2":
        return tot.sqrt()
    if criterion == "taylor":
        return tot.abs()
    # block_mean (Huang): mean |w| over the group's real elements, normalised by the layer maximum
    cnt = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, torch.ones_like(s))
    mean = tot / cnt.clamp_min(1)
    mx = float(mean.max()) if mean.numel() else 0.0
    return mean / mx if mx > 0 else mean


def bn_scores(bn: nn.Module) -> torch.Tensor:
    """|gamma| of a BatchNorm: one score per channel it normalises."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None:
        raise ConfigError(
            f"importance criterion 'bn' needs an affine BatchNorm after the layer, got {type(bn).__name__}; "
            f"use l1 or l2 for layers without one"
        )
    return bn.weight.detach().abs().to(torch.float64)


def taylor_grads(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    max_batches: int = 4,
) -> Dict[str, torch.Tensor]:
    """Gradients of the loss w.r.t. every weight, summed over up to ``max_batches`` calibration batches.

    Returns {qualified module name: grad of its ``weight``}. The model's own .grad fields are left untouched.
    """
    params = {n[: -len(".weight")]: p for n, p in model.named_parameters() if n.endswith("weight")}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for i, (x, y) in enumerate(batches):
            if i >= max_batches:
                break
            names = list(params)
            gs = torch.autograd.grad(loss_fn(model(x), y), [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, gs):
                if g is not None:
                    acc[n] += g.detach()
    finally:
        model.train(was_training)
    return acc


def particle_filter_mask(
    n_groups: int,
    ratio: float,
    error: Callable[[np.ndarray], float],
    n_particles: int = 16,
    iterations: int = 4,
    perturb: float = 0.1,
    temperature: float = 0.02,
    init_scores: Optional[Sequence[float]] = None,
    seed: int = 0,
) -> Tuple[np.ndarray, Dict[str, float]]:
    """Anwar et al.'s particle filter over removal sets (mask contract: exactly k = n_removed(n, ratio) removed).

    ``error(keep) -> misclassification rate`` evaluates the network with the boolean keep-mask (no retraining).
    Particles start as the score-based mask (if ``init_scores``) plus random masks at the target ratio; each
    iteration weights them by exp(-MCR / temperature), resamples (systematic resampling) and perturbs each copy by
    swapping ``perturb * k`` removed groups with kept ones (the ratio is kept). Evaluations are cached; the total is
    at most ``n_particles * (iterations + 1)``. Returns the best keep-mask seen and {"mcr", "evaluations"}.
    """
    from hwprune.structures.base import n_removed, removal_order

    k = n_removed(n_groups, ratio)
    if k == 0 or k == n_groups:
        keep = np.ones(n_groups, bool)
        keep[:k] = False
        return keep, {"mcr": float(error(keep)), "evaluations": 1}
    rng = np.random.default_rng(seed)
    cache: Dict[bytes, float] = {}

    def ev(keep: np.ndarray) -> float:
        key = np.packbits(keep).tobytes()
        if key not in cache:
            cache[key] = float(error(keep))
        return cache[key]

    def from_removed(rem: np.ndarray) -> np.ndarray:
        keep = np.ones(n_groups, bool)
        keep[rem] = False
        return keep

    particles = []
    if init_scores is not None:
        order = removal_order(torch.as_tensor(np.asarray(init_scores, dtype=np.float64))).numpy()
        particles.append(from_removed(order[:k]))
    while len(particles) < n_particles:
        particles.append(from_removed(rng.choice(n_groups, size=k, replace=False)))
    n_swap = max(1, int(round(perturb * k)))
    best, best_err = particles[0], ev(particles[0])
    for it in range(iterations + 1):
        errs = np.array([ev(p) for p in particles])
        i = int(np.argmin(errs))
        if errs[i] < best_err:
            best, best_err = particles[i], float(errs[i])
        if it == iterations:
            break
        wts = np.exp(-(errs - errs.min()) / max(temperature, 1e-12))
        wts /= wts.sum()
        pos = (rng.random() + np.arange(n_particles)) / n_particles  # systematic resampling
        picks = np.minimum(np.searchsorted(np.cumsum(wts), pos), n_particles - 1)
        new = [best.copy()]  # elitism: the best particle survives unperturbed
        for j in picks[1:]:
            p = particles[j].copy()
            rem, kept = np.flatnonzero(~p), np.flatnonzero(p)
            s = min(n_swap, len(rem), len(kept))
            a, b = rng.choice(rem, s, replace=False), rng.choice(kept, s, replace=False)
            p[a], p[b] = True, False
            new.append(p)
        particles = new
    return best, {"mcr": best_err, "evaluations": len(cache)}


def misclassification_rate(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Fraction of wrong argmax predictions over the given (x, y) batches (eval mode, no grad)."""
    wrong = total = 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for x, y in batches:
            pred = model(x).argmax(-1)
            wrong += int((pred != y).sum())
            total += int(y.numel())
    model.train(was)
    return wrong / max(total, 1)
