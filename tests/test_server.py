"""The websocket server, driven by the real `openpi_client.WebsocketClientPolicy` over loopback.

Protocol-level tests use small test-local policies (fast, slow, validating, crashing); the end-to-end
tests use the real policy layer over a CPU `torch` backend with the tiny model (`pi0_tiny`).
Every server binds 127.0.0.1 on a free port and is shut down by its context manager.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import websockets
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.base_policy import BasePolicy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from pi0_triton_policy.server import INTERNAL_ERROR_REASON, PolicyServer, ServerThread

# openpi-client 0.1.2 calls websockets.sync.client.connect() outside a `with`, which websockets >= 16 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


class ObsError(ValueError):
    """Stands in for the policy layer's ObservationError in the protocol-level tests."""


class EchoPolicy(BasePolicy):
    """Answers (horizon, dim) float64 actions filled with obs["tag"]; validates like a real policy would;
    sleeps `delay` (or `first_delay` on the first call); records how many inferences ever overlapped."""

    metadata = {"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}

    def __init__(self, delay: float = 0.0, first_delay: float | None = None, horizon: int = 50, dim: int = 14):
        self.delay, self.first_delay, self.horizon, self.dim = delay, first_delay, horizon, dim
        self.calls = 0
        self.threads: set[str] = set()
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def infer(self, obs: dict) -> dict:
        with self._lock:
            self.calls += 1
            self.threads.add(threading.current_thread().name)
            first = self.calls == 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if obs.get("crash"):
                raise ZeroDivisionError("policy bug on purpose")
            if "state" not in obs:
                raise ObsError("missing key 'state': expected float array of shape (14,), got keys " + repr(sorted(obs)))
            state = np.asarray(obs["state"])
            if state.dtype.kind not in "fiu":
                raise ObsError(f"'state': expected a numeric array, got dtype {state.dtype}")
            time.sleep(self.first_delay if first and self.first_delay is not None else self.delay)
            tag = float(obs.get("tag", 0.0))
            return {"actions": np.full((self.horizon, self.dim), tag), "state": state, "policy_timing": {"infer_ms": 0.5}}
        finally:
            with self._lock:
                self.active -= 1


def serving(policy: BasePolicy, **kwargs) -> ServerThread:
    kwargs.setdefault("client_errors", (ObsError,))
    return ServerThread(PolicyServer(policy, HOST, 0, **kwargs))


def echo_obs(tag: float = 0.0) -> dict:
    return {"state": np.zeros(14, np.float32), "tag": tag}


class Background:
    """A client that keeps sending requests on its own thread; counts answers and failures."""

    def __init__(self, port: int):
        self.client = WebsocketClientPolicy(HOST, port)
        self.answered = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = self.client.infer(echo_obs(7.0))
                assert out["actions"].shape == (50, 14) and out["actions"][0, 0] == 7.0
                self.answered += 1
            except BaseException as e:  # noqa: BLE001 - reported by the test
                self.failures.append(e)
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
        self.client._ws.close()


def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -------------------------------------------------------------------------------------------------
# Protocol, with test-local policies
# -------------------------------------------------------------------------------------------------


def test_metadata_then_actions_with_both_timing_dicts():
    with serving(EchoPolicy()) as st:
        client = WebsocketClientPolicy(HOST, st.port)
        assert client.get_server_metadata() == {"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}
        first = client.infer(echo_obs(3.0))
        assert first["actions"].shape == (50, 14) and first["actions"].dtype == np.float64
        assert np.all(first["actions"] == 3.0)
        assert first["policy_timing"] == {"infer_ms": 0.5}
        assert set(first["server_timing"]) == {"infer_ms"}  # OpenPI: prev_total_ms from the 2nd request on
        second = client.infer(echo_obs(4.0))
        assert set(second["server_timing"]) == {"infer_ms", "prev_total_ms"}
        assert second["server_timing"]["prev_total_ms"] >= first["server_timing"]["infer_ms"] >= 0
        client._ws.close()


def test_empty_metadata_and_any_path():
    class NoMeta(BasePolicy):
        def infer(self, obs):
            return {"actions": np.zeros((10, 8))}

    with ServerThread(PolicyServer(NoMeta(), HOST, 0)) as st:
        client = WebsocketClientPolicy(f"ws://{HOST}:{st.port}/any/path")
        assert client.get_server_metadata() == {}
        assert client.infer({})["actions"].shape == (10, 8)
        client._ws.close()


def test_healthz():
    with serving(EchoPolicy(), api_key="secret") as st:  # health checks need no key
        with urllib.request.urlopen(f"http://{HOST}:{st.port}/healthz", timeout=5) as r:
            assert r.status == 200 and r.read() == b"OK\n"


def test_api_key_accepted_and_refused(monkeypatch):
    with serving(EchoPolicy(), api_key="s3cret") as st:
        ok = WebsocketClientPolicy(HOST, st.port, api_key="s3cret")  # sends "Authorization: Api-Key s3cret"
        assert ok.infer(echo_obs(1.0))["actions"][0, 0] == 1.0
        ok._ws.close()
        for key in ("wrong", None):
            with pytest.raises(websockets.exceptions.InvalidStatus) as e:
                WebsocketClientPolicy(HOST, st.port, api_key=key)
            assert e.value.response.status_code == 401
            assert b"Api-Key" in e.value.response.body
    # No key configured: openpi's clients that send one anyway are accepted.
    with serving(EchoPolicy()) as st:
        WebsocketClientPolicy(HOST, st.port, api_key="anything")._ws.close()


def test_concurrent_clients_are_all_answered_one_inference_at_a_time():
    policy = EchoPolicy(delay=0.002)
    clients, requests = 8, 20
    errors: list[BaseException] = []
    with serving(policy) as st:

        def run(i: int):
            try:
                client = WebsocketClientPolicy(HOST, st.port)
                for j in range(requests):
                    tag = 100.0 * i + j
                    out = client.infer(echo_obs(tag))
                    assert out["actions"].shape == (50, 14) and np.all(out["actions"] == tag)
                client._ws.close()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert st.server.stats["answered"] == clients * requests
    assert policy.calls == clients * requests and policy.max_active == 1
    assert {name.rsplit("_", 1)[0] for name in policy.threads} == {"pi0-infer"}  # never the event loop's thread


def test_bad_frames_get_a_clear_error_and_the_connection_stays_usable():
    with serving(EchoPolicy()) as st, Background(st.port) as bg:
        client = WebsocketClientPolicy(HOST, st.port)
        cases = {
            "missing key": ({"tag": 1.0}, "missing key 'state'"),
            "wrong dtype": ({"state": np.array(["a", "b"])}, "dtype <U1"),
        }
        for name, (obs, expected) in cases.items():
            with pytest.raises(RuntimeError, match=expected) as e:
                client.infer(obs)
            assert str(e.value).count("\n") == 1, f"{name}: not a one-line error: {e.value}"
            assert client.infer(echo_obs(2.0))["actions"][0, 0] == 2.0  # same connection, still served
        for frame, expected in (
            (b"\xc1 not msgpack", "could not decode the binary frame"),
            (msgpack_numpy.packb([1, 2, 3]), "expected the observation to be a dict"),
            ("a text frame", "expected a binary frame"),
        ):
            client._ws.send(frame)
            reply = client._ws.recv()
            assert isinstance(reply, str) and expected in reply and "\n" not in reply, reply
            assert client.infer(echo_obs(3.0))["actions"][0, 0] == 3.0
        client._ws.close()
        answered_before = bg.answered
        wait_for(lambda: bg.answered > answered_before + 5, what="the background client")
    assert not bg.failures, bg.failures
    assert st.server.stats["internal_errors"] == 0


def test_oversized_frame_refused_with_clear_reason():
    with serving(EchoPolicy(), max_message_mb=1) as st, Background(st.port) as bg:
        client = WebsocketClientPolicy(HOST, st.port)
        big = {"state": np.zeros(14, np.float32), "image": np.zeros((2, 1024, 1024), np.uint8)}  # 2 MiB
        with pytest.raises(websockets.exceptions.ConnectionClosedError) as e:
            client.infer(big)
        close = e.value.rcvd or e.value.sent
        assert close.code == 1009 and "exceeds limit of 1048576 bytes" in close.reason and "--max-message-mb 1" in close.reason
        # A new connection with a small frame is fine, and the other client never noticed.
        client = WebsocketClientPolicy(HOST, st.port)
        assert client.infer(echo_obs(5.0))["actions"][0, 0] == 5.0
        client._ws.close()
        answered_before = bg.answered
        wait_for(lambda: bg.answered > answered_before + 5, what="the background client")
    assert not bg.failures, bg.failures


def test_default_message_limit_is_64_mb():
    server = PolicyServer(EchoPolicy(), HOST, 0)
    assert server._max_size == 64 * 2**20


def test_internal_error_sends_traceback_closes_1011_and_server_keeps_serving():
    with serving(EchoPolicy()) as st, Background(st.port) as bg:
        client = WebsocketClientPolicy(HOST, st.port)
        with pytest.raises(RuntimeError, match="(?s)Error in inference server:\nTraceback.*ZeroDivisionError: policy bug"):
            client.infer({"state": np.zeros(14), "crash": True})
        with pytest.raises(websockets.exceptions.ConnectionClosedError) as e:
            client.infer(echo_obs())
        assert e.value.rcvd.code == 1011 and e.value.rcvd.reason == INTERNAL_ERROR_REASON
        fresh = WebsocketClientPolicy(HOST, st.port)
        assert fresh.infer(echo_obs(6.0))["actions"][0, 0] == 6.0
        fresh._ws.close()
        answered_before = bg.answered
        wait_for(lambda: bg.answered > answered_before + 5, what="the background client")
    assert not bg.failures, bg.failures
    assert st.server.stats["internal_errors"] == 1


def test_client_dropping_mid_request_harms_nothing():
    policy = EchoPolicy(delay=0.5)
    with serving(policy) as st:
        other = WebsocketClientPolicy(HOST, st.port)
        # A: its own request is running when it drops (TCP reset, no close frame).
        a = websockets.sync.client.connect(f"ws://{HOST}:{st.port}", compression=None, max_size=None)
        a.recv()
        a.send(msgpack_numpy.packb(echo_obs(1.0)))
        wait_for(lambda: policy.active == 1, what="A's inference to start")
        # B: queued behind A's request when it drops, so its request is skipped rather than computed.
        b = websockets.sync.client.connect(f"ws://{HOST}:{st.port}", compression=None, max_size=None)
        b.recv()
        b.send(msgpack_numpy.packb(echo_obs(2.0)))
        wait_for(lambda: st.server.stats["requests"] == 2, what="B's request to arrive")
        a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        a.socket.close()
        b.close()
        out = other.infer(echo_obs(3.0))  # queued behind both; must be answered
        assert out["actions"][0, 0] == 3.0
        assert other.infer(echo_obs(4.0))["actions"][0, 0] == 4.0
        other._ws.close()
        fresh = WebsocketClientPolicy(HOST, st.port)
        assert fresh.infer(echo_obs(5.0))["actions"][0, 0] == 5.0
        fresh._ws.close()
        stats = dict(st.server.stats)
    assert stats["internal_errors"] == 0
    assert stats["skipped"] == 1  # B's request was never computed
    assert policy.calls == 4  # A's (finished, reply undeliverable), other's two, fresh's


def test_shutdown_closes_connected_clients_with_1001():
    st = serving(EchoPolicy()).start()
    client = WebsocketClientPolicy(HOST, st.port)
    client.infer(echo_obs())
    st.stop(timeout=30)
    with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
        client.infer(echo_obs())
    assert e.value.rcvd is not None and e.value.rcvd.code == 1001
    with pytest.raises(OSError):
        socket.create_connection((HOST, st.port), timeout=2).close()


@pytest.mark.slow
def test_minute_long_inference_does_not_drop_the_client():
    """OpenPI's server blocks its loop, so a first inference (JIT) over ~40 s drops clients on the
    client's keepalive (ping every 20 s, 20 s timeout: websockets' defaults, which openpi-client keeps).
    Ours answers pings throughout; we also ping from the test and time the pongs."""
    policy = EchoPolicy(first_delay=60.0)
    with serving(policy) as st:  # server keepalive at its defaults too (20 s / 20 s)
        client = WebsocketClientPolicy(HOST, st.port)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(out=client.infer(echo_obs(9.0))), daemon=True)
        t0 = time.monotonic()
        t.start()
        pong_s = []
        while t.is_alive():
            t.join(5)
            if t.is_alive():
                sent = time.monotonic()
                assert client._ws.ping().wait(2.0), "the server did not answer a ping during inference"
                pong_s.append(time.monotonic() - sent)
        elapsed = time.monotonic() - t0
        print(f"inference {elapsed:.1f} s, {len(pong_s)} pings answered, slowest pong {max(pong_s) * 1e3:.1f} ms")
        assert elapsed >= 60 and "out" in result and result["out"]["actions"][0, 0] == 9.0
        assert result["out"]["server_timing"]["infer_ms"] >= 60_000
        assert client.infer(echo_obs(1.0))["actions"][0, 0] == 1.0  # and the connection is still good
        client._ws.close()


# -------------------------------------------------------------------------------------------------
# End to end: the real policy layer over a CPU torch backend with the tiny model
# -------------------------------------------------------------------------------------------------

ENV_EXPECTED = {  # env -> (preset, actions shape, metadata) as OpenPI's example clients see them
    "ALOHA": ("pi0_aloha", (50, 14), {"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}),
    "ALOHA_SIM": ("pi0_aloha_sim", (50, 14), {}),
    "DROID": ("pi0_droid", (10, 8), {}),
    "LIBERO": ("pi0_libero", (50, 7), {}),
}


@pytest.fixture(scope="module")
def tiny_backend():
    from pi0_triton_policy.backends import load_backend

    backend, _ = load_backend("torch", variant="pi0_tiny", device="cpu")
    return backend


def test_env_presets_match_openpi():
    from pi0_triton_policy.presets import ENV_TO_PRESET

    assert {env: preset for env, (preset, _, _) in ENV_EXPECTED.items()} == ENV_TO_PRESET


@pytest.mark.parametrize("env", list(ENV_EXPECTED))
def test_each_env_example_observation_is_answered(tiny_backend, env):
    from pi0_triton_policy.policy import create_policy, make_example_observation

    from pi0_triton_policy.backends import load_backend

    preset, shape, metadata = ENV_EXPECTED[env]
    backend = tiny_backend
    if shape[0] != backend.cfg.action_horizon:  # pi0_droid: OpenPI's model has 10 action tokens
        backend, _ = load_backend("torch", variant="pi0_tiny", device="cpu", action_horizon=shape[0])
    policy = create_policy(preset, backend)
    with ServerThread(PolicyServer(policy, HOST, 0)) as st:  # default client_errors: the policy layer's
        client = WebsocketClientPolicy(HOST, st.port)
        assert client.get_server_metadata() == metadata
        for i, float_images in enumerate((False, True)):
            out = client.infer(make_example_observation(preset, rng=i, float_images=float_images))
            assert out["actions"].shape == shape and out["actions"].dtype == np.float64
            assert np.all(np.isfinite(out["actions"]))
            assert out["policy_timing"]["infer_ms"] > 0
            assert set(out["server_timing"]) == ({"infer_ms"} if i == 0 else {"infer_ms", "prev_total_ms"})
            assert out["server_timing"]["infer_ms"] >= out["policy_timing"]["infer_ms"]
        client._ws.close()


def test_bad_observations_to_the_real_policy(tiny_backend):
    from pi0_triton_policy.policy import create_policy, make_example_observation

    policy = create_policy("pi0_libero", tiny_backend)
    good = make_example_observation("pi0_libero", rng=0)
    with ServerThread(PolicyServer(policy, HOST, 0)) as st:
        client = WebsocketClientPolicy(HOST, st.port)
        cases = [
            ({k: v for k, v in good.items() if k != "observation/state"}, "missing key 'observation/state'"),
            ({**good, "observation/state": np.array(list("abcdefgh"))}, "dtype <U1"),
            ({**good, "observation/image": good["observation/image"].astype(np.int64)}, "dtype int64"),
        ]
        for obs, expected in cases:
            with pytest.raises(RuntimeError, match=expected) as e:
                client.infer(obs)
            text = str(e.value).split("\n", 1)[1]
            assert text.startswith("ObservationError: ") and "\n" not in text, text
            assert client.infer(good)["actions"].shape == (50, 7)  # the connection is still usable
        client._ws.close()
        assert st.server.stats["client_errors"] == 3 and st.server.stats["internal_errors"] == 0


class Tagged(BasePolicy):
    """Wraps a real policy: strips obs["tag"] and echoes it, so each client can check it got its own answer."""

    def __init__(self, inner):
        self.inner, self.active, self.max_active, self._lock = inner, 0, 0, threading.Lock()

    @property
    def metadata(self):
        return self.inner.metadata

    def infer(self, obs):
        obs = dict(obs)
        tag = obs.pop("tag")
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return {**self.inner.infer(obs), "tag": tag}
        finally:
            with self._lock:
                self.active -= 1


@pytest.mark.slow
def test_8_clients_x_20_requests_real_policy(tiny_backend):
    from pi0_triton_policy.policy import create_policy, make_example_observation

    # 2 flow steps instead of 10: this is a load test of the server, and the prefix dominates the tiny model anyway.
    policy = Tagged(create_policy("pi0_libero", tiny_backend, num_steps=2))
    clients, requests = 8, 20
    errors: list[BaseException] = []
    answered = [0] * clients
    with ServerThread(PolicyServer(policy, HOST, 0)) as st:

        def run(i: int):
            try:
                client = WebsocketClientPolicy(HOST, st.port)
                obs = make_example_observation("pi0_libero", rng=i)
                for j in range(requests):
                    out = client.infer({**obs, "tag": f"{i}/{j}"})
                    assert out["tag"] == f"{i}/{j}" and out["actions"].shape == (50, 7)
                    assert np.all(np.isfinite(out["actions"]))
                    answered[i] += 1
                client._ws.close()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t0 = time.monotonic()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        print(f"{clients}x{requests} requests in {time.monotonic() - t0:.1f} s")
        stats = dict(st.server.stats)
    assert not errors, errors
    assert answered == [requests] * clients
    assert stats["answered"] == clients * requests and stats["internal_errors"] == 0
    assert policy.max_active == 1  # one inference at a time (one worker per GPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_policy_script_end_to_end(tmp_path, sig):
    """scripts/serve_policy.py as a user runs it: warm-up before the port opens, start-up log, API key from
    the environment, --record, and a clean exit (0) on SIGTERM / SIGINT with a client still connected."""
    from pi0_triton_policy.policy import make_example_observation

    port = _free_port()
    log_path = tmp_path / "server.log"
    cmd = [
        sys.executable, str(REPO / "scripts" / "serve_policy.py"), "--backend", "torch", "--variant", "pi0_tiny",
        "--device", "cpu", "--host", HOST, "--port", str(port), "--env", "LIBERO", "--record", "--latency-iters", "2",
    ]
    env = {**os.environ, "PI0_API_KEY": "k3y", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited early:\n{log_path.read_text()}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            assert time.monotonic() < deadline, f"server did not come up:\n{log_path.read_text()}"
            time.sleep(0.2)
        log = log_path.read_text()
        ready = next(line for line in log.splitlines() if " ready " in line)
        for field in ("backend=torch", "card='CPU", "weights='RANDOM (pi0_tiny", "preset=pi0_libero", "latency_ms_median="):
            assert field in ready, ready
        assert "SERVING RANDOM" in log and log.index("SERVING RANDOM") < log.index(" ready ") < log.index("listening")

        with pytest.raises(websockets.exceptions.InvalidStatus):
            WebsocketClientPolicy(HOST, port)
        client = WebsocketClientPolicy(HOST, port, api_key="k3y")
        assert client.get_server_metadata() == {}
        out = client.infer(make_example_observation("pi0_libero", rng=1))
        assert out["actions"].shape == (50, 7) and set(out["server_timing"]) == {"infer_ms"}
        assert sorted(p.name for p in (tmp_path / "policy_records").iterdir()) == ["step_0.npy"]  # warm-up not recorded

        proc.send_signal(sig)
        assert proc.wait(60) == 0, log_path.read_text()
        with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
            client.infer(make_example_observation("pi0_libero", rng=2))
        assert e.value.rcvd is not None and e.value.rcvd.code == 1001
        log = log_path.read_text()
        assert f"received {signal.Signals(sig).name}" in log and "stopped connections=1" in log
        assert "request conn=1" in log and "infer_ms=" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_inference_worker_accepts_plain_cuda(device):
    """serve_policy passes --device (default "cuda", no index) to the worker, which sets it per thread."""
    import torch

    from pi0_triton_policy.server import inference_worker

    worker = inference_worker(device)
    try:
        assert worker.submit(torch.cuda.current_device).result() == (torch.device(device).index or 0)
    finally:
        worker.shutdown()
