"""The remote agent on loopback (in a background thread, and in a torch-free subprocess) and its client."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hwprune.errors import BackendUnavailable, ConfigError, ModelError
from hwprune.latency import DeviceProfile, MeasureSettings, make_backend, measure_candidate_pair
from hwprune.latency import agent as agent_mod
from hwprune.latency.remote import AgentClient, RemoteBackend
from test_latency_models import conv_onnx
from test_latency_onnxruntime import symbolic_channels

TOKEN = "s3cret-token"
FAST = MeasureSettings(warmup=2, min_repeats=5, max_repeats=30, target_rel_ci=0.05, time_cap_s=0.5)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def agent(tmp_path):
    server = agent_mod.make_server(
        port=0, token=TOKEN, cache_dir=str(tmp_path / "agent-cache"), max_model_mb=0.5, request_timeout_s=1.0
    )
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


def remote_profile(url, **options) -> DeviceProfile:
    opts = {"url": url, "token": TOKEN, "retries": 1, "backoff_s": 0.01, "threads": 1}
    opts.update(options)
    return DeviceProfile(name="r", backend="remote", options=opts, measure=FAST)


def raw(server, method, path, body=b"", headers=None, token=TOKEN):
    host, port = server.server_address[:2]
    con = http.client.HTTPConnection(host, port, timeout=10)
    h = {"Authorization": f"Bearer {token}", "Content-Length": str(len(body))}
    h.update(headers or {})
    con.request(method, path, body=body, headers=h)
    resp = con.getresponse()
    data = resp.read()
    con.close()
    return resp.status, json.loads(data or b"{}")


def assert_still_serving(server):
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["ok"] is True


def test_measure_through_agent_uploads_once(agent, tmp_path):
    m = conv_onnx(tmp_path / "m.onnx", channels=8)
    b = make_backend(remote_profile(agent.url))
    st = b.measure_onnx(m, (1, 3, 16, 16))
    assert st.median_ms > 0 and 5 <= st.n <= 30 and len(st.samples_ms) == st.n
    sha = hashlib.sha256(Path(m).read_bytes()).hexdigest()
    assert (Path(agent.state.cache_dir) / f"{sha}.onnx").is_file()
    # a fresh client (e.g. after a resume) finds the model on the agent and does not upload it again
    b2 = RemoteBackend(remote_profile(agent.url))
    b2.client.upload = lambda *a, **k: pytest.fail("re-uploaded a model the agent already has")
    assert b2.measure_onnx(m, (1, 3, 16, 16)).median_ms > 0
    fp = b2.fingerprint()
    assert fp["backend"] == "onnxruntime" and fp["intra_op_threads"] == 1


def test_interleaved_pair_on_the_agent(agent, tmp_path):
    big = conv_onnx(tmp_path / "big.onnx", channels=48)
    small = conv_onnx(tmp_path / "small.onnx", channels=8)
    pair = measure_candidate_pair(make_backend(remote_profile(agent.url)), big, None, small, None, (1, 3, 32, 32))
    assert pair.interleaved and pair.ratio > 4.0, pair


def test_model_errors_on_the_agent_come_back_as_model_errors(agent, tmp_path):
    b = RemoteBackend(remote_profile(agent.url))
    with pytest.raises(ModelError, match=r"agent at .*cannot run at input shape"):
        b.measure_onnx(symbolic_channels(conv_onnx(tmp_path / "m.onnx")), (1, 5, 8, 8))
    assert_still_serving(agent)


def test_wrong_token_is_rejected(agent, tmp_path):
    b = RemoteBackend(remote_profile(agent.url, token="wrong"))
    with pytest.raises(BackendUnavailable, match=r"agent at http://127\.0\.0\.1:\d+ rejected the token") as e:
        b.measure_onnx(conv_onnx(tmp_path / "m.onnx"), (1, 3, 8, 8))
    assert "\n" not in str(e.value)
    status, body = raw(agent, "GET", "/health", token="")
    assert status == 401
    assert_still_serving(agent)


def test_oversize_upload_gets_413(agent, tmp_path):
    body = b"\0" * (agent.state.max_model_bytes + 1)
    sha = hashlib.sha256(body).hexdigest()
    status, resp = raw(agent, "PUT", f"/models/{sha}", body)
    assert status == 413 and "max-model-mb" in resp["error"]
    # the client checks the limit before sending
    big = tmp_path / "big.onnx"
    big.write_bytes(body)
    with pytest.raises(ModelError, match="exceeds the limit"):
        RemoteBackend(remote_profile(agent.url)).measure_onnx(str(big), (1, 3, 8, 8))
    assert_still_serving(agent)


def test_garbage_hash_mismatch_and_path_tricks_are_refused(agent, tmp_path):
    junk = b"definitely not an onnx model" * 50
    sha = hashlib.sha256(junk).hexdigest()
    status, resp = raw(agent, "PUT", f"/models/{sha}", junk)
    assert status == 400 and "not an ONNX model" in resp["error"]
    assert not any(Path(agent.state.cache_dir).iterdir())
    good = Path(conv_onnx(tmp_path / "m.onnx")).read_bytes()
    status, resp = raw(agent, "PUT", f"/models/{'0' * 64}", good)
    assert status == 400 and "hash mismatch" in resp["error"]
    for path in ("/models/../../etc/passwd", "/models/%2e%2e%2fx", f"/models/{sha}/../x", "/models/" + "A" * 64):
        status, _ = raw(agent, "PUT", path, good)
        assert status == 404
    for bad_model in ("../../etc/passwd", "0" * 64, 5):
        status, resp = raw(agent, "POST", "/measure", json.dumps({"model": bad_model, "input_shape": [1, 3, 8, 8]}).encode())
        assert status in (400, 404), resp
    status, _ = raw(agent, "POST", "/measure", b"{not json")
    assert status == 400
    status, resp = raw(agent, "POST", "/measure", json.dumps({"model": "0" * 64, "input_shape": [1, -3]}).encode())
    assert status == 400 and "input_shape" in resp["error"]
    status, resp = raw(agent, "POST", "/measure", json.dumps({"model": "0" * 64, "input_shape": [1], "settings": {"time_cap_s": 1e3}}).encode())
    assert status == 400 and "max-measure-s" in resp["error"]
    assert_still_serving(agent)
    # and it still measures
    assert RemoteBackend(remote_profile(agent.url)).measure_onnx(str(tmp_path / "m.onnx"), (1, 3, 8, 8)).n >= 5


def test_model_with_external_data_outside_the_store_is_refused(agent):
    import onnx
    from onnx import TensorProto, helper

    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "/etc/hostname"), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [w],
    )
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    status, resp = raw(agent, "PUT", f"/models/{hashlib.sha256(data).hexdigest()}", data)
    assert status == 400 and "not an ONNX model" in resp["error"]
    assert_still_serving(agent)


def test_stalled_request_times_out_and_agent_keeps_serving(agent):
    host, port = agent.server_address[:2]
    s = socket.create_connection((host, port))
    s.sendall(b"PUT /models/" + b"a" * 64 + f" HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode() + b"x" * 10)
    s.settimeout(5)
    t0 = time.monotonic()
    data = s.recv(4096)  # the agent gives up after request_timeout_s (1 s) and answers or closes
    assert time.monotonic() - t0 < 4.5
    assert data == b"" or b"408" in data.split(b"\r\n")[0] or b"400" in data.split(b"\r\n")[0]
    s.close()
    assert_still_serving(agent)


def test_measurements_never_overlap(agent, tmp_path, monkeypatch):
    from hwprune.latency import onnxruntime_backend

    spans = []
    real = onnxruntime_backend.OnnxRuntimeBackend.measure_onnx

    def slow(self, path, shape):
        t0 = time.monotonic()
        time.sleep(0.3)
        out = real(self, path, shape)
        spans.append((t0, time.monotonic()))
        return out

    monkeypatch.setattr(onnxruntime_backend.OnnxRuntimeBackend, "measure_onnx", slow)
    m = conv_onnx(tmp_path / "m.onnx")
    RemoteBackend(remote_profile(agent.url)).client.ensure_model(m)
    errors = []

    def go():
        try:
            RemoteBackend(remote_profile(agent.url)).measure_onnx(m, (1, 3, 8, 8))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(spans) == 3
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_lost_model_is_uploaded_again(agent, tmp_path):
    m = conv_onnx(tmp_path / "m.onnx")
    b = RemoteBackend(remote_profile(agent.url))
    b.measure_onnx(m, (1, 3, 8, 8))
    for f in Path(agent.state.cache_dir).glob("*.onnx"):
        f.unlink()
    assert b.measure_onnx(m, (1, 3, 8, 8)).n >= 5


def test_provider_missing_on_agent_is_reported(agent, tmp_path):
    b = RemoteBackend(remote_profile(agent.url, provider="CUDAExecutionProvider"))
    with pytest.raises(BackendUnavailable, match=r"agent at .*CUDAExecutionProvider.*onnxruntime-gpu"):
        b.fingerprint()
    with pytest.raises(ConfigError, match="unknown remote option 'thread'"):
        RemoteBackend(remote_profile(agent.url, thread=1))


def test_unreachable_agent_fails_fast_and_clearly():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = RemoteBackend(remote_profile(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01, timeout_s=1))
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"unreachable after 3 tries: .*start it with `hwprune agent") as e:
        b.fingerprint()
    assert time.monotonic() - t0 < 3.0
    assert "\n" not in str(e.value)


def test_backoff_is_exponential():
    delays = []
    c = AgentClient("http://127.0.0.1:9", "t", retries=3, backoff_s=0.1, timeout_s=0.5, sleep=delays.append)
    with pytest.raises(BackendUnavailable):
        c.health()
    assert delays == pytest.approx([0.1, 0.2, 0.4])


def test_token_env_and_config_errors(monkeypatch):
    monkeypatch.delenv("HWPRUNE_TEST_TOKEN", raising=False)
    prof = DeviceProfile(name="r", backend="remote", options={"url": "http://127.0.0.1:1", "token_env": "HWPRUNE_TEST_TOKEN"})
    with pytest.raises(BackendUnavailable, match="HWPRUNE_TEST_TOKEN"):
        RemoteBackend(prof)
    monkeypatch.setenv("HWPRUNE_TEST_TOKEN", "abc")
    assert RemoteBackend(prof).client.token == "abc"
    with pytest.raises(ConfigError, match="needs option url"):
        RemoteBackend(DeviceProfile(name="r", backend="remote", options={"token": "x"}))
    with pytest.raises(ConfigError, match="not valid"):
        RemoteBackend(DeviceProfile(name="r", backend="remote", options={"url": "127.0.0.1:8765", "token": "x"}))


def test_non_loopback_bind_needs_explicit_flag(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--allow-remote"):
        agent_mod.make_server(host="0.0.0.0", port=0, token="t", cache_dir=str(tmp_path))
    assert agent_mod.main(["--host", "0.0.0.0", "--port", "0", "--token", "t", "--cache-dir", str(tmp_path)]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert agent_mod.main(["--port", "0", "--token", "", "--cache-dir", str(tmp_path)]) == 2
    assert agent_mod.is_loopback("127.0.0.1") and agent_mod.is_loopback("::1") and not agent_mod.is_loopback("0.0.0.0")


def test_two_agents_serve_one_search(tmp_path):
    servers = [agent_mod.make_server(port=0, token=TOKEN, cache_dir=str(tmp_path / f"c{i}")) for i in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        m = conv_onnx(tmp_path / "m.onnx")
        stats = [RemoteBackend(remote_profile(s.url)).measure_onnx(m, (1, 3, 8, 8)) for s in servers]
        assert all(st.n >= 5 for st in stats)
        assert all(any(Path(s.state.cache_dir).glob("*.onnx")) for s in servers)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


BLOCK_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; sys.modules['torch_pruning'] = None; "
)


def test_agent_module_imports_without_torch():
    code = BLOCK_TORCH + "import hwprune.latency.agent as a; assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    # and nothing pulls torch in lazily either
    code = "import sys, hwprune.latency.agent; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'torch_pruning')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_torch_free_agent_process_serves_measurements(tmp_path):
    code = BLOCK_TORCH + "from hwprune.latency.agent import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--token", TOKEN, "--cache-dir", str(tmp_path / "c")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
    )
    try:
        line = proc.stdout.readline()
        assert "serving on http://127.0.0.1:" in line, line + proc.stderr.read() if proc.poll() is not None else line
        url = line.split("serving on ")[1].split()[0]
        b = RemoteBackend(remote_profile(url))
        st = b.measure_onnx(conv_onnx(tmp_path / "m.onnx"), (1, 3, 8, 8))
        assert st.n >= 5
        assert b.client.health()["fingerprint"]["cpu"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
