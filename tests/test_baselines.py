"""Baselines, warm start, hypervolume and finetune: pure checks on hand-computed fronts, then a real tiny search on
8x8 digits (warm-start trials, baselines table, summary), the baseline command and a longer fine-tune."""
from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
import torch

from conftest import make_tiny_net
from hwprune import graph
from hwprune.baselines import compare, sweep_ratios
from hwprune.cli import main
from hwprune.hypervolume import (Reference, best_speedup_within, ceiling_at_floor, drop_allowed_at_floor, hypervolume,
                                 hypervolume_history, lossless_equivalent_speedup)

REF = Reference(dense_ms=10.0, dense_accuracy=0.90, max_drop=0.10)  # box: relative latency < 1, accuracy > 0.80


def test_hypervolume_of_a_hand_computed_front():
    # (5 ms, 0.88): x 0.5, 0.08 above the floor -> 0.5 * 0.08 = 0.04
    assert hypervolume([(5.0, 0.88)], REF) == pytest.approx(0.04)
    # (2.5 ms, 0.84) adds the strip x in [0.25, 0.5) of height 0.04 -> +0.01
    assert hypervolume([(5.0, 0.88), (2.5, 0.84)], REF) == pytest.approx(0.05)
    # a dominated point and points outside the box (slower than dense, below the floor) add nothing
    assert hypervolume([(5.0, 0.88), (2.5, 0.84), (6.0, 0.85), (12.0, 0.95), (1.0, 0.70)], REF) == pytest.approx(0.05)
    assert hypervolume([], REF) == 0.0
    hist = hypervolume_history([(3, 2.5, 0.84), (1, 5.0, 0.88), (2, 6.0, 0.85)], REF)
    assert [t for t, _ in hist] == [1, 2, 3]
    assert [h for _, h in hist] == pytest.approx([0.04, 0.04, 0.05])


def test_lossless_equivalent_speedup_is_the_one_lossless_model_with_the_same_area():
    # one model 4x faster than dense (x = 0.25) that loses nothing dominates 0.75 * 0.10 = 0.075 of the box
    assert hypervolume([(2.5, 0.90)], REF) == pytest.approx(0.075)
    assert lossless_equivalent_speedup(0.075, REF) == pytest.approx(4.0)
    assert lossless_equivalent_speedup(0.0, REF) == pytest.approx(1.0)
    assert lossless_equivalent_speedup(0.10, REF) == float("inf")  # the whole box: only an above-dense model


def test_best_speedup_within_an_accuracy_drop():
    pts = [(5.0, 0.895), (2.0, 0.885), (1.0, 0.80)]
    assert best_speedup_within(pts, REF, 0.01) == pytest.approx(2.0)
    assert best_speedup_within(pts, REF, 0.005) == pytest.approx(2.0)  # 0.895 is 0.5 pp below dense
    assert best_speedup_within(pts, REF, 0.001) == pytest.approx(1.0)  # none within 0.1 pp: dense itself
    assert best_speedup_within(pts, REF, 0.20) == pytest.approx(10.0)


def _trials(rows):
    cols = ["trial", "state", "role", "accuracy", "latency_ms:p", "feasible"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows])


def _baselines(rows):
    return pd.DataFrame([{"baseline": tag, "method": tag.split("@")[0], "trial": t, "state": "complete",
                          "accuracy": a, "latency_ms:p": ms, "feasible": True} for tag, t, ms, a in rows])


def test_compare_says_plainly_when_the_search_did_not_beat_uniform():
    trials = _trials([(0, "complete", "dense", 0.90, 10.0, True), (1, "complete", "candidate", 0.88, 5.0, True),
                      (2, "complete", "candidate", 0.70, 1.0, True)])  # trial 2 is under the accuracy floor
    base = _baselines([("uniform@0.5", None, 4.0, 0.88)])  # dominates the search's only point in the box
    s = compare(trials, base, "p", max_drop=0.10)
    assert s["hypervolume"]["search"] == pytest.approx(0.04)
    assert s["hypervolume"]["uniform"] == pytest.approx(0.6 * 0.08)
    assert s["relative"]["uniform"] == pytest.approx(0.04 / 0.048)
    assert any("the search did NOT beat uniform" in v for v in s["verdict"])
    assert s["reference_point"]["accuracy"] == pytest.approx(0.80) and s["reference_point"]["latency_ms"] == 10.0
    # headroom: uniform's 0.048 is 48% of the 1.0 x 0.10 box, as much as one lossless model 1/(1 - 0.48) faster
    room = s["headroom"]["uniform"]
    assert room["covers"] == pytest.approx(0.48)
    assert room["lossless_equivalent_speedup"] == pytest.approx(1 / 0.52)
    assert room["ceiling"] == pytest.approx(0.10 / 0.048)
    assert any("uniform covers 48% of the reference box" in v and "at most 2.08x" in v for v in s["verdict"])
    # the fastest plan of the run (trial 2, 1 ms, below the accuracy floor) is where latency stops falling: a
    # lossless model there covers 0.9 * 0.10 = 0.09, 1.875x uniform's; for 1.10x (0.0528) it may lose d where
    # 0.9 * (0.10 - d) + 0.6 * (d - 0.02) = 0.0528, d = 0.084
    assert room["floor_ms"] == 1.0 and room["floor_speedup"] == pytest.approx(10.0)
    assert room["ceiling_at_floor"] == pytest.approx(0.09 / 0.048)
    assert room["drop_allowed_at_floor"] == pytest.approx(0.084, abs=2e-5)
    assert any("8.40 pp" in v for v in s["verdict"])


