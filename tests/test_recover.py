"""Recovery: BN recalibration, fine-tuning (with and without distillation) and validation-only accuracy."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from hwprune.config import RecoveryBudget
from hwprune.data import DataBundle
from hwprune.recover import evaluate, recalibrate_bn, recover, train

from conftest import make_tiny_net


def _train_loss(model, data):
    model.eval()
    with torch.no_grad():
        x, y = next(iter(data.loader("train", len(data.train))))
        return F.cross_entropy(model(x), y).item()


def test_bn_recalibration_sets_running_stats_from_training_batches(tiny_net, digits):
    bn = tiny_net.stem[1]
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    momentum = bn.momentum
    recalibrate_bn(tiny_net, digits, batches=2, batch_size=64, seed=0)
    assert not tiny_net.training and bn.momentum == momentum  # restored
    assert not torch.allclose(bn.running_mean, old_mean) and not torch.allclose(bn.running_var, old_var)
    # closed form: the cumulative average of the two batches' means of the stem conv's output
    batches = list(itertools.islice(digits.loader("train", 64, shuffle=True, seed=0), 2))
    with torch.no_grad():
        means = [tiny_net.stem[0](x).mean(dim=(0, 2, 3)) for x, _ in batches]
    torch.testing.assert_close(bn.running_mean, (means[0] + means[1]) / 2, rtol=1e-4, atol=1e-5)
    assert int(bn.num_batches_tracked) == 2


def test_bn_recalibration_with_zero_batches_changes_nothing(tiny_net, digits):
    before = copy.deepcopy(tiny_net.state_dict())
    recalibrate_bn(tiny_net, digits, batches=0)
    assert all(torch.equal(before[k], v) for k, v in tiny_net.state_dict().items())


def test_training_reduces_loss_and_learns_digits(tiny_digits, digits):
    net = make_tiny_net()
    before_loss, before_acc = _train_loss(net, tiny_digits), evaluate(net, digits)
    train(net, tiny_digits, steps=60, lr=0.05, batch_size=32, seed=0)
    assert not net.training
    after_loss = _train_loss(net, tiny_digits)
    assert after_loss < 0.5 * before_loss
    acc = evaluate(net, digits)
    assert acc > 0.6 and acc > before_acc + 0.3


def test_training_is_deterministic_given_the_seed(tiny_digits):
    a, b = make_tiny_net(), make_tiny_net()
    train(a, tiny_digits, steps=5, lr=0.05, batch_size=32, seed=3)
    train(b, tiny_digits, steps=5, lr=0.05, batch_size=32, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_progress_hears_every_step_and_changes_nothing(tiny_digits):
    """A long finish shows a bar; the callback sees each step once, and the weights are those of a run without it.
    It is not a recovery hook: an exact copy of its teacher is still returned untouched."""
    a, b = make_tiny_net(), make_tiny_net()
    seen = []
    train(a, tiny_digits, steps=5, lr=0.05, batch_size=32, seed=3, progress=seen.append)
    train(b, tiny_digits, steps=5, lr=0.05, batch_size=32, seed=3)
    assert seen == list(range(5)) and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    teacher, copy_ = make_tiny_net(), make_tiny_net()
    train(copy_, tiny_digits, steps=5, lr=0.05, teacher=teacher, alpha=1.0, progress=seen.append)
    assert len(seen) == 5 and all(torch.equal(p, q) for p, q in zip(copy_.parameters(), teacher.parameters()))


def test_zero_steps_is_a_no_op(tiny_net, tiny_digits):
    before = copy.deepcopy(tiny_net.state_dict())
    train(tiny_net, tiny_digits, steps=0, lr=0.1)
    assert all(torch.equal(before[k], v) for k, v in tiny_net.state_dict().items())


def test_distillation_uses_the_teacher_and_leaves_it_alone(tiny_digits):
    teacher = make_tiny_net(seed=5)
    t_state = copy.deepcopy(teacher.state_dict())
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(1))
    student = make_tiny_net()
    train(student, tiny_digits, steps=3, lr=0.01, batch_size=16, teacher=teacher, alpha=0.7, seed=0)
    assert len(calls) == 3
    assert all(torch.equal(t_state[k], v) for k, v in teacher.state_dict().items())
    # distilled training follows a different path from plain training
    plain = make_tiny_net()
    train(plain, tiny_digits, steps=3, lr=0.01, batch_size=16, seed=0)
    assert not torch.allclose(plain.fc.weight, student.fc.weight)


def test_recover_applies_the_budget(tiny_digits):
    net = make_tiny_net()
    before = copy.deepcopy(net.state_dict())
    budget = RecoveryBudget(bn_recalibration_batches=1, finetune_steps=2, batch_size=16, lr=0.01)
    out = recover(net, tiny_digits, budget)
    assert out is net and not net.training
    assert not torch.equal(before["stem.1.running_mean"], net.stem[1].running_mean)
    assert not torch.equal(before["fc.weight"], net.fc.weight)
    # distill=True without a teacher is plain training; with one, the teacher is consulted
    calls = []
    teacher = make_tiny_net(seed=9)
    teacher.register_forward_hook(lambda m, i, o: calls.append(1))
    recover(make_tiny_net(), tiny_digits, RecoveryBudget(0, 2, 16, distill=True), teacher=teacher)
    assert len(calls) == 2
    calls.clear()
    recover(make_tiny_net(), tiny_digits, RecoveryBudget(0, 2, 16, distill=False), teacher=teacher)
    assert calls == []


class _Constant(nn.Module):
    """Always predicts class 3; refuses to look at training samples (marked with the value 99)."""

    def forward(self, x):
        if (x == 99).any():
            raise AssertionError("evaluate looked at training data")
        out = torch.zeros(x.shape[0], 10)
        out[:, 3] = 1
        return out


def test_evaluate_uses_only_the_validation_split():
    train_ds = TensorDataset(torch.full((20, 1, 2, 2), 99.0), torch.full((20,), 3))
    val_y = torch.tensor([3, 3, 3, 1, 2, 3, 0, 3])  # 5 of 8 are class 3
    val_ds = TensorDataset(torch.zeros(8, 1, 2, 2), val_y)
    data = DataBundle("fake", train_ds, val_ds, (1, 2, 2), 10)
    assert evaluate(_Constant(), data, batch_size=3) == pytest.approx(5 / 8)


def test_dropout_off_zeroes_every_drop_probability_and_restores_it():
    from torchvision.ops import StochasticDepth

    from hwprune.recover import dropout_off

    model = nn.ModuleDict({"drop": nn.Dropout(0.1), "drop2d": nn.Dropout2d(0.2),
                           "mha": nn.MultiheadAttention(8, 2, dropout=0.3), "sd": StochasticDepth(0.4, "row"),
                           "lin": nn.Linear(4, 4)})
    model.train()
    with dropout_off(model):
        assert [model.drop.p, model.drop2d.p, model.mha.dropout, model.sd.p] == [0.0] * 4
        assert model.training
        x = torch.randn(3, 5, 8)
        assert torch.equal(model.drop(x), x)
    assert [model.drop.p, model.drop2d.p, model.mha.dropout, model.sd.p] == [0.1, 0.2, 0.3, 0.4]
