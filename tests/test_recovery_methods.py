"""Recovery methods on real data (sklearn digits, tiny residual CNN): each reaches its target sparsity exactly and
beats the pruned model before recovery; configuration is validated strictly; a search chooses a method per trial
only when the space lists several."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from conftest import make_tiny_net
from hwprune.config import RecoveryBudget, parse_search_space
from hwprune.errors import ConfigError
from hwprune.plan import PruningPlan, apply_plan
from hwprune.recover import evaluate, recover, train
from hwprune.recovery import get_method, method_names
from hwprune.structures import n_removed

X = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
VARIANTS = [("finetune", {}), ("iterative", {}), ("dpu", {"mode": "one_stage"}), ("dpu", {"mode": "multi_step"}),
            ("dpu", {"mode": "fixed"}),
            ("admm", {}), ("cdp_dtc", {"mode": "intended"}), ("cdp_dtc", {"mode": "code_faithful"})]


@pytest.fixture(scope="module")
def trained(digits):
    net = make_tiny_net()
    train(net, digits, steps=150, lr=0.05, batch_size=64, seed=0)
    return net


def _convs(net):
    """3x3 convs with several input channels. (On the 1-channel stem a kernel is a whole filter: masking 75% of
    them leaves BatchNorm constant channels, which makes dpu's straight-through training unstable; see dpu.py.)"""
    return [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 1]


@pytest.fixture(scope="module")
def pruned(trained):
    plan = PruningPlan(ratios={}, structures={n: {"structure": "kernel", "ratio": 0.75} for n in _convs(trained)})
    return apply_plan(trained, plan, X)[0]


@pytest.mark.parametrize("method,params", VARIANTS, ids=[f"{m}-{p.get('mode', '')}" for m, p in VARIANTS])
def test_method_reaches_the_target_exactly_and_beats_untrained_pruning(method, params, pruned, digits):
    before = evaluate(pruned, digits)
    budget = RecoveryBudget(finetune_steps=40, batch_size=64, lr=0.05, bn_recalibration_batches=5,
                            method=(method,), method_params={method: params} if params else {})
    model = recover(copy.deepcopy(pruned), digits, budget)
    after = evaluate(model, digits)
    assert after > before + 0.05, (before, after)
    for name in _convs(model):
        w = model.get_submodule(name).weight.detach()
        zero_kernels = int((w.flatten(2).abs().sum(-1) == 0).sum())
        assert zero_kernels == n_removed(w.shape[0] * w.shape[1], 0.75), name  # exactly the target, no more
        assert int((w == 0).sum()) == zero_kernels * 9


def test_admm_on_unify_ties_tiles_and_recovers(trained, digits):
    layers = ["layer2.1.conv2", "layer3.1.conv2"]
    spec = {"structure": "unify", "ratio": 0.5, "params": {"b": 4, "prune_share": 0.5}}
    pruned = apply_plan(trained, PruningPlan(ratios={}, structures={l: dict(spec) for l in layers}), X)[0]
    before = evaluate(pruned, digits)
    budget = RecoveryBudget(finetune_steps=30, batch_size=64, lr=0.05, method=("admm",))
    model = recover(copy.deepcopy(pruned), digits, budget)
    assert evaluate(model, digits) >= before
    for l in layers:
        conv = model.get_submodule(l)
        tie, w = conv.hw_tie, conv.weight.detach()
        n_tiles = int(tie.max()) + 1
        assert (tie >= 0).any() and bool((w[~conv.hw_keep] == 0).all())
        for t in tie[tie >= 0].unique():
            a = w[tie == t].abs()
            assert float(a.max() - a.min()) <= 1e-6 * float(a.max()) + 1e-12


def test_a_method_that_does_not_apply_says_so_in_one_line(trained, digits):
    plan = PruningPlan(ratios={}, structures={"layer2.1.conv2": {"structure": "nm", "ratio": 1.0},
                                              "layer1.0.conv1": {"structure": "kernel", "ratio": 0.5}})
    pruned = apply_plan(trained, plan, X)[0]
    notes = []
    zeros = pruned.get_submodule("layer2.1.conv2").weight.detach() == 0
    recover(pruned, digits, RecoveryBudget(finetune_steps=4, method=("cdp_dtc",)), log=notes.append)
    assert len(notes) == 1 and "cdp_dtc" in notes[0] and "'nm'" in notes[0] and "layer2.1.conv2" in notes[0]
    assert "\n" not in notes[0]
    assert bool((pruned.get_submodule("layer2.1.conv2").weight[zeros] == 0).all())  # still held, fine-tuned


def test_methods_never_spend_more_than_the_step_budget(pruned, digits, monkeypatch):
    import hwprune.recover as rec

    steps = []
    real = rec.train

    def counting(model, data, *a, **k):
        steps.append(k["steps"])
        return real(model, data, *a, **k)

    monkeypatch.setattr(rec, "train", counting)
    for method, params in VARIANTS:
        steps.clear()
        b = RecoveryBudget(finetune_steps=17, method=(method,), method_params={method: params} if params else {})
        recover(copy.deepcopy(pruned), digits, b)
        assert sum(steps) == 17, (method, steps)


def _space(text):
    import yaml

    return parse_search_space(yaml.safe_load(text), "t", "t.yaml")


def test_recovery_method_yaml_is_parsed_and_validated():
    s = _space("recovery:\n  method: [finetune, dpu]\n  dpu: {mode: multi_step, interval: 5}\n  admm: {rho: 0.01}\n")
    assert s.recovery.method == ("finetune", "dpu")
    assert s.recovery.method_params == {"dpu": {"mode": "multi_step", "interval": 5}, "admm": {"rho": 0.01}}
    assert get_method("dpu").params(s.recovery)["stages"] == 3  # defaults fill the rest
    assert _space("recovery:\n  method: iterative\n").recovery.method == ("iterative",)
    assert RecoveryBudget().method == ("finetune",)
    bad = [
        ("recovery:\n  method: sgdr\n", r"recovery\.method\[0\]: 'sgdr' is not valid; choose one of: finetune"),
        ("recovery:\n  method: [dpu, dpu]\n", "lists a method twice"),
        ("recovery:\n  dpu: {interval: 0}\n", r"recovery\.dpu\.interval: 0 is below the minimum 1"),
        ("recovery:\n  dpu: {mode: fast}\n", r"recovery\.dpu\.mode: 'fast' is not valid; choose one of: one_stage, multi_step, fixed"),
        ("recovery:\n  admm: {rh0: 1}\n", r"recovery\.admm: unknown key 'rh0'; valid keys: rounds, rho"),
        ("recovery:\n  finetune: {lr: 1}\n", "has no hyperparameters"),
        ("recovery:\n  cdp_dtc: {prop: fast}\n", r"recovery\.cdp_dtc\.prop: expected float"),
        ("recovery:\n  methd: dpu\n", r"unknown key 'methd'; valid keys: .*method"),
    ]
    for text, pattern in bad:
        with pytest.raises(ConfigError, match=pattern):
            _space(text)
    assert set(method_names()) == {"finetune", "iterative", "dpu", "admm", "cdp_dtc", "reconstruct"}


def test_search_chooses_a_method_per_trial_only_when_several_are_listed():
    import optuna

    from hwprune.search import plan_from_trial

    class W:  # the parts of a Workload plan_from_trial reads
        groups = []
        structure_layers = []

        def __init__(self, methods):
            self.space = dataclasses.replace(_space("ratios: [0.0]\n"), recovery=RecoveryBudget(method=methods))

        def plan(self, ratios):
            return PruningPlan(ratios=dict(ratios))

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        t = study.ask()
        seen.add(plan_from_trial(W(("finetune", "dpu", "admm")), t).recovery_method)
    assert seen == {"finetune", "dpu", "admm"}
    t = study.ask()
    assert plan_from_trial(W(("iterative",)), t).recovery_method is None and "recovery.method" not in t.params


def test_prune_command_takes_a_recovery_method(tmp_path, space_file, profile_file):
    import json

    from hwprune.cli import main

    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    base = ["prune", "--model", str(model_path), "--trust-pickle", "--data", "digits", "--search-space", str(space_file),
            "--profile", str(profile_file), "--ratio", "0.5"]
    assert main(base + ["--recovery-method", "sgdr", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()  # rejected before any work
    assert main(base + ["--recovery-method", "iterative", "--out", str(tmp_path / "ok")]) == 0
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert metrics["recovery_method"] == "iterative" and "no mask-only layers" in metrics["recovery_notes"][0]
