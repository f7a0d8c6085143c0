"""Recovery after pruning and accuracy on the validation split.

Every candidate, and the dense reference, gets the same budget (BN recalibration, then a fixed number of
fine-tuning steps with a cosine learning rate, optionally distilled from the dense model), so extra training is
never mistaken for pruning quality. Unlabelled data has no hard labels to train on: there the whole budget is spent
on distillation from the dense model (``budget.distill_loss``: KL on logits at the budget's temperature, or
cosine + MSE on embeddings), whatever ``distill`` says.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hwprune.config import RecoveryBudget
from hwprune.data import DataBundle
from hwprune.errors import DataError
from hwprune.fidelity import attention_mask, comparable, distillation_loss, forward, primary_output
from hwprune.hidden_distill import HiddenStates, chosen_blocks, hidden_loss
from hwprune.structures.masks import hold


@torch.no_grad()
def evaluate(model: nn.Module, data: DataBundle, batch_size: int = 256) -> float:
    """Top-1 accuracy on the validation split (never on training data)."""
    model.eval()
    correct = total = 0
    if not data.labeled:
        raise DataError(f"data {data.name!r} has no labels, so accuracy cannot be measured; use a fidelity "
                        f"objective (agreement, cosine or kl)")
    for x, y in data.loader("val", batch_size):
        correct += (primary_output(forward(model, x)).argmax(1) == y).sum().item()
        total += y.numel()
    return correct / max(total, 1)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: DataBundle, batches: int, batch_size: int = 64, seed: int = 0) -> None:
    """Re-estimate BatchNorm running statistics for the pruned architecture from training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for x, _ in itertools.islice(data.loader("train", batch_size, shuffle=True, seed=seed), batches):
        forward(model, x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


# float attributes that hold a drop probability (nn.MultiheadAttention, torchvision's Swin attention, HF attentions
# that keep a float instead of an nn.Dropout); ``p`` counts only on dropout-like modules (nn.Dropout*, StochasticDepth)
_DROP_ATTRS = ("dropout", "attention_dropout", "dropout_p", "dropout_prob", "attention_probs_dropout_prob")


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Every drop probability of ``model`` set to 0 inside the block (restored after), the rest in train mode."""
    saved = []
    for m in model.modules():
        names = list(_DROP_ATTRS)
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "StochasticDepth":
            names.append("p")
        for name in names:
            v = m.__dict__.get(name)
            if isinstance(v, float) and v > 0:
                saved.append((m, name, v))
                setattr(m, name, 0.0)
    try:
        yield
    finally:
        for m, name, v in saved:
            setattr(m, name, v)


def _batches(data: DataBundle, batch_size: int, seed: int):
    epoch = 0
    while True:
        yield from data.loader("train", batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold identical tensors under identical names (a model and an untouched copy of it)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def train(
    model: nn.Module,
    data: DataBundle,
    steps: int,
    lr: float,
    batch_size: int = 64,
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    teacher: Optional[nn.Module] = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    seed: int = 0,
    on_step: Optional[Callable[[int], None]] = None,
    extra_loss: Optional[Callable[[], torch.Tensor]] = None,
    before_step: Optional[Callable[[int], None]] = None,
    distill_loss: str = "kl",
    hidden_weight: float = 0.0,
    hidden_layers: Sequence[str] = (),
    progress: Optional[Callable[[int], None]] = None,
) -> nn.Module:
    """``steps`` SGD/Adam steps with a cosine schedule; with a teacher, loss = alpha*KD + (1-alpha)*CE, KD being
    ``distill_loss`` (fidelity.distillation_loss). Unlabelled data: loss = KD alone (a teacher is required).
    ``hidden_weight`` > 0 adds that times the layer-wise term of hwprune.hidden_distill (every block's output
    pulled toward the dense block's; ``hidden_layers`` glob patterns choose the blocks, default the model's stack).
    ``progress(step)`` is told of every finished step (a progress bar; it changes nothing).

    Masked layers hold their masks (projection after every step). Recovery methods plug in through
    ``extra_loss()`` (a penalty added to the loss), ``before_step(step)`` (after backward, before the optimizer
    step: gradient surgery) and ``on_step(step)`` (after the step and the projection: mask updates).

    Pure distillation (alpha 1, always so on unlabelled data) trains with dropout off: the target is the dense
    model's deterministic output, and with dropout on the student chases a noisy copy of itself (the dense model
    drifted from cosine 1.0 to 0.979 under 1000 such steps; a pruned MiniLM reached 0.846 vs 0.860 without
    dropout at 200 steps). With hard labels in the loss, dropout stays as the model was built."""
    if steps <= 0:
        return model
    if not data.labeled:
        if teacher is None:
            raise DataError(f"data {data.name!r} has no labels: recovery can only distil from the dense model, and "
                            f"no teacher was given")
        alpha = 1.0  # no hard labels exist: the whole loss is distillation
    if teacher is not None and alpha >= 1.0 and not (on_step or extra_loss or before_step) \
            and same_weights(model, teacher):
        # Distilling the dense model into an exact copy of itself is the identity; training would only let Adam
        # amplify rounding-level gradients (the dense trial of a MiniLM search drifted to cosine 0.995).
        return model.eval()
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    if teacher is not None:
        teacher.eval()
    model.train()
    no_dropout = dropout_off(model) if teacher is not None and alpha >= 1.0 else contextlib.nullcontext()
    hidden = (hidden_weight, chosen_blocks(teacher, hidden_layers)) if teacher is not None and hidden_weight > 0 \
        else None
    with hold(opt, model), no_dropout:  # masked layers keep their zeros (and tied tiles) through every step
        _steps(model, opt, sched, data, steps, batch_size, seed, teacher, temperature, alpha, on_step, extra_loss,
               before_step, distill_loss, hidden, progress)
    model.eval()
    return model


def _steps(model, opt, sched, data, steps, batch_size, seed, teacher, temperature, alpha, on_step, extra_loss,
           before_step, distill_loss="kl", hidden=None, progress=None) -> None:
    weight, blocks = hidden if hidden is not None else (0.0, [])
    with HiddenStates(model, blocks) as s_states, HiddenStates(teacher, blocks) if teacher is not None \
            else contextlib.nullcontext() as t_states:
        for step, (x, y) in enumerate(itertools.islice(_batches(data, batch_size, seed), steps)):
            out = forward(model, x)
            loss = F.cross_entropy(primary_output(out), y) if teacher is None or alpha < 1.0 else 0.0
            if teacher is not None:
                with torch.no_grad():
                    t_out = comparable(forward(teacher, x), x)
                kd = distillation_loss(comparable(out, x), t_out, distill_loss, temperature)
                loss = alpha * kd + (1 - alpha) * loss
                layerwise = hidden_loss(s_states.outputs, t_states.outputs, attention_mask(x)) if weight else None
                if layerwise is not None:
                    loss = loss + weight * layerwise
            _step(model, opt, sched, loss, step, on_step, extra_loss, before_step)
            if progress is not None:
                progress(step)


def _step(model, opt, sched, loss, step, on_step, extra_loss, before_step) -> None:
    if extra_loss is not None:
        loss = loss + extra_loss()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step(step)
    opt.step()
    sched.step()
    if on_step is not None:
        on_step(step)


def train_budget(model: nn.Module, data: DataBundle, budget: RecoveryBudget, steps: int,
                 teacher: Optional[nn.Module] = None, seed: int = 0, **hooks) -> nn.Module:
    """``train`` with the budget's optimizer settings for ``steps`` of its steps (a recovery method's phase).
    The teacher is used when the budget distils, and always on unlabelled data (nothing else to learn from)."""
    distil = budget.distill or not data.labeled
    return train(model, data, steps=steps, lr=budget.lr, batch_size=budget.batch_size, optimizer=budget.optimizer,
                 weight_decay=budget.weight_decay, teacher=teacher if distil else None,
                 temperature=budget.distill_temperature, alpha=budget.distill_alpha, seed=seed,
                 distill_loss=budget.distill_loss or "kl", hidden_weight=budget.distill_hidden,
                 hidden_layers=budget.distill_hidden_layers, **hooks)


def recover(
    model: nn.Module, data: DataBundle, budget: RecoveryBudget, teacher: Optional[nn.Module] = None, seed: int = 0,
    method: Optional[str] = None, log: Optional[Callable[[str], None]] = None,
) -> nn.Module:
    """The recovery every candidate gets: BN recalibration, then the budget's ``finetune_steps`` spent by the
    recovery method (``method`` or the budget's first; KD if configured). Masks hold throughout."""
    from hwprune.recovery import get_method

    recalibrate_bn(model, data, budget.bn_recalibration_batches, budget.batch_size, seed)
    name = method or budget.method[0]
    return get_method(name).run(model, data, budget, teacher=teacher, seed=seed, log=log)
