"""The remote latency agent: a small HTTP server that runs on the target device (a Raspberry Pi, a Jetson, a GPU
box) and measures ONNX models there with ONNX Runtime, for searches running elsewhere.

    hwprune agent --host 127.0.0.1 --port 8765 --token SECRET [--max-model-mb 200] [--cache-dir DIR]
    python -m hwprune.latency.agent ...   (same)

It imports only onnxruntime, numpy, the standard library and the torch-free parts of hwprune.latency, so the device
needs no PyTorch.

Protocol (JSON over HTTP; every request carries ``Authorization: Bearer <token>``):
  GET  /health              -> {"ok", "protocol", "fingerprint", "providers", "max_model_bytes"}
  GET  /models/<sha256>     -> 200 {"have": true} | 404 {"have": false}
  PUT  /models/<sha256>     ONNX bytes; stored content-addressed after checking hash and that ONNX Runtime
                            can load it -> 201 {"stored": sha} (200 {"have": true} when already stored)
  POST /fingerprint         {"options", "batch_size"} -> {"fingerprint"} of the ORT backend with those options
  POST /measure             {"model", "reference"?, "input_shape" | "inputs" (input spec) + "batch_size",
                             "settings", "options"}
                            -> {"stats"} or, with a reference, {"pair"} (interleaved), plus {"fingerprint"}
Errors: {"error": one line, "kind": error class}. Measurements (and model checks) hold one lock, so they never
overlap on the device.

Limits (a device agent must stay up whatever clients send): the token is checked from the headers before any body
is read (a wrong token gets 401 and the connection is closed unread); bodies over the JSON or model limit get 413
unread; at most ``--max-connections`` requests are served at once (more get 503 at once); at most ``--max-queue``
measurements wait for the device, each at most ``--max-wait-s`` (then 503 "busy", which clients retry with
backoff); measure settings are validated against the same limits as a profile's ``measure:`` section; a client
that stalls mid-request is cut off after ``--request-timeout-s``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import socket
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from hwprune.errors import BackendUnavailable, ConfigError, HwpruneError, ModelError
from hwprune.inputs import InputSpec
from hwprune.latency.base import DeviceProfile, MeasureSettings
from hwprune.latency.measure import environment_fingerprint
from hwprune.latency.onnxruntime_backend import OPTIONS as ORT_OPTIONS
from hwprune.latency.onnxruntime_backend import OnnxRuntimeBackend

PROTOCOL = 1
DEFAULT_PORT = 8765
TOKEN_ENV = "HWPRUNE_AGENT_TOKEN"
MAX_JSON_BYTES = 1 << 20
MAX_INPUT_ELEMENTS = 1 << 26
# A refused body is read and dropped (so the client sees our answer, not a reset) only up to these sizes: little
# for a client without the token, more for an authorized one whose upload is over the limit.
MAX_DRAIN_BYTES = 1 << 16
MAX_DRAIN_AUTHORIZED_BYTES = 64 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MODEL_PATH_RE = re.compile(r"^/models/([0-9a-f]{64})$")
FORWARDED_OPTIONS = tuple(o for o in ORT_OPTIONS)


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "HwpruneError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class AgentState:
    """What the handlers share: the token, the model store, the device lock and backends by options."""

    def __init__(
        self,
        token: str,
        cache_dir: str,
        max_model_bytes: int,
        max_measure_s: float = 120.0,
        max_queue: int = 8,
        max_wait_s: float = 300.0,
    ):
        if not token:
            raise ConfigError(f"the agent needs a token: pass --token T or set {TOKEN_ENV}")
        self.token = token.encode()
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_model_bytes = int(max_model_bytes)
        self.max_measure_s = float(max_measure_s)
        self.device_lock = threading.Lock()
        self.max_queue = int(max_queue)
        self.max_wait_s = float(max_wait_s)
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._backends: Dict[str, OnnxRuntimeBackend] = {}
        self._backends_lock = threading.Lock()

    @contextlib.contextmanager
    def device(self):
        """The device, one request at a time; a bounded queue waits for it, the rest get 503 busy at once."""
        with self._waiting_lock:
            if self._waiting >= self.max_queue:
                raise HttpError(503, f"agent busy: {self._waiting} requests already wait for the device (limit "
                                     f"{self.max_queue}); retry later", "busy")
            self._waiting += 1
        try:
            acquired = self.device_lock.acquire(timeout=self.max_wait_s)
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        if not acquired:
            raise HttpError(503, f"agent busy: the device stayed in use for {self.max_wait_s:g} s; retry later", "busy")
        try:
            yield
        finally:
            self.device_lock.release()

    def authorized(self, header: Optional[str]) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self.token)

    def model_path(self, sha: str) -> Path:
        if not _SHA_RE.match(sha):  # never build a path from anything but 64 hex digits
            raise HttpError(400, f"model id {sha[:80]!r} is not a sha256 hex digest", "ModelError")
        return self.cache_dir / f"{sha}.onnx"

    def backend(self, options: Dict[str, Any], batch_size: int, settings: MeasureSettings) -> OnnxRuntimeBackend:
        if not isinstance(options, dict):
            raise HttpError(400, f"options must be a JSON object, got {type(options).__name__}", "ConfigError")
        unknown = [k for k in options if k not in FORWARDED_OPTIONS]
        if unknown:
            raise HttpError(
                400, f"unknown agent option(s) {unknown}; valid: {', '.join(FORWARDED_OPTIONS)}", "ConfigError"
            )
        key = json.dumps([options, batch_size, settings.__dict__], sort_keys=True, default=str)
        with self._backends_lock:
            b = self._backends.get(key)
            if b is None:
                prof = DeviceProfile(
                    name="agent", backend="onnxruntime", batch_size=batch_size, options=dict(options), measure=settings
                )
                b = OnnxRuntimeBackend(prof)  # ConfigError / BackendUnavailable are reported to the client
                if len(self._backends) > 16:
                    self._backends.clear()
                self._backends[key] = b
            return b

    def check_model(self, data: bytes) -> None:
        """ONNX Runtime must be able to load the bytes (garbage and truncated files are refused)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 4
        try:
            ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise HttpError(400, f"upload is not an ONNX model ONNX Runtime can load: {first}", "ModelError") from e