def test_the_floor_ceiling_says_when_a_lead_is_out_of_reach():
    # uniform's (4 ms, 0.895) is also the fastest plan: a lossless model at 4 ms makes 0.06 vs 0.057, 1.053x
    base = [(4.0, 0.895)]
    assert ceiling_at_floor(base, 4.0, REF) == pytest.approx(0.06 / 0.057)
    assert drop_allowed_at_floor(base, 4.0, REF, 1.10) is None
    # 1.05x (0.05985) is reachable only by a model at 4 ms that loses d with 0.6 * (0.10 - d) >= 0.05985
    assert drop_allowed_at_floor(base, 4.0, REF, 1.05) == pytest.approx(0.00025, abs=2e-5)
    # a baseline more accurate than dense keeps its area above dense in both ceilings: (4 ms, 0.92) covers
    # 0.6 * 0.12 = 0.072; with a lossless model at no latency 1.0 * 0.10 + 0.6 * 0.02 = 0.112
    assert ceiling_at_floor([(4.0, 0.92)], 0.0, REF) == pytest.approx(0.112 / 0.072)
    assert ceiling_at_floor([(4.0, 0.92)], 4.0, REF) == pytest.approx(1.0)
    trials = _trials([(0, "complete", "dense", 0.90, 10.0, True), (1, "complete", "candidate", 0.89, 6.0, True)])
    s = compare(trials, _baselines([("uniform@0.5", None, 4.0, 0.895)]), "p", max_drop=0.10)
    assert s["headroom"]["uniform"]["drop_allowed_at_floor"] is None
    assert any("1.10x is out of reach for models no faster than that" in v for v in s["verdict"])


def test_compare_credits_a_front_that_dominates_its_baselines_and_separates_warm_start_trials():
    trials = _trials([(0, "complete", "dense", 0.90, 10.0, True), (1, "complete", "candidate", 0.88, 5.0, True),
                      (2, "complete", "candidate", 0.86, 2.5, True), (3, "infeasible", "candidate", None, 1.0, False)])
    base = _baselines([("uniform@0.5", 1, 5.0, 0.88), ("global@0.5", None, 6.0, 0.85)])
    s = compare(trials, base, "p", max_drop=0.10)
    # front: 0.5*0.08 + 0.25*0.06 = 0.055; uniform (its warm-start trial 1): 0.04; global: 0.4*0.05 = 0.02
    assert s["hypervolume"]["search"] == pytest.approx(0.055)
    assert s["hypervolume"]["uniform"] == pytest.approx(0.04)
    assert s["hypervolume"]["global"] == pytest.approx(0.02)
    assert s["relative"]["uniform"] == pytest.approx(1.375)
    assert s["hypervolume"]["search_without_warm_start"] == pytest.approx(0.75 * 0.06)
    assert any(v.startswith("the search beat uniform") for v in s["verdict"])
    assert not any("NOT" in v for v in s["verdict"])
    assert s["best_speedup_within_pp"]["search"]["2"] == pytest.approx(2.0)  # 0.88 is 2 pp below dense
    assert s["best_speedup_within_pp"]["search"]["1"] == pytest.approx(1.0)


