"""Optuna storages shared by several workers: nothing lost, nothing duplicated.

- ``study_lock``: one lock per storage (a PostgreSQL/MySQL advisory lock, a Redis lock, a file lock beside a
  SQLite or journal file). Storage creation (Optuna's schema on a fresh database), the study's one-time setup
  (attributes, the dense baseline) and the claim of every trial run under it, so workers started at the same
  instant neither race on the schema nor enqueue two baselines nor overshoot the requested trial count.
- Heartbeats: Optuna's own heartbeat for RDB storages (SQLite default included), a heartbeat system attribute for
  journal storages (Redis, journal file) that have none. A RUNNING trial whose worker is known dead (same host,
  process gone) or whose heartbeat is older than the grace period is failed and queued again (``requeue``).
- ``done_count``: finished trials, a failed trial that was queued again counted once (through its retry), repeats
  of an earlier trial's model not counted (up to a limit).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import optuna
from optuna.trial import TrialState

HEARTBEAT_S = 5  # Optuna requires whole seconds
GRACE_S = 30  # a trial without a heartbeat for this long belongs to a dead worker
MAX_RETRIES = 3  # a trial that keeps killing its worker (e.g. out of memory) is not retried forever
RETRY_OF = "hwprune:retry_of"  # system attr of a retry: the number of the trial it replaces
BEAT = "hwprune:heartbeat"  # system attr of a RUNNING trial in a journal storage: last heartbeat (unix time)
WORKER = "worker"  # user attr: host:pid of the process running the trial
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def storage_url(url: Optional[str], out_dir: Path) -> str:
    """The URL as given, or the default SQLite file in the run directory."""
    return url or f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"


def _is_journal(url: str) -> bool:
    return url.startswith(("redis://", "rediss://")) or (url.endswith(".log") and "://" not in url)


def open_storage(url: str, heartbeat_s: Optional[int] = HEARTBEAT_S, grace_s: int = GRACE_S):
    """An Optuna storage object for ``url``: RDB with heartbeats (and ``requeue`` for stale trials), or a journal
    storage (Redis, or a ``.log`` journal file). Call it under ``study_lock`` when the database may be fresh."""
    # Heartbeats and the Redis journal are "experimental" in Optuna; both are documented.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if url.startswith(("redis://", "rediss://")):
            from optuna.storages.journal import JournalRedisBackend

            return optuna.storages.JournalStorage(JournalRedisBackend(url))
        if _is_journal(url):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url))
        if not heartbeat_s:
            return optuna.storages.RDBStorage(url)
        # Optuna 5 renamed failed_trial_callback to heartbeat_stale_trial_callback; accept both.
        params = inspect.signature(optuna.storages.RDBStorage).parameters
        key = "heartbeat_stale_trial_callback"
        key = key if key in params else "failed_trial_callback"
        return optuna.storages.RDBStorage(url, heartbeat_interval=int(heartbeat_s),
                                          grace_period=max(int(grace_s), 2 * int(heartbeat_s)), **{key: requeue})


# ------------------------------------------------------------------------------------------------------ locks

# A signed 64-bit advisory-lock key, one per database (Optuna's schema is per database, not per study).
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"hwprune-study-lock").digest()[:8], "big", signed=True)


@contextlib.contextmanager
def study_lock(url: str, timeout_s: float = 600.0) -> Iterator[None]:
    """Exclusive across every process sharing ``url`` (and every thread of this one)."""
    with _THREAD_LOCK:
        if url.startswith(("postgresql", "postgres")):
            with _sql_lock(url, "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"):
                yield
        elif url.startswith("mysql"):
            with _sql_lock(url, f"SELECT GET_LOCK('hwprune', {int(timeout_s)})", "SELECT RELEASE_LOCK('hwprune')"):
                yield
        elif url.startswith(("redis://", "rediss://")):
            import redis

            lock = redis.Redis.from_url(url).lock("hwprune:study-lock", timeout=timeout_s, blocking_timeout=timeout_s)
            if not lock.acquire():
                raise TimeoutError(f"could not take the study lock in {url} within {timeout_s:g} s")
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # expired while held: the next holder already owns it
                    lock.release()
        else:
            path = url.split(":///", 1)[1] if url.startswith("sqlite:///") else url
            with _file_lock(Path(path + ".lock")):
                yield


# user attribute of a trial that built the same model as an earlier trial (its number): a repeat, not a new point
SAME_AS = "same_as"
_THREAD_LOCK = threading.RLock()


@contextlib.contextmanager
def _sql_lock(url: str, take: str, give: str) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text(take), {"k": _LOCK_KEY} if ":k" in take else {})
            try:
                yield
            finally:
                con.execute(sqlalchemy.text(give), {"k": _LOCK_KEY} if ":k" in give else {})
    finally:
        engine.dispose()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------------------- dead workers

def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed trial of a dead worker again: same parameters and role, a fresh run (Optuna's
    RetryFailedTrialCallback, with a bounded retry count and our marker for ``done_count``)."""
    history = list(trial.system_attrs.get("hwprune:retry_history", [])) + [trial.number]
    if len(history) > MAX_RETRIES:
        return
    system = {k: v for k, v in trial.system_attrs.items() if k not in (BEAT,)}
    system.update({RETRY_OF: trial.number, "hwprune:retry_history": history})
    user = {k: v for k, v in trial.user_attrs.items() if k in ("role",)}
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions, user_attrs=user,
                                              system_attrs=system))


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(worker: Optional[str]) -> bool:
    """True when ``worker`` (host:pid) ran on this host and its process is gone."""
    if not worker or ":" not in worker:
        return False
    host, pid = worker.rsplit(":", 1)
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A zombie (killed, not yet reaped by its parent) still answers kill 0; it runs nothing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def fail_dead_trials(study: optuna.Study, grace_s: float = GRACE_S, log: Callable[[str], None] = lambda m: None) -> int:
    """Fail and queue again every RUNNING trial whose worker is dead: known dead on this host, or silent past the
    grace period (Optuna's heartbeat for RDB storages, our heartbeat attribute for journal storages). Call under
    ``study_lock`` so that two workers never queue the same trial twice. Returns the number of trials failed."""
    failed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        optuna.storages.fail_stale_trials(study)  # RDB: heartbeat older than the grace period -> FAIL + requeue
        failed += len({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before)
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.system_attrs.get(BEAT)
        stale = beat is not None and now - float(beat) > grace_s
        if not (_dead_here(t.user_attrs.get(WORKER)) or stale):
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        requeue(study, study.get_trials(deepcopy=False)[t.number])
        failed += 1
    if failed:
        log(f"{failed} trial(s) of dead workers failed and queued again")
    return failed


def done_count(study: optuna.Study, free_repeats: int = 0) -> int:
    """Finished trials, where a failed trial that was queued again counts through its retry only, and where up to
    ``free_repeats`` trials that built the same model as an earlier one (user attribute ``same_as``: nothing was
    measured or trained) do not count, so the sampler gets that many more tries at new models."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get(RETRY_OF) for t in trials} - {None}
    finished = [t for t in trials if t.state in FINISHED and t.number not in retried]
    repeats = sum(t.user_attrs.get(SAME_AS) is not None for t in finished)
    return len(finished) - min(repeats, free_repeats)


class Heartbeat:
    """Beats for one RUNNING trial from a daemon thread until stopped: Optuna's record_heartbeat on RDB storages,
    a system attribute on journal storages."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval_s: float = HEARTBEAT_S):
        storage = study._storage  # noqa: SLF001 (Optuna exposes the heartbeat only on the storage object)
        trial_id = trial._trial_id  # noqa: SLF001
        if isinstance(storage, optuna.storages.RDBStorage):
            self._beat = (lambda: storage.record_heartbeat(trial_id)) if storage.heartbeat_interval else None
        else:
            self._beat = lambda: storage.set_trial_system_attr(trial_id, BEAT, time.time())
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self._beat is not None:
            self._beat()
            self._thread = threading.Thread(target=self._run, daemon=True, name="hwprune-heartbeat")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):  # a missed beat is harmless; the next one follows
                self._beat()

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return False
