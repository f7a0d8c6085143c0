"""The agent under load and abuse on loopback: it stays up and answers every request correctly."""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hwprune.latency import agent as agent_mod
from hwprune.latency.onnxruntime_backend import OnnxRuntimeBackend
from test_agent import TOKEN, assert_still_serving, raw
from test_latency_models import conv_onnx

MEASURE = {"warmup": 1, "min_repeats": 3, "max_repeats": 5, "target_rel_ci": 0.5, "time_cap_s": 0.2}


def _serve(tmp_path, **limits):
    server = agent_mod.make_server(port=0, token=TOKEN, cache_dir=str(tmp_path / "cache"), max_model_mb=0.5,
                                   request_timeout_s=1.0, max_wait_s=60.0, **limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture()
def small_agent(tmp_path):
    server = _serve(tmp_path, max_connections=16, max_queue=2)
    yield server
    server.shutdown()
    server.server_close()


def test_connections_beyond_the_limit_get_503_at_once(tmp_path):
    """Two clients that stall mid-request hold both connection slots: a third request is answered 503 busy at
    once; once the stalled ones time out, requests are served again."""
    server = _serve(tmp_path, max_connections=2, max_queue=2)
    host, port = server.server_address[:2]
    try:
        stalled = [socket.create_connection((host, port)) for _ in range(2)]
        for s in stalled:
            s.sendall(b"GET /health HTTP/1.1\r\nAuthorization: Bearer ")  # and then nothing
        time.sleep(0.3)
        status, body = raw(server, "GET", "/health")
        assert status == 503 and "busy" in body["error"]
        time.sleep(1.5)  # the agent's request timeout (1 s) frees both slots
        assert_still_serving(server)
        for s in stalled:
            s.close()
    finally:
        server.shutdown()
        server.server_close()


def _upload(server, path: str) -> str:
    data = Path(path).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    status, _ = raw(server, "PUT", f"/models/{sha}", data)
    assert status in (200, 201)
    return sha


def _raw_request(server, head: bytes, body: bytes = b"", timeout: float = 10.0) -> int:
    """Status code of a hand-written request (for bodies a normal client would not send)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(head + body)
        reply = b""
        while b"\r\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ", 2)[1]) if reply else 0


def test_one_measurement_at_a_time_and_a_bounded_queue(small_agent, tmp_path, monkeypatch):
    """12 clients ask for measurements together: never two on the device at once; those beyond the queue get 503
    busy at once; every request gets 200 or 503; the agent keeps serving."""
    sha = _upload(small_agent, conv_onnx(tmp_path / "m.onnx", channels=8))
    active, peak = [0], [0]
    lock = threading.Lock()
    real = OnnxRuntimeBackend.measure_onnx

    def tracked(self, path, shape):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.2)  # a measurement long enough for the others to pile up
            return real(self, path, shape)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(OnnxRuntimeBackend, "measure_onnx", tracked)
    body = json.dumps({"model": sha, "input_shape": [1, 3, 8, 8], "settings": MEASURE}).encode()

    def one(_):
        try:
            return raw(small_agent, "POST", "/measure", body)
        except OSError as e:  # a refused connection would be a failure of the agent
            return 0, {"error": repr(e)}

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    codes = [a[0] for a in answers]
    assert set(codes) <= {200, 503}, answers
    assert codes.count(200) >= 3  # the one measuring plus the queued ones
    assert codes.count(503) >= 1 and all("busy" in a[1]["error"] for a in answers if a[0] == 503)
    assert all(a[1]["stats"]["n"] >= 3 for a in answers if a[0] == 200)
    assert peak[0] == 1
    assert_still_serving(small_agent)


def test_wrong_token_with_a_huge_body_is_refused_without_reading_it(small_agent):
    """A 1 GiB Content-Length without the token: 401 at once, the body is never read."""
    head = (b"PUT /models/" + b"0" * 64 + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Length: 1073741824\r\n\r\n")
    assert _raw_request(small_agent, head, b"x" * 1000) == 401
    assert _raw_request(small_agent, head.replace(b"Bearer wrong", b"Bearer " + TOKEN.encode())) == 413
    assert_still_serving(small_agent)


@pytest.mark.parametrize("settings, fragment", [
    ({"interleave_block": 10 ** 7}, "interleave_block"),
    ({"max_repeats": 10 ** 9}, "max_repeats"),
    ({"warmup": -1}, "warmup"),
    ({"time_cap_s": float("nan")}, "time_cap_s"),
    ({"min_repeats": 9, "max_repeats": 3}, "min_repeats"),
    ({"repeats_forever": True}, "repeats_forever"),
])
def test_settings_outside_the_limits_are_refused(small_agent, tmp_path, settings, fragment):
    sha = _upload(small_agent, conv_onnx(tmp_path / "m.onnx"))
    body = json.dumps({"model": sha, "input_shape": [1, 3, 8, 8], "settings": settings}).encode()
    status, resp = raw(small_agent, "POST", "/measure", body)
    assert status == 400 and fragment in resp["error"], resp


def test_load_of_mixed_good_and_bad_clients(small_agent, tmp_path):
    """42 requests from 10 threads: health, wrong tokens, garbage JSON, oversized JSON, stalled clients, real
    measurements. Each gets its correct answer (a measurement may get 503 busy when the device queue is full);
    the agent stays up."""
    sha = _upload(small_agent, conv_onnx(tmp_path / "m.onnx"))
    good = json.dumps({"model": sha, "input_shape": [1, 3, 8, 8], "settings": MEASURE}).encode()
    kinds = {
        "health": (lambda: raw(small_agent, "GET", "/health")[0], {200}),
        "token": (lambda: raw(small_agent, "GET", "/health", token="nope")[0], {401}),
        "garbage": (lambda: raw(small_agent, "POST", "/measure", b"\xff\x00{{")[0], {400}),
        "oversized": (lambda: _raw_request(small_agent, b"POST /measure HTTP/1.1\r\nAuthorization: Bearer " +
                                           TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n" % (2 << 20)), {413}),
        "stalled": (lambda: _raw_request(small_agent, b"POST /measure HTTP/1.1\r\nAuthorization: Bearer " +
                                         TOKEN.encode() + b"\r\nContent-Length: 100\r\n\r\n{", timeout=10), {408}),
        "measure": (lambda: raw(small_agent, "POST", "/measure", good)[0], {200}),
    }
    plan = [k for _ in range(7) for k in kinds]

    def one(kind):
        fn, expected = kinds[kind]
        try:
            code = fn()
        except OSError as e:
            code = repr(e)
        return kind, code, code in expected or (kind == "measure" and code == 503)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, plan))
    wrong = [r for r in results if not r[2]]
    assert not wrong, wrong
    assert any(r[0] == "measure" and r[1] == 200 for r in results)
    assert_still_serving(small_agent)