def test_sweep_ratios_and_global_plan():
    assert sweep_ratios([0.0, 0.25, 0.5, 0.625, 0.75]) == [0.25, 0.5, 0.625, 0.75]
    assert sweep_ratios([0.0, 0.9]) == [0.9]
    assert sweep_ratios([0.0, 0.125, 0.25, 0.5, 0.75, 0.875]) == [0.25, 0.5, 0.75, 0.875]  # the grid's extreme too
    assert sweep_ratios([0.0, 0.1]) == [0.1]
    net, x = make_tiny_net(), torch.randn(1, 1, 8, 8)
    groups = graph.list_groups(net, x, ["fc"])
    ratios = graph.global_ratios(net, x, 0.5, [g.name for g in groups], ignored=["fc"])
    assert set(ratios) == {g.name for g in groups}
    removed = sum(r * g.channels for g, r in zip(groups, ratios.values()))
    assert 0.35 <= removed / sum(g.channels for g in groups) <= 0.65
    assert all(0.0 <= r <= 0.9 for r in ratios.values())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real tiny search on 8x8 digits: 8 trials, the first ones warm starts."""
    from conftest import FAST_PROFILE_YAML, FAST_SPACE_YAML

    root = tmp_path_factory.mktemp("baselines")
    (root / "space.yaml").write_text(FAST_SPACE_YAML.replace("ratios: [0.0, 0.5]", "ratios: [0.0, 0.25, 0.5, 0.75]"))
    (root / "fast-cpu.yaml").write_text(FAST_PROFILE_YAML)
    torch.save(make_tiny_net(), root / "tiny.pt")
    args = ["search", "--model", str(root / "tiny.pt"), "--trust-pickle", "--data", "digits", "--search-space", str(root / "space.yaml"),
            "--profile", str(root / "fast-cpu.yaml"), "--trials", "7", "--out", str(root / "run"), "--no-progress"]
    assert main(args) == 0
    return {"dir": root / "run", "args": args}


def _study(d):
    return optuna.load_study(study_name="hwprune", storage=f"sqlite:///{d / 'study.db'}")


@pytest.mark.slow
def test_warm_start_trials_run_first_and_are_recorded(run):
    d = run["dir"]
    study = _study(d)
    tags = {t.number: t.user_attrs.get("baseline") for t in study.trials}
    assert tags[0] is None and study.trials[0].user_attrs["role"] == "dense"
    assert [tags[i] for i in (1, 2, 3)] == ["uniform@0.25", "uniform@0.5", "uniform@0.75"]
    for i, r in ((1, 0.25), (2, 0.5), (3, 0.75)):
        assert set(study.trials[i].params.values()) == {r}
    assert study.metric_names == ["accuracy", "latency_ms:fast-cpu"]
    base = pd.read_csv(d / "baselines.csv")
    assert {"uniform@0.25", "uniform@0.5", "uniform@0.75"} <= set(base.baseline)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["relative"]["uniform"] is None or summary["relative"]["uniform"] >= 1.0 - 1e-9
    assert "reference point" in summary["reference"]
    hv = pd.read_csv(d / "hypervolume.csv")
    assert list(hv.trial) == sorted(hv.trial) and hv.hypervolume.is_monotonic_increasing
    assert (d / "hypervolume.png").is_file()
    # a resumed study does not enqueue the warm start again
    args = list(run["args"])
    args[args.index("--trials") + 1] = "8"
    assert main(args) == 0
    study = _study(d)
    assert sum("baseline" in t.user_attrs for t in study.trials) == len(study.user_attrs["warm_start"])
    repeats = sum(t.user_attrs.get("same_as") is not None for t in study.trials)  # plans that rebuilt a model
    assert len(study.trials) == 8 + repeats


@pytest.mark.slow
def test_baseline_command_adds_rows_and_rejects_bad_ratios(run, capsys):
    d = run["dir"]
    assert main(["baseline", "--run", str(d), "--trust-pickle", "--method", "uniform", "--ratios", "0.5", "1.5"]) == 2
    assert "--ratios 1.5" in capsys.readouterr().err
    assert main(["baseline", "--run", str(d), "--trust-pickle", "--method", "random", "--count", "2"]) == 0
    out = capsys.readouterr().out
    base = pd.read_csv(d / "baselines.csv")
    rnd = base[base.method == "random"]
    assert list(rnd.baseline) == ["random#0", "random#1"] and (rnd.source == "hwprune baseline").all()
    assert rnd.accuracy.between(0, 1).all() and rnd["latency_ms:fast-cpu"].gt(0).all()
    assert (d / "baselines" / "random#0" / "metrics.json").is_file()
    assert "random" in json.loads((d / "summary.json").read_text())["hypervolume"]
    assert "front hypervolume" in out


@pytest.mark.slow
def test_finetune_improves_a_pruned_model_on_digits(run, capsys):
    d = run["dir"]
    trials = pd.read_csv(d / "trials.csv")
    pruned = int(trials[trials.plan_summary.str.contains("=0.5")].trial.iloc[0])
    assert main(["finetune", "--run", str(d), "--trust-pickle", "--trial", str(pruned), "--steps", "120", "--lr", "0.05"]) == 0
    table = pd.read_csv(d / "finetune.csv")
    row = table[table.trial == pruned].iloc[0]
    dense = table[table.role == "dense"].iloc[0]
    # the search gave 2 fine-tuning steps to a randomly initialised net: 120 more must help a lot
    assert row.accuracy_finetuned > row.accuracy_search + 0.2
    assert dense.accuracy_finetuned > dense.accuracy_search + 0.2
    assert row.delta_vs_dense_pp == pytest.approx(100 * (row.accuracy_finetuned - dense.accuracy_finetuned))
    out = d / "models" / f"trial-{pruned}" / "finetuned"
    assert {"model.onnx", "model.pt", "metrics.json"} <= {p.name for p in out.iterdir()}
    model = torch.load(out / "model.pt", weights_only=False).eval()
    from hwprune.data import load_dataset
    from hwprune.recover import evaluate

    assert evaluate(model, load_dataset("digits", seed=0)) == pytest.approx(row.accuracy_finetuned)
    assert main(["finetune", "--run", str(d), "--trust-pickle", "--trial", "999", "--steps", "5"]) == 2
    # --continue starts from the finish just written (not the search's weights) and counts the steps in all
    assert main(["finetune", "--run", str(d), "--trust-pickle", "--trial", str(pruned), "--steps", "10",
                 "--continue"]) == 0
    again = pd.read_csv(d / "finetune.csv").set_index("trial").loc[pruned]
    assert again.accuracy_before == pytest.approx(row.accuracy_finetuned)
    assert again.steps == 10 and again.steps_total == 130
    other = int(trials[(trials.state == "complete") & ~trials.trial.isin([pruned, 0])].trial.iloc[0])
    assert main(["finetune", "--run", str(d), "--trust-pickle", "--trial", str(other), "--steps", "5",
                 "--continue"]) == 2
    assert "no earlier finish" in capsys.readouterr().err


def test_greedy_proposals_take_latency_saved_per_accuracy_lost():
    from hwprune.proposals import GroupEffect, greedy_plans

    effects = [
        GroupEffect("a", 0.5, 0.001, 3.0), GroupEffect("a", 0.75, 0.050, 4.0),  # cheap first half, costly after
        GroupEffect("b", 0.5, 0.010, 2.0), GroupEffect("b", 0.75, 0.012, 3.0),
        GroupEffect("c", 0.5, 0.200, 1.0),  # saves little, costs a lot: taken last
    ]
    plans = greedy_plans(effects, ["a", "b", "c"], dense_ms=10.0, targets=(0.7, 0.4))
    # steps: a->0.5 (3/0.002), b->0.75 (3/0.013), b 0.5 is worse per pp; a->0.75 (1/0.05); c->0.5 (1/0.201)
    assert plans[0] == ("greedy@0.7", {"a": 0.5, "b": 0.0, "c": 0.0})  # 7 ms estimated
    assert plans[1] == ("greedy@0.4", {"a": 0.5, "b": 0.75, "c": 0.0})  # 4 ms
    unreachable = greedy_plans(effects, ["a", "b", "c"], dense_ms=10.0, targets=(0.1,))
    assert unreachable == [("greedy@0.2", {"a": 0.75, "b": 0.75, "c": 0.5})]  # everything taken: 2 ms


def test_greedy_proposals_weigh_dropping_a_block_net_of_the_groups_inside_it():
    from hwprune.proposals import GroupEffect, greedy_plans

    effects = [
        GroupEffect("blk.conv1", 0.5, 0.001, 2.0),  # a group inside the block: cheap, taken first
        GroupEffect("stem", 0.5, 0.002, 1.0),
        GroupEffect("blk", 1.0, 0.003, 3.0, kind="depth"),  # the whole block: only 1 ms more than its inner half
    ]
    plans = greedy_plans(effects, ["blk.conv1", "stem"], dense_ms=10.0, targets=(0.8, 0.7, 0.6),
                         inside={"blk": ["blk.conv1"]})
    # blk.conv1 first (2/0.001); then stem (1/0.002) beats the block's net 1 ms for 0.002; then the block, which
    # releases blk.conv1 (reset to 0): 10 - 2 - 1 - 1 = 6 ms
    assert plans == [("greedy@0.8", {"blk.conv1": 0.5, "stem": 0.0, "blk": 0.0}),
                     ("greedy@0.7", {"blk.conv1": 0.5, "stem": 0.5, "blk": 0.0}),
                     ("greedy@0.6", {"blk.conv1": 0.0, "stem": 0.5, "blk": 1.0})]
    # without the inner group counted, the block's full 3 ms would have been credited on top of it: 4 ms, not 6
    naive = greedy_plans(effects, ["blk.conv1", "stem"], dense_ms=10.0, targets=(0.1,))
    assert naive == [("greedy@0.4", {"blk.conv1": 0.5, "stem": 0.5, "blk": 1.0})]
