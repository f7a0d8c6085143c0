"""Dead workers on other hosts: their trials are found by heartbeat alone (Optuna's on RDB storages, ours on journal
storages), failed, queued again once, and counted once."""
from __future__ import annotations

import time

import optuna
import pytest

from hwprune import storage as shared

DIST = optuna.distributions.CategoricalDistribution([0.0, 0.5])


def _running_elsewhere(study: optuna.Study, beat: bool) -> optuna.Trial:
    trial = study.ask({"ratio:a": DIST})
    trial.set_user_attr(shared.WORKER, "another-host:4242")  # not this host: only the heartbeat can tell
    if beat:
        shared.Heartbeat(study, trial, interval_s=3600).__enter__()  # one beat, then silence (a dead worker)
    return trial


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_silent_trial_of_another_host_is_failed_and_queued_once(tmp_path, kind):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if kind == "sqlite" else str(tmp_path / "journal.log")
    storage = shared.open_storage(url, heartbeat_s=1, grace_s=2)
    study = optuna.create_study(storage=storage, study_name="s")
    done = study.ask({"ratio:a": DIST})
    study.tell(done, 1.0)
    lost = _running_elsewhere(study, beat=True)
    assert shared.fail_dead_trials(study, grace_s=2) == 0  # within the grace period it is alive
    time.sleep(2.5)
    assert shared.fail_dead_trials(study, grace_s=2) == 1
    assert shared.fail_dead_trials(study, grace_s=2) == 0  # never queued twice
    trials = study.get_trials(deepcopy=False)
    assert trials[lost.number].state == optuna.trial.TrialState.FAIL
    retry = trials[-1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == lost.params
    assert retry.system_attrs[shared.RETRY_OF] == lost.number
    assert shared.done_count(study) == 1  # the failed one counts through its retry, which has not run yet
    rerun = study.ask({"ratio:a": DIST})
    assert rerun.number == retry.number
    study.tell(rerun, 2.0)
    assert shared.done_count(study) == 2


def test_retries_are_bounded(tmp_path):
    storage = shared.open_storage(str(tmp_path / "journal.log"))
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask({"ratio:a": DIST})
    frozen = study.tell(trial, state=optuna.trial.TrialState.FAIL)
    for _ in range(shared.MAX_RETRIES + 2):
        shared.requeue(study, frozen)
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if not waiting:
            break
        frozen = study.tell(study.ask({"ratio:a": DIST}), state=optuna.trial.TrialState.FAIL)
    assert len(study.get_trials(deepcopy=False)) == 1 + shared.MAX_RETRIES
