"""Cheap-fidelity screening (hwprune/fidelity_screen.py): the rank-agreement statistic, the screening rule on a
study of hand-made trials, and a real search with --screen-fidelity."""
from __future__ import annotations

import json

import numpy as np
import optuna
import pandas as pd
import pytest
from scipy.stats import kendalltau

from hwprune.fidelity_screen import FidelityScreen, kendall_tau, summary


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_is_tau_b(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, 12).astype(float)  # with ties
    y = x + rng.normal(0, 2, 12)
    assert kendall_tau(list(x), list(y)) == pytest.approx(kendalltau(x, y).statistic)


def test_kendall_tau_edge_cases():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1], [1]) is None
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None


def study_with(trained):
    """A study whose completed trials are (cheap, full, latency_ms) as the search records them."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for cheap, full, ms in trained:
        study.add_trial(optuna.trial.create_trial(
            values=[full, ms], user_attrs={"cheap_score": cheap, "metrics": {"accuracy": full, "latency_ms:p": ms}}))
    return study


AGREEING = [(0.90, 0.95, 10.0), (0.80, 0.93, 8.0), (0.70, 0.90, 6.0), (0.60, 0.88, 5.0), (0.50, 0.85, 4.0),
            (0.40, 0.80, 3.0)]


def test_a_candidate_slower_and_cheaply_worse_than_a_trained_trial_is_screened():
    screen = FidelityScreen(study_with(AGREEING), "accuracy", margin=0.01)
    reason = screen.reason(0.55, {"p": 7.0})  # trial 2 (cheap 0.70, 6 ms) is faster and 0.15 better
    assert reason and reason.startswith("screened:") and "trial 2" in reason and "tau 1.00" in reason
    assert screen.reason(0.55, {"p": 2.0}) is None  # faster than every trained trial: could reach the front
    assert screen.reason(0.695, {"p": 7.0}) is None  # within the margin of the best faster trial
    assert screen.reason(0.85, {"p": 7.0}) is None  # cheaply better than every faster trial


def test_no_screening_while_calibrating_or_when_ranks_disagree():
    assert FidelityScreen(study_with(AGREEING[:5]), "accuracy").reason(0.1, {"p": 50.0}) is None
    # cheap scores ranked against the full ones: tau -1, so every candidate is trained
    disagreeing = [(c, f, ms) for (c, _, ms), (_, f, _) in zip(AGREEING, reversed(AGREEING))]
    study = study_with(disagreeing)
    assert FidelityScreen(study, "accuracy").reason(0.1, {"p": 50.0}) is None
    s = summary(study, "accuracy")
    assert s["kendall_tau"] == pytest.approx(-1.0) and s["pairs"] == 6 and s["fell_back"]


@pytest.mark.slow
def test_search_with_fidelity_screening_records_cheap_scores_and_the_agreement(tmp_path, capsys, monkeypatch):
    """The search's plumbing for screened trials. Which candidates the real rule screens depends on measured
    latencies (noise), so here the rule screens every candidate once 6 trials are trained (the rule itself is tested
    above); the cheap scores, tau and summary are the real ones."""
    from conftest import FAST_PROFILE_YAML, FAST_SPACE_YAML
    from hwprune import fidelity_screen
    from hwprune.cli import main
    from test_baselines import make_tiny_net

    import torch

    def after_calibration(self, cheap, latency_ms):
        calibrated = len(fidelity_screen.trained_trials(self.study, self.objective_name)) >= fidelity_screen.MIN_PAIRS
        return "screened: every candidate after calibration (test)" if calibrated else None

    monkeypatch.setattr(fidelity_screen.FidelityScreen, "reason", after_calibration)

    (tmp_path / "space.yaml").write_text(FAST_SPACE_YAML.replace("ratios: [0.0, 0.5]", "ratios: [0.0, 0.25, 0.5, 0.75]"))
    (tmp_path / "fast-cpu.yaml").write_text(FAST_PROFILE_YAML)
    torch.save(make_tiny_net(), tmp_path / "tiny.pt")
    out = tmp_path / "run"
    args = ["search", "--model", str(tmp_path / "tiny.pt"), "--trust-pickle", "--data", "digits", "--search-space",
            str(tmp_path / "space.yaml"), "--profile", str(tmp_path / "fast-cpu.yaml"), "--trials", "9", "--out",
            str(out), "--no-progress", "--verify-rounds", "0", "--screen-fidelity", "--screen-fidelity-margin", "0"]
    assert main(args) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert trials.cheap_score.notna().all()  # every trial, trained or screened, has its cheap score
    trained = trials[trials.state == "complete"]
    screened = trials[trials.state == "screened"]
    assert len(trained) == 6 and trained.accuracy.notna().all() and len(screened) == 3
    assert screened.accuracy.isna().all() and screened.reason.str.startswith("screened:").all()
    assert (screened.trial > trained.trial.max()).all()
    front = pd.read_csv(out / "pareto.csv")
    assert set(front.trial) <= set(trained.trial)
    s = json.loads((out / "summary.json").read_text())["fidelity_screen"]
    assert s["pairs"] == len(trained) and s["screened"] == len(screened)
    captured = capsys.readouterr()
    assert "cheap-fidelity screening:" in captured.out + captured.err


def test_bad_margin_is_one_line(tmp_path):
    from test_cli_errors import assert_one_error_line, run_cli

    proc = run_cli(["search", "--model", "demo", "--data", "digits", "--screen-fidelity-margin", "nan",
                    "--out", str(tmp_path / "r")], tmp_path)
    assert_one_error_line(proc, "screen-fidelity-margin")
