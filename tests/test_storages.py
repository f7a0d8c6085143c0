"""Several search workers on one study through Optuna's shared storages, against real servers.

PostgreSQL (RDB storage) and Redis (journal storage) run on the CI machine; on a laptop without them these tests
skip. The default storage stays a SQLite file in the run directory (covered by the end-to-end tests).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from conftest import FAST_PROFILE_YAML, FAST_SPACE_YAML, make_tiny_net

pytestmark = pytest.mark.slow

POSTGRES_URL = os.environ.get("HWPRUNE_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("HWPRUNE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _server_up(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _storage(url: str):
    from hwprune.search import SearchConfig, storage_url

    return storage_url(SearchConfig(out_dir=Path("."), storage=url))


def _two_workers(tmp_path: Path, url: str, study: str) -> pd.DataFrame:
    (tmp_path / "space.yaml").write_text(FAST_SPACE_YAML)
    (tmp_path / "fast-cpu.yaml").write_text(FAST_PROFILE_YAML)
    model = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model)
    cmd = [sys.executable, "-m", "hwprune.cli", "search", "--model", str(model), "--data", "digits",
           "--search-space", str(tmp_path / "space.yaml"), "--profile", str(tmp_path / "fast-cpu.yaml"),
           "--trials", "6", "--out", str(tmp_path / "run"), "--storage", url, "--study", study,
           "--sampler", "random", "--no-progress", "--no-export"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err.decode()[-2000:]
    storage = _storage(url)
    trials = optuna.load_study(study_name=study, storage=storage).trials
    rows = [{"number": t.number, "state": t.state.name, "worker": t.user_attrs.get("worker"),
             "role": t.user_attrs.get("role", "candidate")} for t in trials]
    optuna.delete_study(study_name=study, storage=storage)
    return pd.DataFrame(rows)


def _check(df: pd.DataFrame) -> None:
    # Both workers stop at the shared target; a trial or two may overshoot while the other worker is running.
    finished = df[df.state.isin(["COMPLETE", "FAIL"])]
    assert 6 <= len(finished) <= 8
    assert (df.state == "COMPLETE").sum() >= 6
    assert df.number.is_unique
    assert df.worker.nunique() == 2  # both processes ran trials of the one study


@pytest.mark.skipif(not _server_up("127.0.0.1", 5432), reason="no PostgreSQL server on 127.0.0.1:5432")
def test_two_workers_share_a_postgres_study(tmp_path):
    df = _two_workers(tmp_path, POSTGRES_URL, f"hwprune-test-{uuid.uuid4().hex[:8]}")
    _check(df)


@pytest.mark.skipif(not _server_up("127.0.0.1", 6379), reason="no Redis server on 127.0.0.1:6379")
def test_two_workers_share_a_redis_journal_study(tmp_path):
    df = _two_workers(tmp_path, REDIS_URL, f"hwprune-test-{uuid.uuid4().hex[:8]}")
    _check(df)
