"""The ``remote`` backend: measures on a device that runs ``hwprune agent`` (see agent.py), over HTTP.

Options (profile ``options``):
  url          agent address, e.g. http://192.168.1.20:8765 (required)
  token        shared secret, or
  token_env    name of the environment variable that holds it (preferred: keeps secrets out of YAML files)
  timeout_s    socket timeout of control requests (default 30)
  measure_timeout_s  socket timeout of a measurement request, which may wait for the device lock (default 900)
  retries      extra tries after a connection error, with exponential backoff (default 3)
  backoff_s    first backoff delay (default 0.5 s, doubling)
  provider, provider_options, device_id, threads, intra_op_threads, inter_op_threads, graph_optimization_level,
  execution_mode, io_binding, cpu_fallback: forwarded to ONNX Runtime on the agent.

Models are uploaded content-addressed (sha256) once; the agent keeps them on disk. Several agents can serve one
search: one profile (and so one client) per agent. Standard library only.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Optional, Sequence, Set

from hwprune.errors import BackendUnavailable, ConfigError, HwpruneError, ModelError
from hwprune.inputs import InputSpec
from hwprune.latency.cache import file_sha256
from hwprune.latency.onnxruntime_backend import OPTIONS as ORT_OPTIONS
from hwprune.latency.base import (
    DeviceProfile,
    LatencyStats,
    OnnxFileBackend,
    PairedLatency,
    batched_shape,
    check_options,
    register_backend,
)

AGENT_OPTIONS = ORT_OPTIONS  # forwarded to the agent, which runs ONNX Runtime on the device
CLIENT_OPTIONS = ("url", "token", "token_env", "timeout_s", "measure_timeout_s", "retries", "backoff_s")
OPTIONS = CLIENT_OPTIONS + AGENT_OPTIONS
_ERROR_KINDS = {"ConfigError": ConfigError, "ModelError": ModelError, "BackendUnavailable": BackendUnavailable}
_RETRY_STATUS = (502, 503, 504)


class AgentClient:
    """Talks to one agent. Connection errors are retried with exponential backoff; a wrong token or an agent that
    stays unreachable raises a one-line BackendUnavailable."""

    def __init__(
        self,
        url: str,
        token: str,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        measure_timeout_s: float = 900.0,
        token_hint: str = "the token the agent was started with",
        sleep: Callable[[float], None] = time.sleep,
    ):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"agent url {url!r} is not valid; use http://HOST:PORT, e.g. http://127.0.0.1:8765")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = float(timeout_s)
        self.measure_timeout_s = float(measure_timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.token_hint = token_hint
        self._sleep = sleep
        self._known: Set[str] = set()  # models this client knows the agent has
        self._health: Optional[Dict[str, Any]] = None

    # -- transport -----------------------------------------------------------------------------------------------

    def _start_hint(self) -> str:
        u = urllib.parse.urlparse(self.url)
        return f"start it with `hwprune agent --host {u.hostname} --port {u.port or 80} --token ...` on the device"

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        content_type: str = "application/json",
        timeout_s: Optional[float] = None,
        ok: Sequence[int] = (200, 201),
    ) -> tuple:
        """(status, parsed JSON). Raises BackendUnavailable / ConfigError / ModelError with one-line messages."""
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers["Content-Type"] = content_type
        tries = self.retries + 1
        last: Optional[BaseException] = None
        for attempt in range(tries):
            if attempt:
                self._sleep(self.backoff_s * (2 ** (attempt - 1)))
            req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                    return resp.status, _parse(resp.read())
            except urllib.error.HTTPError as e:
                payload = _parse(e.read())
                if e.code in ok:
                    return e.code, payload
                if e.code == 401 or e.code == 403:
                    raise BackendUnavailable(
                        f"agent at {self.url} rejected the token (HTTP {e.code}); use {self.token_hint}"
                    ) from None
                if e.code in _RETRY_STATUS:
                    last = e
                    continue
                msg = payload.get("error") or f"HTTP {e.code}"
                kind = payload.get("kind", "")
                if kind == "missing_model":
                    raise _MissingModel(msg)
                cls = _ERROR_KINDS.get(kind, BackendUnavailable if e.code >= 500 else ModelError)
                raise cls(f"agent at {self.url}: {msg}") from None
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, socket.timeout, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (socket.timeout, TimeoutError)) and path == "/measure":
                    raise BackendUnavailable(
                        f"agent at {self.url} did not answer a measurement within {timeout_s or self.timeout_s:g} s; "
                        f"raise measure_timeout_s or lower measure.time_cap_s"
                    ) from None
                last = e
                continue
        reason = getattr(last, "reason", last)
        detail = f"{type(reason).__name__}: {reason}" if reason is not None else "no answer"
        raise BackendUnavailable(
            f"agent at {self.url} unreachable after {tries} tries: {detail}; {self._start_hint()}"
        )

    # -- API -----------------------------------------------------------------------------------------------------

    def health(self, refresh: bool = False) -> Dict[str, Any]:
        if self._health is None or refresh:
            _, self._health = self.request("GET", "/health")
        return self._health

    def has_model(self, sha: str) -> bool:
        status, _ = self.request("GET", f"/models/{sha}", ok=(200, 404))
        return status == 200

    def upload(self, data: bytes, sha: Optional[str] = None) -> str:
        sha = sha or hashlib.sha256(data).hexdigest()
        limit = self.health().get("max_model_bytes")
        if isinstance(limit, int) and len(data) > limit:
            raise ModelError(
                f"model of {len(data)} bytes exceeds the limit of agent at {self.url} ({limit} bytes); restart the "
                f"agent with a larger --max-model-mb"
            )
        self.request("PUT", f"/models/{sha}", body=data, content_type="application/octet-stream",
                     timeout_s=max(self.timeout_s, 120.0))
        self._known.add(sha)
        return sha

    def ensure_model(self, onnx_path: str) -> str:
        """The model's sha256; uploaded only if the agent does not have it yet."""
        sha = file_sha256(onnx_path)
        if sha in self._known:
            return sha
        if self.has_model(sha):
            self._known.add(sha)
            return sha
        with open(onnx_path, "rb") as f:
            return self.upload(f.read(), sha)

    def fingerprint(self, options: Dict[str, Any], batch_size: int) -> Dict[str, Any]:
        body = json.dumps({"options": options, "batch_size": batch_size}).encode()
        return self.request("POST", "/fingerprint", body=body)[1]["fingerprint"]

    def measure(
        self,
        model_sha: str,
        input_shape: Sequence[int],
        settings: Dict[str, Any],
        options: Dict[str, Any],
        reference_sha: Optional[str] = None,
    ) -> Dict[str, Any]:
        body = json.dumps(
            {
                "model": model_sha,
                "reference": reference_sha,
                **_inputs_body(input_shape),
                "settings": settings,
                "options": options,
            }
        ).encode()
        timeout = max(self.measure_timeout_s, 4 * float(settings.get("time_cap_s", 5.0)) + 30.0)
        return self.request("POST", "/measure", body=body, timeout_s=timeout)[1]


