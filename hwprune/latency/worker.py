"""One ONNX model in its own process: the way a deployed model runs, and the way hwprune times it.

A deployed model owns its process: its ONNX Runtime session has its own intra-op thread pool, spinning on, all the
threads the profile gives it. Two sessions in ONE process each keep such a pool, and the idle session's threads
fight the running one for the cores: on 2 cores the dense demo model ran 3.8-4.1 ms beside a candidate but
1.8-1.9 ms alone, and pair ratios were off by up to 3x (issue 7). So every model a measurement compares runs in a
process of its own (:class:`ModelProcess`), and the coordinator asks one process at a time for a block of timed
calls while the other waits, blocked on its pipe, its threads idle. The same worker, started fresh for one model
and stopped after one measurement, is the ground truth that ``hwprune verify`` compares against
(:func:`time_alone`).

Protocol: JSON lines on stdin/stdout.
  {"op": "load", "profile": {...}, "onnx": PATH, "shape": [...]}   -> {"ok": true, "fingerprint": {...}}
  {"op": "block", "calls": K, "untimed": U}                         -> {"ok": true, "ms": [K floats]}
  {"op": "measure", "settings": {...}}                              -> {"ok": true, "stats": {...}}
  {"op": "quit"}
Errors: {"ok": false, "error": one line, "kind": error class name}.

Torch-free (imports onnxruntime, numpy and the standard library), so it starts in well under a second.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from hwprune import errors
from hwprune.errors import HwpruneError, ModelError
import numpy as np

from hwprune.latency.base import DeviceProfile, LatencyStats, MeasureSettings, PairedLatency
from hwprune.latency.measure import measure, measure_interleaved, settings_from_dict, settings_to_dict

__all__ = ["ModelProcess", "measure_pair_in_processes", "time_alone", "serve"]

_START_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------------------------------------------
# The worker side


def _reply(out, payload: Dict[str, Any]) -> None:
    out.write(json.dumps(payload) + "\n")
    out.flush()


def serve(stdin=None, stdout=None) -> int:
    """Serve requests until ``quit`` or end of input. One model per process: a second ``load`` is an error."""
    from hwprune.latency.onnxruntime_backend import OnnxRuntimeBackend

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    run = None
    for line in stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "quit":
                _reply(stdout, {"ok": True})
                return 0
            if op == "load":
                if run is not None:
                    raise ModelError("this worker already holds a model; start one process per model")
                backend = OnnxRuntimeBackend(DeviceProfile.from_dict(req["profile"]))
                run = backend.checked_runner(str(req["onnx"]), [int(d) for d in req["shape"]])
                _reply(stdout, {"ok": True, "fingerprint": backend.fingerprint(), "pid": os.getpid()})
            elif op in ("block", "measure"):
                if run is None:
                    raise ModelError("no model loaded; send 'load' first")
                if op == "block":
                    for _ in range(int(req.get("untimed", 0))):
                        run()
                    ms: List[float] = []
                    for _ in range(int(req["calls"])):
                        t0 = time.perf_counter()
                        run()
                        ms.append((time.perf_counter() - t0) * 1000.0)
                    _reply(stdout, {"ok": True, "ms": ms})
                else:
                    stats = measure(run, settings_from_dict(req.get("settings")))
                    _reply(stdout, {"ok": True, "stats": stats.to_dict(with_samples=True)})
            else:
                raise ModelError(f"unknown worker request {op!r}")
        except HwpruneError as e:
            _reply(stdout, {"ok": False, "error": str(e), "kind": type(e).__name__})
        except Exception as e:  # keep serving: the coordinator turns this into a ModelError
            _reply(stdout, {"ok": False, "error": f"{type(e).__name__}: {e}", "kind": "ModelError"})
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The coordinator side


class ModelProcess:
    """A worker process holding one ONNX model with one profile's settings.

    ``block(calls, untimed)`` runs ``untimed`` calls and then times ``calls`` calls, returning their latencies in
    ms; ``measure(settings)`` runs the full stopping rule of :func:`hwprune.latency.measure.measure` in the worker.
    Use as a context manager, or call ``close()``.
    """

    def __init__(self, profile: DeviceProfile, onnx_path: str, input_shape: Sequence[int],
                 python: Optional[str] = None):
        if profile.backend != "onnxruntime":
            raise ModelError(f"profile {profile.name!r}: process workers run ONNX Runtime profiles, not "
                             f"{profile.backend!r}")
        env = dict(os.environ)
        # the worker imports this very hwprune, wherever it was imported from (an editable install, PYTHONPATH)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.onnx_path = str(onnx_path)
        self._proc = subprocess.Popen(
            [python or sys.executable, "-m", "hwprune.latency.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env,
        )
        try:
            reply = self._call({"op": "load", "profile": profile.to_dict(), "onnx": self.onnx_path,
                                "shape": [int(d) for d in input_shape]})
        except BaseException:
            self.close()
            raise
        self.fingerprint: Dict[str, Any] = reply["fingerprint"]
        self.pid: int = reply["pid"]

    def _call(self, req: Dict[str, Any]) -> Dict[str, Any]:
        proc = self._proc
        try:
            proc.stdin.write(json.dumps(req) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            err = ""
            try:
                proc.wait(timeout=5)
                err = (proc.stderr.read() or "").strip().splitlines()
                err = err[-1] if err else ""
            except Exception:
                pass
            raise ModelError(f"the latency worker for {os.path.basename(self.onnx_path)} died "
                             f"(exit {proc.poll()}){': ' + err if err else ''}")
        reply = json.loads(line)
        if not reply.get("ok"):
            kind = getattr(errors, str(reply.get("kind")), ModelError)
            if not (isinstance(kind, type) and issubclass(kind, HwpruneError)):
                kind = ModelError
            raise kind(reply.get("error", "latency worker failed"))
        return reply

    def alive(self) -> bool:
        return self._proc.poll() is None

    def block(self, calls: int, untimed: int = 0) -> List[float]:
        return [float(x) for x in self._call({"op": "block", "calls": int(calls), "untimed": int(untimed)})["ms"]]

    def measure(self, settings: MeasureSettings) -> LatencyStats:
        reply = self._call({"op": "measure", "settings": settings_to_dict(settings)})
        return LatencyStats.from_dict(reply["stats"])

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
                proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                f.close()
            except Exception:
                pass

    def __enter__(self) -> "ModelProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_pair_in_processes(candidate: ModelProcess, reference: ModelProcess,
                              settings: MeasureSettings) -> PairedLatency:
    """Candidate and reference, each in its own process, timed alternately in the same window.

    Each sample is the median of ``interleave_block`` calls timed inside one worker after one untimed call (which
    absorbs the switch: the other process's threads winding down, caches refilled); the other worker waits,
    blocked on its pipe. The stopping rule and the pair statistics are those of ``measure_interleaved``.
    """
    block = max(1, int(settings.interleave_block))
    candidate.block(settings.warmup)
    reference.block(settings.warmup)

    def sampler(proc: ModelProcess):
        return lambda: float(np.median(proc.block(block, untimed=1)))

    inner = dataclasses.replace(settings, warmup=0, interleave_block=1)
    return measure_interleaved(sampler(candidate), sampler(reference), inner, returns_ms=True)


def time_alone(profile: DeviceProfile, onnx_path: str, input_shape: Sequence[int],
               settings: Optional[MeasureSettings] = None) -> LatencyStats:
    """Ground truth: the model timed alone in a fresh process with the profile's settings (then the process
    ends). Nothing else of hwprune's runs in that process."""
    with ModelProcess(profile, onnx_path, input_shape) as proc:
        return proc.measure(settings or profile.measure)


if __name__ == "__main__":
    sys.exit(serve())
