"""Pruning plans: JSON round trip, application returns a new model, replay rebuilds exactly that model."""
import json

import pytest
import torch

from hwprune import graph
from hwprune.plan import PLAN_VERSION, PruningPlan, apply_plan, replay_plan

from conftest import make_tiny_net


def _plan(net, x, ratio=0.5, round_to=4):
    groups = graph.list_groups(net, x, ignored=("fc",))
    ratios = {g.name: (ratio if i % 2 == 0 else 0.0) for i, g in enumerate(groups)}  # a non-uniform plan
    return PruningPlan(ratios=ratios, criterion="l1", round_to=round_to, ignored=["fc"])


def _apply(net, plan, x):
    out = apply_plan(net, plan, x)
    return out[0], out[1]


def test_json_round_trip_of_an_applied_plan(tiny_net, example_input):
    pruned, applied = _apply(tiny_net, _plan(tiny_net, example_input), example_input)
    assert applied.history and all(len(h) == 3 for h in applied.history)
    text = applied.to_json()
    json.loads(text)  # plain JSON
    again = PruningPlan.from_json(text)
    assert again == applied
    assert again.to_json() == text


def test_apply_returns_a_new_model_and_leaves_the_input(tiny_net, example_input):
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    plan = _plan(tiny_net, example_input)
    pruned, applied = _apply(tiny_net, plan, example_input)
    assert pruned is not tiny_net
    assert all(torch.equal(before[k], v) for k, v in tiny_net.state_dict().items())
    assert plan.history == []  # the given plan is not mutated; the applied one carries the history
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in tiny_net.parameters())
    assert pruned.stem[0].out_channels == 4  # stem.0 is the first group: pruned at 0.5
    assert pruned.layer1[0].conv1.out_channels == 8  # the second group: ratio 0


def test_replay_from_json_equals_the_applied_model(tiny_net, example_input):
    pruned, applied = _apply(tiny_net, _plan(tiny_net, example_input), example_input)
    stored = PruningPlan.from_json(applied.to_json())
    rebuilt = replay_plan(make_tiny_net(), stored, example_input)
    assert graph.channel_counts(rebuilt) == graph.channel_counts(pruned)
    a, b = pruned.state_dict(), rebuilt.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x), rtol=0, atol=0)


def test_replay_without_history_reapplies_the_plan(tiny_net, example_input):
    plan = _plan(tiny_net, example_input)
    pruned, _ = _apply(tiny_net, plan, example_input)
    rebuilt = replay_plan(tiny_net, plan, example_input)  # no history recorded: deterministic l1 gives the same
    assert graph.channel_counts(rebuilt) == graph.channel_counts(pruned)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x))


def test_dense_plan(tiny_net, example_input):
    plan = _plan(tiny_net, example_input, ratio=0.0)
    assert plan.is_dense and plan.summary() == "dense"
    pruned, applied = _apply(tiny_net, plan, example_input)
    assert applied.history == []
    assert graph.channel_counts(pruned) == graph.channel_counts(tiny_net)
    rebuilt = replay_plan(tiny_net, applied, example_input)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(example_input), tiny_net(example_input))


def test_summary_lists_pruned_groups_only():
    plan = PruningPlan(ratios={"a": 0.5, "b": 0.0, "c": 0.25})
    assert not plan.is_dense
    assert plan.summary() == "a=0.5 c=0.25"


def test_unsupported_version_is_rejected():
    d = json.loads(PruningPlan(ratios={"a": 0.5}).to_json())
    assert d["version"] == PLAN_VERSION
    d["version"] = PLAN_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        PruningPlan.from_json(json.dumps(d))
