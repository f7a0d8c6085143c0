"""One ONNX model in its own process: the way a deployed model runs, and the way hwprune times it.

A deployed model owns its process: its ONNX Runtime session has its own intra-op thread pool, spinning on, all the
threads the profile gives it. Timing a candidate and the dense model alternately breaks that in two ways, both
measured on the demo model with 2 threads on 2 cores (issue 7): in ONE process, the two sessions' pools compete
(dense 2.2x slower beside a candidate than alone); and even in two processes, ONNX Runtime's idle workers keep
spinning for tens of milliseconds after each run (about 2^20 spin iterations), taking a core from the model timed
next (again 2.2x). So each model runs in a process of its own (:class:`ModelProcess`), and while one is timed the
other is frozen with SIGSTOP: a stopped process cannot spin. Then the dense model times 0.98-0.99x its solo
median inside the pair and ratios agree with solo timing within 1-3% (``scripts/bench_latency_methods.py``). The
same worker, started fresh for one model and stopped after one measurement, is the ground truth that ``hwprune
verify`` compares against (:func:`time_alone`).

Protocol: JSON lines on stdin/stdout.
  {"op": "load", "profile": {...}, "onnx": PATH, "shape": [...] | "inputs": spec}   -> {"ok": true, "fingerprint": {...}}
  {"op": "block", "calls": K, "untimed": U, "warm_ms": W}          -> {"ok": true, "ms": [K floats]}
  {"op": "measure", "settings": {...}}                              -> {"ok": true, "stats": {...}}
  {"op": "quit"}
Errors: {"ok": false, "error": one line, "kind": error class name}.

Torch-free (imports onnxruntime, numpy and the standard library), so it starts in well under a second.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from hwprune import errors
from hwprune.errors import HwpruneError, ModelError
from hwprune.inputs import inputs_from_wire, inputs_to_wire
import numpy as np

from hwprune.latency.base import DeviceProfile, LatencyStats, MeasureSettings, PairedLatency
from hwprune.latency.measure import measure, measure_interleaved, settings_from_dict, settings_to_dict, warm_up

__all__ = ["ModelProcess", "measure_pair_in_processes", "time_alone", "serve"]

_SIGSTOP = getattr(signal, "SIGSTOP", None)
_SIGCONT = getattr(signal, "SIGCONT", None)


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
                run = backend.checked_runner(str(req["onnx"]), inputs_from_wire(req))
                _reply(stdout, {"ok": True, "fingerprint": backend.fingerprint(), "pid": os.getpid()})
            elif op in ("block", "measure"):
                if run is None:
                    raise ModelError("no model loaded; send 'load' first")
                if op == "block":
                    warm_up(run, int(req.get("untimed", 0)), float(req.get("warm_ms", 0.0)) / 1000.0)
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

    ``block(calls, untimed, warm_ms)`` runs ``untimed`` calls (and more, untimed, until ``warm_ms`` have passed)
    and then times ``calls`` calls, returning their latencies in ms; ``measure(settings)`` runs the full stopping
    rule of :func:`hwprune.latency.measure.measure` in the worker.
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
        self._paused = False
        self._proc = subprocess.Popen(
            [python or sys.executable, "-m", "hwprune.latency.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env,
        )
        try:
            reply = self._call({"op": "load", "profile": profile.to_dict(), "onnx": self.onnx_path,
                                **inputs_to_wire(input_shape)})
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

    def pause(self) -> None:
        """Freeze the worker (SIGSTOP) while another model is timed: an idle ONNX Runtime session's intra-op
        threads keep spinning for tens of milliseconds after each run, and on a machine whose every core the
        running model uses, a spinning neighbour halves its speed. A stopped process cannot spin. No-op where
        the OS has no SIGSTOP (Windows)."""
        if _SIGSTOP is not None and not self._paused and self.alive():
            os.kill(self._proc.pid, _SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            os.kill(self._proc.pid, _SIGCONT)
            self._paused = False

    def block(self, calls: int, untimed: int = 0, warm_ms: float = 0.0) -> List[float]:
        self.resume()
        reply = self._call({"op": "block", "calls": int(calls), "untimed": int(untimed), "warm_ms": float(warm_ms)})
        return [float(x) for x in reply["ms"]]

    def measure(self, settings: MeasureSettings) -> LatencyStats:
        self.resume()
        reply = self._call({"op": "measure", "settings": settings_to_dict(settings)})
        return LatencyStats.from_dict(reply["stats"])

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            self.resume()
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

    Each sample is the median of ``interleave_block`` calls timed inside one worker after untimed calls lasting
    ``switch_warmup_ms`` (at least one: they absorb the switch, caches refilled, threads woken); the other worker
    is frozen (SIGSTOP) meanwhile, so its spinning threads cannot steal a core. The stopping rule and the pair
    statistics are those of ``measure_interleaved``.
    """
    block = max(1, int(settings.interleave_block))
    reference.pause()
    candidate.block(settings.warmup)
    candidate.pause()
    reference.block(settings.warmup)

    def sampler(proc: ModelProcess, other: ModelProcess):
        def sample() -> float:
            other.pause()  # its threads may still spin from its last run: freeze them
            return float(np.median(proc.block(block, untimed=1, warm_ms=settings.switch_warmup_ms)))

        return sample

    inner = dataclasses.replace(settings, warmup=0, interleave_block=1)
    try:
        return measure_interleaved(sampler(candidate, reference), sampler(reference, candidate), inner,
                                   returns_ms=True)
    finally:
        candidate.resume()
        reference.resume()


def time_alone(profile: DeviceProfile, onnx_path: str, input_shape: Sequence[int],
               settings: Optional[MeasureSettings] = None) -> LatencyStats:
    """Ground truth: the model timed alone in a fresh process with the profile's settings (then the process
    ends). Nothing else of hwprune's runs in that process."""
    with ModelProcess(profile, onnx_path, input_shape) as proc:
        return proc.measure(settings or profile.measure)


if __name__ == "__main__":
    sys.exit(serve())
