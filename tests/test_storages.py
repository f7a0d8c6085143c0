"""Several search workers on one study through Optuna's shared storages, against real servers.

Every PostgreSQL test creates its own uniquely named database (a fresh one: Optuna's schema does not exist yet,
which is when two workers starting together used to race) and drops it afterwards; Redis tests use their own study
name. On a machine without the servers these tests skip. The default SQLite storage is covered here too.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch

from conftest import FAST_PROFILE_YAML, FAST_SPACE_YAML, make_tiny_net

pytestmark = pytest.mark.slow

PG_ADMIN = os.environ.get("HWPRUNE_TEST_POSTGRES_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("HWPRUNE_TEST_REDIS", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parent.parent


def _server_up(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


needs_pg = pytest.mark.skipif(not _server_up("127.0.0.1", 5432), reason="no PostgreSQL server on 127.0.0.1:5432")
needs_redis = pytest.mark.skipif(not _server_up("127.0.0.1", 6379), reason="no Redis server on 127.0.0.1:6379")


@pytest.fixture
def fresh_pg_url():
    """The SQLAlchemy URL of a brand-new PostgreSQL database, dropped after the test."""
    import psycopg2

    name = f"hwprune_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(PG_ADMIN)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1)
    yield f"{base}/{name}"
    admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def _search_cmd(tmp_path: Path, trials: int, extra=()) -> list:
    (tmp_path / "space.yaml").write_text(FAST_SPACE_YAML)
    (tmp_path / "fast-cpu.yaml").write_text(FAST_PROFILE_YAML)
    model = tmp_path / "tiny.pt"
    if not model.exists():
        torch.save(make_tiny_net(), model)
    return [sys.executable, "-m", "hwprune.cli", "search", "--model", str(model), "--trust-pickle", "--data", "digits",
            "--search-space", str(tmp_path / "space.yaml"), "--profile", str(tmp_path / "fast-cpu.yaml"),
            "--trials", str(trials), "--out", str(tmp_path / "run"), "--sampler", "random", "--no-progress",
            "--no-export", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _start_together(cmd, n: int):
    """``n`` workers released at the same instant (each waits for a go file before importing anything heavy)."""
    go = Path(cmd[cmd.index("--out") + 1]).parent / f"go-{uuid.uuid4().hex[:6]}"
    wait = f"import os,sys,time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.001)\n" \
           f"sys.argv={cmd[2:]!r}\nfrom hwprune.cli import main\nsys.exit(main(sys.argv[1:]))"
    workers = [subprocess.Popen([sys.executable, "-c", wait], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=_env()) for _ in range(n)]
    time.sleep(1.0)
    go.touch()
    return workers


def _finish(workers, timeout=400):
    errs = []
    for w in workers:
        out, err = w.communicate(timeout=timeout)
        errs.append(err.decode())
        assert w.returncode == 0, f"worker exit {w.returncode}: " + err.decode()[-2500:]
    return errs


def _trials(storage, study: str):
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def _check_exact(trials, n: int) -> None:
    """n completed trials, repeats of an earlier trial's model (which do not count) aside."""
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "same_as" not in t.user_attrs]
    assert len(complete) == n, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    dense = [t for t in trials if t.user_attrs.get("role") == "dense"]
    assert len(dense) == 1 and dense[0].state == optuna.trial.TrialState.COMPLETE


@needs_pg
def test_two_workers_on_a_fresh_postgres_database(tmp_path, fresh_pg_url):
    """Two workers released together on a database without Optuna's schema: both exit 0, one dense baseline,
    exactly the requested number of trials."""
    study = "s"
    _finish(_start_together(_search_cmd(tmp_path, 6, ["--storage", fresh_pg_url, "--study", study]), 2))
    _check_exact(_trials(fresh_pg_url, study), 6)


@needs_pg
def test_three_workers_on_a_fresh_postgres_database(tmp_path, fresh_pg_url):
    _finish(_start_together(_search_cmd(tmp_path, 5, ["--storage", fresh_pg_url, "--study", "s"]), 3))
    trials = _trials(fresh_pg_url, "s")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE and "same_as" not in t.user_attrs for t in trials) == 5
    assert sum(t.user_attrs.get("role") == "dense" for t in trials) == 1


@needs_redis
def test_two_workers_share_a_redis_journal_study(tmp_path):
    from hwprune.storage import open_storage

    study = f"hwprune-test-{uuid.uuid4().hex[:8]}"
    _finish(_start_together(_search_cmd(tmp_path, 6, ["--storage", REDIS_URL, "--study", study]), 2))
    storage = open_storage(REDIS_URL)
    try:
        _check_exact(_trials(storage, study), 6)
    finally:
        optuna.delete_study(study_name=study, storage=storage)


def test_two_workers_share_the_default_sqlite_study(tmp_path):
    _finish(_start_together(_search_cmd(tmp_path, 5), 2))
    _check_exact(_trials(f"sqlite:///{tmp_path / 'run' / 'study.db'}", "hwprune"), 5)


def _wait_complete(storage, study, n, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        try:
            trials = _trials(storage, study)
        except Exception:  # noqa: BLE001 (the study may not exist yet)
            continue
        if sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= n and \
                any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
            return
    raise AssertionError("the worker did not reach a running trial in time")


@pytest.mark.parametrize("where", ["sqlite", pytest.param("postgres", marks=needs_pg)])
def test_a_killed_workers_trial_is_run_again_and_resume_completes_the_count(tmp_path, where, request):
    """SIGKILL a worker in the middle of a trial: its trial stays RUNNING in the storage. A resume fails it as a
    dead worker's trial, runs it again (same parameters) and finishes exactly the requested number of trials."""
    url = request.getfixturevalue("fresh_pg_url") if where == "postgres" else \
        f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    cmd = _search_cmd(tmp_path, 5, ["--storage", url, "--study", "k"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    _wait_complete(url, "k", 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _trials(url, "k")
    stranded = [t for t in before if t.state == optuna.trial.TrialState.RUNNING]
    assert len(stranded) == 1
    resumed = subprocess.run(cmd, capture_output=True, env=_env(), timeout=400)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2500:]
    after = _trials(url, "k")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE and "same_as" not in t.user_attrs for t in after) == 5
    assert not [t for t in after if t.state == optuna.trial.TrialState.RUNNING]
    lost = after[stranded[0].number]
    assert lost.state == optuna.trial.TrialState.FAIL
    retry = [t for t in after if t.system_attrs.get("hwprune:retry_of") == lost.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    # the same parameters (a worker killed while suggesting them leaves some unset: the retry samples those)
    assert lost.params.items() <= retry[0].params.items()
    assert sum(t.user_attrs.get("role") == "dense" and t.state == optuna.trial.TrialState.COMPLETE
               for t in after) == 1
