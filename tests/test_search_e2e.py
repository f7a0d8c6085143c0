"""End to end on a tiny model: search -> Pareto front -> export, replay, resume, failures, budget, Python API."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from conftest import make_tiny_net
from hwprune import graph
from hwprune.cli import main
from hwprune.plan import PruningPlan, replay_plan
from hwprune.results import load_results

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small search shared by the tests of this module (5 trials on 8x8 digits)."""
    from conftest import FAST_PROFILE_YAML, FAST_SPACE_YAML

    root = tmp_path_factory.mktemp("e2e")
    (root / "space.yaml").write_text(FAST_SPACE_YAML.replace("ratios: [0.0, 0.5]", "ratios: [0.0, 0.25, 0.5, 0.75]"))
    (root / "fast-cpu.yaml").write_text(FAST_PROFILE_YAML)
    model_path = root / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    args = ["search", "--model", str(model_path), "--trust-pickle", "--data", "digits", "--search-space", str(root / "space.yaml"),
            "--profile", str(root / "fast-cpu.yaml"), "--trials", "5", "--out", str(root / "run"), "--no-progress"]
    assert main(args) == 0
    return {"root": root, "dir": root / "run", "args": args, "model_path": model_path}


def test_search_writes_every_result_file(run):
    d = run["dir"]
    for name in ("trials.csv", "pareto.csv", "pareto.png", "study.db"):
        assert (d / name).is_file(), name
    df = pd.read_csv(d / "trials.csv")
    assert len(df) == 5
    dense = df[df.trial == 0].iloc[0]
    assert dense.role == "dense" and dense.plan_summary == "dense"
    assert (df.state == "complete").all()
    for col in ("accuracy", "macs", "params", "bytes", "latency_ms:fast-cpu", "latency_p10_ms:fast-cpu",
                "latency_p90_ms:fast-cpu", "latency_ratio:fast-cpu", "feasible", "plan"):
        assert col in df.columns, col
    assert df["accuracy"].between(0, 1).all()
    # the dense model is the largest; every candidate that pruned something has fewer MACs
    pruned = df[df.plan_summary != "dense"]
    assert (pruned.macs < dense.macs).all()
    # a plan is stored with every trial and parses
    for text in df.plan:
        PruningPlan.from_json(text)


def test_pareto_models_are_exported_and_onnx_matches_torch(run):
    d = run["dir"]
    front = pd.read_csv(d / "pareto.csv")
    assert not front.empty
    for t in front.trial:
        out = d / "models" / f"trial-{t}"
        assert {"model.onnx", "model.pt", "metrics.json"} <= {p.name for p in out.iterdir()}
        model = torch.load(out / "model.pt", weights_only=False).eval()
        x = torch.randn(1, 1, 8, 8)
        with torch.no_grad():
            expected = model(x).numpy()
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["trial"] == t and "latency_ms:fast-cpu" in metrics


def test_replayed_plan_gives_the_same_architecture(run):
    df = pd.read_csv(run["dir"] / "trials.csv")
    base = make_tiny_net()
    x = torch.randn(1, 1, 8, 8)
    for _, row in df.iterrows():
        plan = PruningPlan.from_json(row.plan)
        a = replay_plan(base, plan, x)
        b = replay_plan(base, plan, x)
        assert graph.channel_counts(a) == graph.channel_counts(b)
        exported = run["dir"] / "models" / f"trial-{row.trial}" / "model.pt"
        if exported.is_file():
            assert graph.channel_counts(a) == graph.channel_counts(torch.load(exported, weights_only=False))


def test_python_api_returns_dataframes(run):
    tables = load_results(run["dir"])
    assert set(tables) == {"trials", "pareto"}
    assert isinstance(tables["trials"], pd.DataFrame) and len(tables["trials"]) == 5