def _inputs_body(inputs: Any) -> Dict[str, Any]:
    """A plain (batched) shape as ``input_shape``, as agents always took it; named inputs as their spec and batch."""
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], InputSpec):
        return {"inputs": inputs[0].to_dict(), "batch_size": int(inputs[1])}
    return {"input_shape": [int(d) for d in inputs]}


class _MissingModel(HwpruneError):
    """The agent lost a model this client thought it had (e.g. its cache was cleared): upload again."""


def _parse(raw: bytes) -> Dict[str, Any]:
    try:
        obj = json.loads(raw or b"{}")
    except ValueError:
        return {"error": raw[:200].decode("utf-8", "replace")}
    return obj if isinstance(obj, dict) else {"error": str(obj)[:200]}


class RemoteBackend(OnnxFileBackend):
    name = "remote"

    def __init__(self, profile: DeviceProfile):
        check_options(profile, OPTIONS)
        self.profile = profile
        url = profile.option("url")
        if not url or not isinstance(url, str):
            raise ConfigError(
                f"device profile {profile.name!r}: the remote backend needs option url (e.g. http://HOST:8765)"
            )
        token, env = profile.option("token"), profile.option("token_env")
        if token is not None and env is not None:
            raise ConfigError(f"device profile {profile.name!r}: give option token or token_env, not both")
        if env is not None:
            token = os.environ.get(str(env))
            if not token:
                raise BackendUnavailable(
                    f"device profile {profile.name!r}: environment variable {env} (option token_env) is not set; "
                    f"export {env}=<the agent's token>"
                )
            hint = f"the agent's token in ${env}"
        elif token:
            hint = "the agent's token in option token"
        else:
            raise ConfigError(
                f"device profile {profile.name!r}: the remote backend needs option token_env (or token) naming the "
                f"agent's shared secret"
            )

        def num(key: str, default: float, minimum: float) -> float:
            v = profile.option(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < minimum:
                raise ConfigError(f"device profile {profile.name!r}: option {key} must be a number >= {minimum}, got {v!r}")
            return float(v)

        self.agent_options = {k: v for k, v in profile.options.items() if k in AGENT_OPTIONS}
        self.client = AgentClient(
            url,
            str(token),
            timeout_s=num("timeout_s", 30.0, 0.01),
            retries=int(num("retries", 3, 0)),
            backoff_s=num("backoff_s", 0.5, 0.0),
            measure_timeout_s=num("measure_timeout_s", 900.0, 1.0),
            token_hint=hint,
        )
        self._fingerprint: Optional[Dict[str, Any]] = None

    def _settings(self) -> Dict[str, Any]:
        return dict(self.profile.measure.__dict__)

    def fingerprint(self) -> Dict[str, Any]:
        """The agent's device and ONNX Runtime fingerprint with this profile's options (contacts the agent once;
        also checks that the agent has the provider)."""
        if self._fingerprint is None:
            self._fingerprint = self.client.fingerprint(self.agent_options, self.profile.batch_size)
        return self._fingerprint

    def _measure(self, paths: Sequence[str], input_shape: Sequence[int]) -> Dict[str, Any]:
        if isinstance(input_shape, InputSpec):
            shape: Any = (input_shape, self.profile.batch_size)
        else:
            shape = batched_shape(self.profile, input_shape)
        for attempt in range(2):
            shas = [self.client.ensure_model(p) for p in paths]
            try:
                out = self.client.measure(
                    shas[0], shape, self._settings(), self.agent_options, shas[1] if len(shas) > 1 else None
                )
                break
            except _MissingModel:
                if attempt:
                    raise BackendUnavailable(f"agent at {self.client.url} keeps losing uploaded models; check its --cache-dir") from None
                self.client._known.difference_update(shas)
        if "fingerprint" in out:
            self._fingerprint = out["fingerprint"]
        return out

    def measure_onnx(self, onnx_path: str, input_shape: Sequence[int]) -> LatencyStats:
        return LatencyStats.from_dict(self._measure([onnx_path], input_shape)["stats"])

    def measure_onnx_pair(self, candidate_path: str, reference_path: str, input_shape: Sequence[int]) -> PairedLatency:
        """Candidate and reference measured interleaved on the device, in one request."""
        return PairedLatency.from_dict(self._measure([candidate_path, reference_path], input_shape)["pair"])


@register_backend("remote")
def _make(profile: DeviceProfile) -> RemoteBackend:
    return RemoteBackend(profile)
