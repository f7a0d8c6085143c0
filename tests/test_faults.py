"""Faults a long search meets: SIGTERM, a worker killed while it held the dense baseline, a write cut short."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from conftest import FAST_PROFILE_YAML, FAST_SPACE_YAML, make_tiny_net
from hwprune.atomic import atomic_path, write_text

ROOT = Path(__file__).resolve().parent.parent


def _cmd(tmp_path: Path, trials: int) -> list:
    (tmp_path / "space.yaml").write_text(FAST_SPACE_YAML)
    (tmp_path / "fast-cpu.yaml").write_text(FAST_PROFILE_YAML)
    torch.save(make_tiny_net(), tmp_path / "tiny.pt")
    return ["search", "--model", str(tmp_path / "tiny.pt"), "--trust-pickle", "--data", "digits",
            "--search-space", str(tmp_path / "space.yaml"), "--profile", str(tmp_path / "fast-cpu.yaml"),
            "--trials", str(trials), "--out", str(tmp_path / "run"), "--sampler", "random", "--no-progress"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _trials(tmp_path: Path):
    study = optuna.load_study(study_name="hwprune", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    return study.get_trials(deepcopy=False)


def _complete(trials) -> int:
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = write_text(tmp_path / "trials.csv", "a,b\n1,2\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("a,b\n3")  # half written when the writer dies
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "a,b\n1,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]  # no temporary file left behind


@pytest.mark.slow
def test_sigterm_finishes_the_running_trial_writes_complete_files_and_exits_143(tmp_path):
    cmd = [sys.executable, "-m", "hwprune.cli", *_cmd(tmp_path, 200)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        try:
            if _complete(_trials(tmp_path)) >= 2:
                break
        except Exception:  # noqa: BLE001 (the study does not exist yet)
            pass
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 143, err.decode()[-2000:]
    assert b"resume" in err
    trials = _trials(tmp_path)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]  # the running trial finished
    df = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert (df.state == "complete").sum() == _complete(trials) >= 2
    assert (tmp_path / "run" / "pareto.png").stat().st_size > 0
    assert not list((tmp_path / "run").rglob(".*.tmp-*"))
    # resume finishes exactly the requested count
    resumed = subprocess.run([*cmd[:cmd.index("--trials") + 1], str(_complete(trials) + 2),
                              *cmd[cmd.index("--trials") + 2:], "--no-export"], capture_output=True, env=_env(),
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert _complete(_trials(tmp_path)) == _complete(trials) + 2


@pytest.mark.slow
def test_a_dense_baseline_lost_with_its_worker_is_run_again(tmp_path):
    """The worker holding trial 0 (the dense baseline) dies by SIGKILL: the resume fails that trial, runs the
    baseline again (once) and completes the requested count."""
    args = _cmd(tmp_path, 3)
    die = ("import os, signal, sys\nimport hwprune.search as s\n"
           "def killed(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
           "s.run_trial = killed\nfrom hwprune.cli import main\nsys.exit(main(%r))" % (args,))
    proc = subprocess.run([sys.executable, "-c", die], capture_output=True, env=_env(), timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    lost = [t for t in _trials(tmp_path) if t.state != optuna.trial.TrialState.WAITING]  # warm-start plans wait
    assert [(t.number, t.state, t.user_attrs.get("role")) for t in lost] == \
        [(0, optuna.trial.TrialState.RUNNING, "dense")]
    resumed = subprocess.run([sys.executable, "-m", "hwprune.cli", *args], capture_output=True, env=_env(),
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    trials = _trials(tmp_path)
    dense = [t for t in trials if t.user_attrs.get("role") == "dense"]
    assert [t.state for t in dense] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert dense[1].system_attrs.get("hwprune:retry_of") == 0
    assert _complete(trials) == 3
    df = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert "speedup:fast-cpu" in df.columns  # the reference exists again


@pytest.mark.slow
def test_study_keeps_its_files_as_content(tmp_path, factory_module, capsys):
    """The search space and profiles live in the study: an edited space is refused on resume (unless overridden),
    and export works after the original files are gone."""
    from hwprune.cli import main

    space, profile = tmp_path / "space.yaml", tmp_path / "fast-cpu.yaml"
    space.write_text(FAST_SPACE_YAML)
    profile.write_text(FAST_PROFILE_YAML)
    args = ["search", "--model", f"{factory_module}:tiny", "--data", "digits", "--search-space", str(space),
            "--profile", str(profile), "--out", str(tmp_path / "run"), "--sampler", "random", "--no-progress",
            "--no-export"]
    assert main([*args, "--trials", "2"]) == 0
    space.write_text(FAST_SPACE_YAML.replace("ratios: [0.0, 0.5]", "ratios: [0.0, 0.25]"))
    capsys.readouterr()
    assert main([*args, "--trials", "3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("hwprune: error: search space")
    assert "changed since the study was created" in err[0] and "--allow-changed-config" in err[0]
    assert main([*args, "--trials", "3", "--allow-changed-config"]) == 0
    space.unlink()
    profile.unlink()
    assert main(["export", "--run", str(tmp_path / "run"), "--trial", "0", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "trial-0" / "model.onnx").is_file()


def test_an_unreadable_results_file_is_reported_in_one_line(tmp_path):
    from hwprune.errors import RunError
    from hwprune.results import load_results

    (tmp_path / "trials.csv").write_bytes(b"\xff\xfe\x00garbage\x00" * 10)
    (tmp_path / "pareto.csv").write_text("")
    with pytest.raises(RunError, match="rerun the same hwprune search command"):
        load_results(tmp_path)