def _json_error_kind(e: BaseException) -> str:
    return type(e).__name__ if isinstance(e, HwpruneError) else "HwpruneError"


class Handler(BaseHTTPRequestHandler):
    server_version = "hwprune-agent/1"
    protocol_version = "HTTP/1.1"
    timeout = 60.0  # socket timeout per request (reads of headers and bodies); set from --request-timeout-s
    state: AgentState  # set on the subclass made by make_server
    verbose = False

    # -- plumbing ------------------------------------------------------------------------------------------------

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet unless --verbose
        if self.verbose:
            sys.stderr.write("hwprune agent: %s - %s\n" % (self.address_string(), fmt % args))

    def _send(self, status: int, payload: Dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _content_length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HttpError(411, "Content-Length header required", "HwpruneError")
        try:
            n = int(raw)
        except ValueError:
            raise HttpError(400, f"bad Content-Length {raw[:40]!r}", "HwpruneError") from None
        if n < 0:
            raise HttpError(400, f"bad Content-Length {n}", "HwpruneError")
        return n

    def _drain(self, n: int, limit: int = MAX_DRAIN_AUTHORIZED_BYTES) -> None:
        """Read and discard a body we refuse, so the client gets our answer instead of a reset connection; a body
        over ``limit`` is not read at all (the connection is closed after the answer)."""
        self.close_connection = True
        if n > limit:
            return
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 20))
                if not chunk:
                    break
                n -= len(chunk)
        except OSError:
            pass

    def _read_body(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise HttpError(400, f"body ended after {len(data)} of {n} bytes", "HwpruneError")
        return data

    def _read_json(self) -> Dict[str, Any]:
        n = self._content_length()
        if n > MAX_JSON_BYTES:
            self._drain(n)
            raise HttpError(413, f"JSON body of {n} bytes exceeds {MAX_JSON_BYTES}", "HwpruneError")
        try:
            obj = json.loads(self._read_body(n) or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"body is not valid JSON: {e}", "HwpruneError") from None
        if not isinstance(obj, dict):
            raise HttpError(400, "body must be a JSON object", "HwpruneError")
        return obj

    def _dispatch(self, fn) -> None:
        try:
            if not self.state.authorized(self.headers.get("Authorization")):  # before any body byte is read
                n = self.headers.get("Content-Length")
                self._drain(int(n) if n and n.isdigit() else MAX_DRAIN_BYTES + 1, limit=MAX_DRAIN_BYTES)
                raise HttpError(401, "missing or wrong token", "BackendUnavailable")
            fn()
        except HttpError as e:
            self._send(e.status, {"error": e.message, "kind": e.kind})
        except (ConfigError, ModelError, BackendUnavailable) as e:
            self._send(400, {"error": str(e), "kind": _json_error_kind(e)})
        except (socket.timeout, TimeoutError):
            self.close_connection = True
            try:
                self._send(408, {"error": "request timed out while reading", "kind": "HwpruneError"})
            except OSError:
                pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # the agent keeps serving whatever a request does
            self.close_connection = True
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            try:
                self._send(500, {"error": f"agent error: {type(e).__name__}: {msg}", "kind": "HwpruneError"})
            except OSError:
                pass

    # -- routes --------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_PUT(self) -> None:
        self._dispatch(self._put)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _get(self) -> None:
        if self.path == "/health":
            import onnxruntime as ort

            self._send(
                200,
                {
                    "ok": True,
                    "protocol": PROTOCOL,
                    "fingerprint": environment_fingerprint(onnxruntime=ort.__version__),
                    "providers": ort.get_available_providers(),
                    "max_model_bytes": self.state.max_model_bytes,
                    "busy": self.state.device_lock.locked(),
                },
            )
            return
        m = _MODEL_PATH_RE.match(self.path)
        if m:
            have = self.state.model_path(m.group(1)).is_file()
            self._send(200 if have else 404, {"have": have})
            return
        raise HttpError(404, f"no such endpoint {self.path[:80]!r}", "HwpruneError")

    def _put(self) -> None:
        m = _MODEL_PATH_RE.match(self.path)
        if not m:
            n = self.headers.get("Content-Length")
            if n and n.isdigit():
                self._drain(int(n))
            raise HttpError(404, f"upload to /models/<sha256>, not {self.path[:80]!r}", "ModelError")
        sha = m.group(1)
        n = self._content_length()
        if n > self.state.max_model_bytes:
            self._drain(n)
            raise HttpError(
                413,
                f"model of {n} bytes exceeds the agent's limit of {self.state.max_model_bytes} bytes; restart the "
                f"agent with a larger --max-model-mb",
                "ModelError",
            )
        if n == 0:
            raise HttpError(400, "empty upload", "ModelError")
        data = self._read_body(n)
        got = hashlib.sha256(data).hexdigest()
        if not hmac.compare_digest(got, sha):
            raise HttpError(400, f"upload hash mismatch: content is {got}, path says {sha}", "ModelError")
        dest = self.state.model_path(sha)
        if dest.is_file():
            self._send(200, {"have": True, "stored": sha})
            return
        with self.state.device():  # loading a model uses the device too
            self.state.check_model(data)
        fd, tmp = tempfile.mkstemp(dir=str(self.state.cache_dir), suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._send(201, {"stored": sha})

    def _post(self) -> None:
        if self.path not in ("/measure", "/fingerprint"):
            n = self.headers.get("Content-Length")
            if n and n.isdigit():
                self._drain(int(n))
            raise HttpError(404, f"no such endpoint {self.path[:80]!r}", "HwpruneError")
        req = self._read_json()
        if self.path == "/fingerprint":
            batch = req.get("batch_size", 1)
            if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
                raise HttpError(400, f"batch_size must be a positive integer, got {batch!r}", "ConfigError")
            b = self.state.backend(req.get("options") or {}, batch, MeasureSettings())
            self._send(200, {"fingerprint": b.fingerprint()})
            return
        if req.get("inputs") is not None:  # named inputs (token ids, masks): batch given beside them
            shape, batch = _check_spec(req.get("inputs"), req.get("batch_size", 1))
        else:
            shape = _check_shape(req.get("input_shape"))
            batch = shape[0]
        settings = self._settings(req.get("settings"))
        b = self.state.backend(req.get("options") or {}, batch, settings)
        model = self._stored(req.get("model"))
        ref = req.get("reference")
        with self.state.device():
            if ref is None:
                stats = b.measure_onnx(str(model), shape)
                out: Dict[str, Any] = {"stats": stats.to_dict(with_samples=True)}
            else:
                pair = b.measure_onnx_pair(str(model), str(self._stored(ref)), shape)
                out = {"pair": pair.to_dict(with_samples=True)}
        out["fingerprint"] = b.fingerprint()
        self._send(200, out)

    def _stored(self, sha: Any) -> Path:
        if not isinstance(sha, str):
            raise HttpError(400, f"model must be a sha256 string, got {sha!r}"[:200], "ModelError")
        p = self.state.model_path(sha)
        if not p.is_file():
            raise HttpError(404, f"model {sha} is not on the agent; upload it first", "missing_model")
        return p

    def _settings(self, d: Any) -> MeasureSettings:
        if d is not None and not isinstance(d, dict):
            raise HttpError(400, "settings must be a JSON object", "ConfigError")
        from hwprune.config import parse_measure_settings  # the limits of a profile's measure: section

        try:
            s = parse_measure_settings("settings", d)
        except ConfigError as e:
            raise HttpError(400, f"bad measure settings: {e}", "ConfigError") from None
        if s.time_cap_s > self.state.max_measure_s:
            raise HttpError(400, f"settings.time_cap_s {s.time_cap_s:g} is above the agent's --max-measure-s "
                                 f"{self.state.max_measure_s:g}", "ConfigError")
        return s


def _check_shape(shape: Any) -> Tuple[int, ...]:
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise HttpError(400, f"input_shape must be a list of 1-8 positive integers, got {shape!r}"[:200], "ModelError")
    n = 1
    for d in shape:
        n *= d
    if n > MAX_INPUT_ELEMENTS:
        raise HttpError(400, f"input_shape {shape} has {n} elements, over the agent's {MAX_INPUT_ELEMENTS}", "ModelError")
    return tuple(shape)


def _check_spec(d: Any, batch: Any) -> Tuple[Any, int]:
    """An input spec from a request (see hwprune/inputs.py) and its batch size, within the agent's limits."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise HttpError(400, f"batch_size must be a positive integer, got {batch!r}"[:200], "ConfigError")
    if not isinstance(d, dict) or not isinstance(d.get("fields"), list) or not 1 <= len(d["fields"]) <= 16:
        raise HttpError(400, "inputs must be an input spec with 1-16 fields", "ModelError")
    try:
        spec = InputSpec.from_dict(d)
    except HwpruneError as e:
        raise HttpError(400, str(e)[:200], "ModelError") from None
    n = sum(math.prod(s) for s in spec.shapes(batch).values())
    if n > MAX_INPUT_ELEMENTS:
        raise HttpError(400, f"inputs have {n} elements, over the agent's {MAX_INPUT_ELEMENTS}", "ModelError")
    return spec, batch


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, state: AgentState, max_connections: int = 16):
        host = addr[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)
        self.state = state
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        """A thread per connection, at most ``max_connections`` at once; one more is answered 503 and closed."""
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"error": "agent busy: too many connections; retry later", "kind": "busy"}).encode()
            with contextlib.suppress(OSError):
                # Take what the client already sent (briefly: this is the accept loop), so that closing does not
                # reset the connection before the client reads the answer.
                request.settimeout(0.1)
                request.recv(MAX_DRAIN_BYTES)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str = "",
    cache_dir: Optional[str] = None,
    max_model_mb: float = 200.0,
    request_timeout_s: float = 60.0,
    max_measure_s: float = 120.0,
    allow_remote: bool = False,
    verbose: bool = False,
    max_connections: int = 16,
    max_queue: int = 8,
    max_wait_s: float = 300.0,
) -> AgentServer:
    """A ready (bound, not yet serving) agent. ``port=0`` picks a free port; see ``server.url``. Serve with
    ``server.serve_forever()`` (e.g. in a thread) and stop with ``server.shutdown()``."""
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(
            f"agent host {host!r} is not a loopback address; the token travels unencrypted over HTTP, so binding "
            f"to a network interface needs --allow-remote (use only on a trusted network or behind an SSH tunnel)"
        )
    for flag, value, low in (("--max-model-mb", max_model_mb, 1e-9), ("--request-timeout-s", request_timeout_s, 1e-3),
                             ("--max-measure-s", max_measure_s, 1e-3), ("--max-connections", max_connections, 1),
                             ("--max-queue", max_queue, 1), ("--max-wait-s", max_wait_s, 1e-3)):
        if not value >= low or value == float("inf"):  # also NaN
            raise ConfigError(f"{flag} must be a positive finite number, got {value}")
    state = AgentState(
        token=token,
        cache_dir=cache_dir or os.path.join(Path.home(), ".cache", "hwprune", "agent-models"),
        max_model_bytes=int(max_model_mb * 1024 * 1024),
        max_measure_s=max_measure_s,
        max_queue=max_queue,
        max_wait_s=max_wait_s,
    )
    handler = type("BoundHandler", (Handler,), {"state": state, "timeout": request_timeout_s, "verbose": verbose})
    try:
        return AgentServer((host, port), handler, state, max_connections=int(max_connections))
    except OSError as e:
        raise ConfigError(f"agent cannot listen on {host}:{port}: {e.strerror}; pick another --port or host") from e


def build_parser() -> argparse.ArgumentParser:
    from hwprune.config import arg_number

    p = argparse.ArgumentParser(
        prog="hwprune agent",
        description="Serve latency measurements of ONNX models on this device to hwprune searches elsewhere.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=arg_number(int, 0, 65535), default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--token", default=None, help=f"shared secret clients must send (default: ${TOKEN_ENV})")
    p.add_argument("--max-model-mb", type=arg_number(float, 0, low_open=True), default=200.0,
                   help="largest accepted model upload (default 200)")
    p.add_argument("--cache-dir", default=None,
                   help="where uploaded models are kept (default ~/.cache/hwprune/agent-models)")
    p.add_argument("--request-timeout-s", type=arg_number(float, 0, low_open=True), default=60.0,
                   help="socket timeout per request (default 60)")
    p.add_argument("--max-measure-s", type=arg_number(float, 0, low_open=True), default=120.0,
                   help="largest time_cap_s a client may ask for")
    p.add_argument("--max-connections", type=arg_number(int, 1), default=16,
                   help="requests served at once; more get 503 (default 16)")
    p.add_argument("--max-queue", type=arg_number(int, 1), default=8,
                   help="requests waiting for the device; more get 503 (default 8)")
    p.add_argument("--max-wait-s", type=arg_number(float, 0, low_open=True), default=300.0,
                   help="longest wait for the device before a 503 busy answer (default 300)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback address (prints a warning)")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    try:
        server = make_server(
            host=args.host,
            port=args.port,
            token=token,
            cache_dir=args.cache_dir,
            max_model_mb=args.max_model_mb,
            request_timeout_s=args.request_timeout_s,
            max_measure_s=args.max_measure_s,
            allow_remote=args.allow_remote,
            verbose=args.verbose,
            max_connections=args.max_connections,
            max_queue=args.max_queue,
            max_wait_s=args.max_wait_s,
        )
    except HwpruneError as e:
        print(f"hwprune agent: error: {e}", file=sys.stderr)
        return e.exit_code
    if not is_loopback(args.host):
        print(
            f"hwprune agent: WARNING: listening on {args.host}, reachable from the network; requests and the token "
            f"are unencrypted HTTP. Use only on a trusted network, or bind 127.0.0.1 and use an SSH tunnel.",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"hwprune agent: serving on {server.url} (models in {server.state.cache_dir}, max model "
        f"{args.max_model_mb:g} MB); stop with Ctrl-C",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
