"""Latency cache: a measured architecture is measured once per device profile, across trials, workers and resumes.

Keys combine the model's identity (sha256 of the ONNX bytes, or an architecture hash the caller passes), a hash of
the backend's fingerprint (device + software + options) and the input shape; interleaved pairs add the reference's
identity. Entries live in one SQLite file in the run directory (WAL mode, busy timeout), which is safe when several
worker processes on one machine read and write it at the same time. Keep it on a local disk, not NFS.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from hwprune.latency.base import (
    LatencyBackend,
    LatencyStats,
    ModelArtifact,
    frozen_inputs,
    PairedLatency,
    measure_candidate,
    measure_candidate_pair,
)
from hwprune.latency.measure import fingerprint_hash
from hwprune.inputs import inputs_key

Entry = Union[LatencyStats, PairedLatency]

def _corrupt(e: Exception) -> bool:
    return any(m in str(e) for m in ("not a database", "malformed", "corrupt"))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS latency (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
)
"""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_architecture_hash(path: str) -> str:
    """sha256 of an ONNX graph with the values of floating-point initializers left out (their names, shapes and
    types kept; integer initializers such as Reshape targets kept whole). Two exports of the same pruned
    architecture with different weights share it. Do not use it where weight values change the latency
    (e.g. sparse kernels on a backend that exploits zeros): use ``file_sha256`` there."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    for init in model.graph.initializer:
        if init.data_type in floating:
            for fld in ("raw_data", "float_data", "double_data", "int32_data"):
                init.ClearField(fld)
            del init.external_data[:]
    model.ClearField("doc_string")
    model.ClearField("producer_version")
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def cache_key(
    model_hash: str,
    fingerprint: Dict[str, Any],
    input_shape: Sequence[int],
    reference_hash: Optional[str] = None,
    settings: Optional[Dict[str, Any]] = None,
) -> str:
    """The cache key of one measurement. Pass ``settings`` (the profile's measure settings) wherever they can
    change what is measured (isolation, interleaving): a number is reused only for the same method."""
    parts = {
        "model": model_hash,
        "device": fingerprint_hash(fingerprint),
        "shape": inputs_key(input_shape),
    }
    if reference_hash is not None:
        parts["reference"] = reference_hash
    if settings:
        parts["settings"] = settings
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class LatencyCache:
    """``LatencyCache(run_dir / "latency_cache.sqlite")``; ``get(key)`` -> LatencyStats | PairedLatency | None,
    ``put(key, value, meta=None)``. Counts ``hits`` and ``misses`` of ``get``."""

    def __init__(self, path: Union[str, Path], timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.hits = 0
        self.misses = 0
        self._local = threading.local()
        try:
            self._retrying(self._create)
        except sqlite3.DatabaseError as e:  # a corrupt cache is rebuilt, never fatal
            if not _corrupt(e):
                raise
            self._set_aside(e)
            self._retrying(self._create)

    def _create(self) -> None:
        con = self._connect()
        con.execute(_SCHEMA)
        con.execute("SELECT COUNT(*) FROM latency").fetchone()  # reads the file: a damaged one fails here

    def _set_aside(self, error: Exception) -> None:
        """Move a corrupt cache file (and its WAL/SHM files) aside so that a fresh one is built in its place."""
        self.close()
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.replace(Path(str(aside) + suffix))
        warnings.warn(f"latency cache {self.path} is unreadable ({error}); moved to {aside.name}, rebuilding it",
                      RuntimeWarning, stacklevel=3)

    def _retrying(self, fn):
        """Run ``fn``, retrying while another process holds a lock SQLite does not wait for by itself (switching
        to WAL and creating the table take locks that bypass the busy timeout when workers start together)."""
        deadline = time.monotonic() + self.timeout_s
        delay = 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _connect(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
            self._retrying(lambda: con.execute("PRAGMA journal_mode=WAL"))
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

    def get(self, key: str) -> Optional[Entry]:
        row = self._connect().execute("SELECT kind, value FROM latency WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        kind, value = row
        d = json.loads(value)
        return PairedLatency.from_dict(d) if kind == "pair" else LatencyStats.from_dict(d)

    def put(self, key: str, value: Entry, meta: Optional[Dict[str, Any]] = None) -> None:
        kind = "pair" if isinstance(value, PairedLatency) else "stats"
        row = (key, kind, json.dumps(value.to_dict(with_samples=True)), json.dumps(meta or {}, default=str), time.time())
        self._retrying(lambda: self._connect().execute(
            "INSERT OR REPLACE INTO latency (key, kind, value, meta, created) VALUES (?, ?, ?, ?, ?)", row))

    def __contains__(self, key: str) -> bool:
        return self._connect().execute("SELECT 1 FROM latency WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM latency").fetchone()[0])

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def _model_hash(backend: LatencyBackend, onnx_path: Optional[str], module: Any, input_shape: Sequence[int],
                given: Optional[str]) -> str:
    if given:
        return given
    return backend.identity(ModelArtifact(onnx_path, module, frozen_inputs(input_shape)))


def cached_measure(
    cache: Optional[LatencyCache],
    backend: LatencyBackend,
    onnx_path: Optional[str],
    module: Any,
    input_shape: Sequence[int],
    model_hash: Optional[str] = None,
    settings: Optional[Dict[str, Any]] = None,
) -> LatencyStats:
    """Latency from the cache, or measured (with ``measure_candidate``) and stored. ``model_hash`` defaults to the
    sha256 of the ONNX file (ONNX backends) or ``architecture_hash(module)`` (the torch backend); pass
    ``onnx_architecture_hash(path)`` to share entries between exports with different weights."""
    if cache is None:
        return measure_candidate(backend, onnx_path, module, input_shape)  # type: ignore[arg-type]
    mh = _model_hash(backend, onnx_path, module, input_shape, model_hash)
    key = cache_key(mh, backend.fingerprint(), input_shape, settings=settings)
    hit = cache.get(key)
    if isinstance(hit, LatencyStats):
        return hit
    stats = measure_candidate(backend, onnx_path, module, input_shape)  # type: ignore[arg-type]
    cache.put(key, stats, {"model": mh, "backend": backend.name, "shape": inputs_key(input_shape)})
    return stats


def cached_measure_pair(
    cache: Optional[LatencyCache],
    backend: LatencyBackend,
    onnx_path: Optional[str],
    module: Any,
    reference_onnx_path: Optional[str],
    reference_module: Any,
    input_shape: Sequence[int],
    model_hash: Optional[str] = None,
    reference_hash: Optional[str] = None,
    settings: Optional[Dict[str, Any]] = None,
) -> PairedLatency:
    """Like ``cached_measure`` for a candidate measured interleaved with the reference (dense) model."""
    def measure() -> PairedLatency:
        return measure_candidate_pair(
            backend, onnx_path, module, reference_onnx_path, reference_module, input_shape  # type: ignore[arg-type]
        )

    if cache is None:
        return measure()
    mh = _model_hash(backend, onnx_path, module, input_shape, model_hash)
    rh = _model_hash(backend, reference_onnx_path, reference_module, input_shape, reference_hash)
    key = cache_key(mh, backend.fingerprint(), input_shape, reference_hash=rh, settings=settings)
    hit = cache.get(key)
    if isinstance(hit, PairedLatency):
        return hit
    pair = measure()
    cache.put(key, pair, {"model": mh, "reference": rh, "backend": backend.name, "shape": inputs_key(input_shape)})
    return pair