def test_export_cli_modes(run, tmp_path):
    d = run["dir"]
    front = pd.read_csv(d / "pareto.csv")
    t = int(front.trial.iloc[0])
    assert main(["export", "--run", str(d), "--trust-pickle", "--trial", str(t), "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / f"trial-{t}" / "model.onnx").is_file()
    assert main(["export", "--run", str(d), "--trust-pickle", "--pareto", "--out", str(tmp_path / "all")]) == 0
    assert len(list((tmp_path / "all").iterdir())) == len(front)
    assert main(["export", "--run", str(d), "--trust-pickle", "--best-under-ms", "1000", "--out", str(tmp_path / "best")]) == 0
    best = front.sort_values("accuracy", ascending=False).iloc[0]
    assert (tmp_path / "best" / f"trial-{int(best.trial)}").is_dir()
    # a trial that does not exist: one clear error, non-zero exit
    assert main(["export", "--run", str(d), "--trust-pickle", "--trial", "999"]) != 0


def test_rerun_with_the_same_study_resumes(run):
    d = run["dir"]
    before = pd.read_csv(d / "trials.csv")
    args = list(run["args"])
    args[args.index("--trials") + 1] = "7"
    assert main(args) == 0
    after = pd.read_csv(d / "trials.csv")
    assert len(after) == 7
    pd.testing.assert_series_equal(before.plan, after.plan.iloc[:5], check_names=False)
    assert (after.role == "dense").sum() == 1  # the dense trial is not enqueued again on resume


def test_failing_trial_is_recorded_and_the_search_goes_on(tmp_path, monkeypatch, space_file, profile_file):
    from hwprune import trial as trial_mod
    from hwprune.config import load_profile
    from hwprune.search import SearchConfig, run_search
    from hwprune.results import trials_frame
    from hwprune.workload import build_workload

    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    workload = build_workload(str(model_path), "digits", str(space_file), trust_pickle=True)
    calls = {"n": 0}
    real = trial_mod.recover

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated out-of-memory in fine-tuning")
        return real(*a, **k)

    monkeypatch.setattr(trial_mod, "recover", flaky)
    cfg = SearchConfig(out_dir=tmp_path / "run", trials=4, progress=False, sampler="random")
    study = run_search(workload, [load_profile(str(profile_file))], cfg, log=lambda m: None)
    df = trials_frame(study)
    assert len(df) == 4
    failed = df[df.state == "fail"]
    assert len(failed) == 1
    assert "simulated out-of-memory" in failed.iloc[0].reason
    assert (df.state == "complete").sum() == 3


def test_over_budget_trial_stops_before_training(tmp_path, space_file, profile_file):
    from hwprune.config import load_profile
    from hwprune.trial import LatencyMeter, run_trial
    from hwprune.workload import build_workload

    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    workload = build_workload(str(model_path), "digits", str(space_file), trust_pickle=True)
    meter = LatencyMeter([load_profile(str(profile_file))], workload.model, workload.input_shape, tmp_path, cache=False)
    outcome, _ = run_trial(workload, workload.uniform_plan(0.5), meter, tmp_path / "t", budget_ms=1e-6)
    assert not outcome.feasible and outcome.accuracy is None
    assert "exceeds the budget" in outcome.reason
    assert not (tmp_path / "t" / "state_dict.pt").exists()  # no training was spent on it
    outcome, _ = run_trial(workload, workload.uniform_plan(0.5), meter, tmp_path / "u", budget_ms=1e6)
    assert outcome.feasible and outcome.accuracy is not None


def test_latency_cache_measures_a_repeated_architecture_once(tmp_path, space_file, profile_file):
    from hwprune.config import load_profile
    from hwprune.trial import LatencyMeter
    from hwprune.plan import apply_plan
    from hwprune.workload import build_workload

    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    workload = build_workload(str(model_path), "digits", str(space_file), trust_pickle=True)
    meter = LatencyMeter([load_profile(str(profile_file))], workload.model, workload.input_shape, tmp_path)
    model, _, _ = apply_plan(workload.model, workload.uniform_plan(0.5), workload.example_input)
    first = meter.measure(model, tmp_path / "a")["fast-cpu"]
    misses = meter.cache.misses
    # the same architecture with different weights: served from the cache
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    second = meter.measure(model, tmp_path / "b")["fast-cpu"]
    assert meter.cache.misses == misses and second.raw.median_ms == first.raw.median_ms


def test_interrupt_keeps_finished_trials_and_writes_results(tmp_path, space_file, profile_file):
    """Ctrl-C (SIGINT) in the middle of a search: exit 130, every finished trial kept and written out."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "hwprune.cli", "search", "--model", str(model_path), "--trust-pickle", "--data", "digits",
           "--search-space", str(space_file), "--profile", str(profile_file), "--trials", "200",
           "--out", str(run_dir), "--no-progress", "--no-export"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    # A job started in the background by a non-interactive shell inherits SIGINT as ignored; restore the default
    # so that the child behaves as under a terminal's Ctrl-C.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300  # generous: a loaded 2-core CI machine is slow, and this is not a speed test
    finished = 0
    while time.time() < deadline and finished < 3:
        time.sleep(0.5)
        db = run_dir / "study.db"
        if db.is_file():
            try:
                with sqlite3.connect(db) as con:
                    finished = con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
            except sqlite3.OperationalError:
                pass
    assert finished >= 3, "the search did not finish 3 trials in time"
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("the search did not stop on SIGINT: " + err.decode()[-3000:])
    assert proc.returncode == 130, err.decode()[-2000:]
    df = pd.read_csv(run_dir / "trials.csv")
    assert (df.state == "complete").sum() >= finished
    assert b"interrupted" in err


def test_lut_screening_skips_candidates_predicted_over_budget(tmp_path, space_file, profile_file, monkeypatch):
    """With --lut, a candidate the table predicts far over the budget is recorded as screened: never measured,
    never trained. The table is stubbed so the test is about the search's use of it, not about timing."""
    from hwprune.config import load_profile
    from hwprune.latency import lut
    from hwprune.results import trials_frame
    from hwprune.search import SearchConfig, run_search
    from hwprune.workload import build_workload

    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    workload = build_workload(str(model_path), "digits", str(space_file), trust_pickle=True)

    class Table:
        entries, scale, overhead_ms = {"x": 1.0}, 1.0, 0.0

        @classmethod
        def load(cls, *a, **k):
            return cls()

    class Screen:
        def __init__(self, table, budget_ms, margin, reference_ms=None):
            self.budget_ms = budget_ms

        def should_measure_plan(self, plan):
            pruned = any(r > 0 for r in plan.ratios.values())
            return (not pruned, 1e6 if pruned else 0.0)  # every pruned plan predicted absurdly slow

        def reason(self, predicted):
            return f"predicted {predicted:g} ms > budget (not measured)"

    monkeypatch.setattr(lut, "LatencyTable", Table)
    monkeypatch.setattr(lut, "LutScreen", Screen)
    cfg = SearchConfig(out_dir=tmp_path / "run", trials=4, progress=False, sampler="random",
                       latency_budget_ms=1e5, lut_path=str(tmp_path / "unused.json"))
    study = run_search(workload, [load_profile(str(profile_file))], cfg, log=lambda m: None)
    df = trials_frame(study)
    screened = df[df.state == "screened"]
    assert len(screened) >= 1
    assert screened.accuracy.isna().all() and (screened.predicted_ms == 1e6).all()
    for t in screened.trial:
        assert not (tmp_path / "run" / "trials" / f"trial-{t}").exists()  # no ONNX, no training, nothing
    assert df[df.role == "dense"].iloc[0].state == "complete"


def test_lut_without_budget_is_a_clear_error(tmp_path, space_file, profile_file):
    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    rc = main(["search", "--model", str(model_path), "--trust-pickle", "--data", "digits", "--search-space", str(space_file),
               "--profile", str(profile_file), "--trials", "2", "--out", str(tmp_path / "run"), "--lut", "x.json",
               "--no-progress"])
    assert rc == 2


def test_prune_and_profile_commands(tmp_path, space_file, profile_file, capsys):
    """`hwprune prune` writes a trial's files for one uniform plan; `hwprune profile` reports latency, costs and
    ONNX Runtime's per-layer breakdown."""
    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_path), "--trust-pickle", "--data", "digits", "--search-space", str(space_file),
                 "--profile", str(profile_file), "--ratio", "0.5", "--out", str(out)]) == 0
    assert {"model.onnx", "model.pt", "metrics.json", "plan.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] is not None and metrics["macs"] < 329568  # the tiny net's dense MACs
    assert main(["prune", "--model", str(model_path), "--trust-pickle", "--ratio", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()  # rejected before any work
    capsys.readouterr()
    assert main(["profile", "--model", str(model_path), "--trust-pickle", "--input-shape", "1,8,8", "--profile", str(profile_file),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["profiles"]["fast-cpu"]
    assert report["macs"] == 329568 and entry["latency"]["median_ms"] > 0
    assert entry["layers"] and abs(sum(r["share"] for r in entry["layers"]) - 1.0) < 1e-6


def test_a_plan_that_builds_an_earlier_trials_model_is_a_repeat_and_does_not_count(tmp_path, profile_file):
    """0.75 and 0.875 of 16 channels both keep 8 when rounded to multiples of 8: the second plan builds the first
    one's model. It is recorded as a repeat of it (its values told to the sampler, nothing measured or trained
    again, kept off the front) and the search runs one more trial, so --trials counts distinct models."""
    from conftest import FAST_SPACE_YAML
    from hwprune.config import load_profile
    from hwprune.results import pareto_frame, trials_frame
    from hwprune.search import SearchConfig, objective_names, run_search
    from hwprune.storage import done_count
    from hwprune.workload import build_workload

    space = tmp_path / "space.yaml"
    space.write_text(FAST_SPACE_YAML.replace("ratios: [0.0, 0.5]", "ratios: [0.0, 0.75, 0.875]")
                     .replace("round_to: 4", "round_to: 8"))
    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    workload = build_workload(str(model_path), "digits", str(space), trust_pickle=True)
    a, b = (workload.apply(workload.uniform_plan(r))[1].realized_key() for r in (0.75, 0.875))
    assert a == b and a != workload.apply(workload.dense_plan())[1].realized_key()
    cfg = SearchConfig(out_dir=tmp_path / "run", trials=3, progress=False, sampler="random")
    study = run_search(workload, [load_profile(str(profile_file))], cfg, log=lambda m: None)
    df = trials_frame(study)
    first = df[df.plan_summary.str.contains("0.75")].trial.min()
    repeats = df[df.state == "repeat"]
    assert len(repeats) >= 1 and len(df) == 3 + len(repeats) and done_count(study, free_repeats=3) == 3
    trials = {t.number: t for t in study.trials}
    for n in repeats.trial:
        earlier = trials[n].user_attrs["same_as"]
        assert trials[n].values == trials[earlier].values and trials[earlier].user_attrs.get("same_as") is None
        assert not (tmp_path / "run" / "trials" / f"trial-{n}" / "state_dict.pt").exists()  # never trained
    assert first not in set(repeats.trial)  # the first trial of a model is the one that counts
    front = pareto_frame(df, [c.replace("macs_kept", "macs") for c in objective_names(workload, [], False)])
    assert not set(front.trial) & set(repeats.trial)


def test_max_drop_is_a_constraint_the_sampler_sees(tmp_path, space_file, profile_file):
    """--max-drop: every candidate carries (dense accuracy - max_drop - its accuracy) as a constraint, and the
    sampler stores it (Optuna's constraints attribute), so worse candidates count as infeasible for it."""
    import optuna

    from hwprune.config import load_profile
    from hwprune.errors import ConfigError
    from hwprune.search import SearchConfig, run_search
    from hwprune.workload import build_workload

    model_path = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model_path)
    workload = build_workload(str(model_path), "digits", str(space_file), trust_pickle=True)
    cfg = SearchConfig(out_dir=tmp_path / "run", trials=5, progress=False, sampler="tpe", max_drop=0.02)
    study = run_search(workload, [load_profile(str(profile_file))], cfg, log=lambda m: None)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    dense = next(t for t in done if t.user_attrs.get("role") == "dense")
    assert dense.user_attrs["constraint"] == [0.0]
    candidates = [t for t in done if t is not dense]
    assert len(candidates) == 4
    for t in candidates:
        expected = dense.values[0] - 0.02 - t.values[0]
        assert t.user_attrs["constraint"] == pytest.approx([expected])
        assert t.system_attrs["constraints"] == pytest.approx([expected])  # what the sampler ranks by
    assert study.user_attrs["max_drop"] == 0.02
    latency_only = build_workload(str(model_path), "none", str(space_file), trust_pickle=True, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="--max-drop 0.02 bounds the loss of the quality objective"):
        run_search(latency_only, [load_profile(str(profile_file))],
                   SearchConfig(out_dir=tmp_path / "lat", trials=2, progress=False, max_drop=0.02), log=lambda m: None)
