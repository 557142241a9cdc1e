"""OpenPI's websocket policy protocol, served without ever blocking the event loop.

Wire protocol (identical to `openpi.serving.websocket_policy_server`, so an unmodified
`openpi_client.WebsocketClientPolicy` talks to us by changing a port):
  - `GET /healthz` -> 200 `OK\\n`, answered before the websocket upgrade (and before the API-key check).
  - On connect the server sends ONE binary frame: `msgpack_numpy.packb(metadata)` (`{}` if none).
  - Then, per request: one binary frame in (a packed observation dict), one binary frame out
    (`policy.infer(obs)` plus `server_timing = {"infer_ms", "prev_total_ms" (from the 2nd request)}`).
  - An internal error sends the traceback as a TEXT frame and closes with 1011 and OpenPI's reason;
    the client raises `RuntimeError("Error in inference server:\\n" + text)` on any text frame.

Where we differ from OpenPI's server (all invisible to a well-behaved client):
  - Inference runs on one worker thread per server (one server per GPU), so websocket pings are
    answered during a minute-long first inference, and requests from concurrent clients are served
    one at a time, first come first served, none dropped.
  - A bad frame (not msgpack, a text frame, not a dict) or a bad observation (the policy raises
    `ObservationError`) is answered with a one-line text frame and the connection stays usable:
    the client raises RuntimeError for that call and its next call is answered normally.
  - Frames over `max_message_mb` are refused (close 1009 with the limit in the reason) before they are read.
  - Optional API key, checked against the `Authorization: Api-Key <key>` header openpi-client sends; 401 if wrong.
  - A client that disconnects mid-request harms nothing (a request still queued for it is skipped).
  - One key=value log line per request with its queue, inference and total latency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import itertools
import logging
import os
import signal
import threading
import time
import traceback
import urllib.parse
from typing import Any, Callable

import websockets
import websockets.asyncio.server as ws_server
from openpi_client import base_policy as _base_policy
from openpi_client import msgpack_numpy
from websockets.frames import CloseCode
from websockets.protocol import State

log = logging.getLogger(__name__)

# OpenPI's close reason after the traceback frame; clients and log scrapers may match on it.
INTERNAL_ERROR_REASON = "Internal server error. Traceback included in previous frame."
DEFAULT_MAX_MESSAGE_MB = 64.0
API_KEY_ENV = "PI0_API_KEY"
HEALTH_PATH = "/healthz"


class BadFrameError(ValueError):
    """A frame the server cannot turn into an observation dict (answered with a text frame; connection kept)."""


def _kv(**fields: Any) -> str:
    """`k=v k=v` for structured logs; floats to 0.1 ms."""
    parts = []
    for k, v in fields.items():
        if isinstance(v, float):
            v = f"{v:.1f}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def _one_line(text: str, limit: int = 2000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 15] + " ... (truncated)"


def _default_client_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the client sent a bad observation" (policy layer's ObservationError)."""
    try:
        from pi0_triton_policy.policy import ObservationError
    except ImportError:  # the policy layer is optional for a server around any BasePolicy
        return ()
    return (ObservationError,)


def decode_observation(message: str | bytes) -> dict:
    """One client frame -> observation dict, or BadFrameError saying what was wrong."""
    if isinstance(message, str):
        raise BadFrameError(
            "expected a binary frame holding an openpi_client.msgpack_numpy-packed observation dict, "
            f"got a text frame ({len(message)} chars)"
        )
    try:
        obs = msgpack_numpy.unpackb(message)
    except Exception as e:  # msgpack's errors, or numpy's on a malformed __ndarray__ map
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise BadFrameError(
            f"could not decode the binary frame ({len(message)} bytes) as an openpi_client.msgpack_numpy-packed "
            f"observation dict ({why})"
        ) from None
    if not isinstance(obs, dict):
        raise BadFrameError(f"expected the observation to be a dict (msgpack map), got {type(obs).__name__}")
    return obs


def inference_worker(device: str | None = None) -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that runs every inference on a GPU, in arrival order.

    Run the warm-up on it too (`worker.submit(policy.infer, obs).result()`), so the per-thread CUDA state
    used while serving (current device, cuBLAS handles, streams) is the state the warm-up created.
    """

    def init() -> None:
        if device is not None and str(device).startswith("cuda"):
            import torch

            dev = torch.device(device)
            # per thread: a worker for cuda:1 must not default to cuda:0; plain "cuda" means the current device
            torch.cuda.set_device(dev.index if dev.index is not None else torch.cuda.current_device())

    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pi0-infer", initializer=init)


class _Connection(ws_server.ServerConnection):
    """Adds the server's `--max-message-mb` flag to websockets' 1009 "message too big" close reason."""

    max_message_mb: float | None = None

    def __init__(self, protocol, *args, **kwargs):
        super().__init__(protocol, *args, **kwargs)
        fail = protocol.fail

        def fail_with_hint(code: int, reason: str = "") -> None:
            if code == CloseCode.MESSAGE_TOO_BIG and self.max_message_mb is not None:
                hint = f" (server --max-message-mb {self.max_message_mb:g})"
                if len((reason + hint).encode()) <= 123:  # a close reason holds at most 123 bytes
                    reason += hint
                log.warning("refused %s", _kv(peer=_peer(self), code=int(code), reason=repr(reason)))
            fail(code, reason)

        protocol.fail = fail_with_hint


def _peer(conn) -> str:
    addr = conn.remote_address
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


class PolicyServer:
    """Serves a `BasePolicy` over OpenPI's websocket protocol; inference on one worker thread.

    `port=0` picks a free port (read it from `.port` once `ready` fired). `metadata` defaults to
    `policy.metadata` when the policy has one. `client_errors` are the exception types answered with a
    one-line error frame on a still-open connection (default: the policy layer's ObservationError).
    `worker` is the single-thread executor that runs inference (default: `inference_worker()`); the server
    shuts it down when it stops.
    """

    def __init__(
        self,
        policy: _base_policy.BasePolicy,
        host: str = "0.0.0.0",
        port: int = 8000,
        metadata: dict | None = None,
        *,
        max_message_mb: float | None = DEFAULT_MAX_MESSAGE_MB,
        api_key: str | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        client_errors: tuple[type[BaseException], ...] | None = None,
        worker: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self._policy = policy
        self._host = host
        self._requested_port = port
        self._metadata = metadata if metadata is not None else (getattr(policy, "metadata", None) or {})
        self._max_size = None if max_message_mb is None else int(max_message_mb * 2**20)
        self._max_message_mb = max_message_mb
        self._api_key = api_key or None
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._client_errors = _default_client_errors() if client_errors is None else tuple(client_errors)
        self._conn_ids = itertools.count(1)
        if worker is not None and getattr(worker, "_max_workers", 1) != 1:
            raise ValueError("the inference worker must have exactly one thread: inference is serialized per GPU")
        self._executor = worker or inference_worker()
        self.port: int | None = None
        # Counters, for logs and tests.
        self.stats = {"connections": 0, "requests": 0, "answered": 0, "client_errors": 0, "internal_errors": 0, "skipped": 0}

    # -- HTTP, before the upgrade ------------------------------------------------------------------

    def _process_request(self, connection: ws_server.ServerConnection, request: ws_server.Request):
        path = urllib.parse.urlsplit(request.path).path
        if path == HEALTH_PATH:
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self._api_key is not None:
            got = request.headers.get("Authorization")
            want = f"Api-Key {self._api_key}"
            if got is None or not hmac.compare_digest(got.encode(), want.encode()):
                log.warning("refused %s", _kv(peer=_peer(connection), status=401, why="missing" if got is None else "wrong"))
                response = connection.respond(
                    http.HTTPStatus.UNAUTHORIZED,
                    "401 Unauthorized: missing or wrong API key. Send the header 'Authorization: Api-Key <key>' "
                    "(openpi_client.websocket_client_policy.WebsocketClientPolicy(..., api_key=KEY) does).\n",
                )
                response.headers["WWW-Authenticate"] = "Api-Key"
                return response
        return None

    # -- one connection ----------------------------------------------------------------------------

    def _infer_job(self, obs: dict, conn: ws_server.ServerConnection, queued_at: float):
        """Runs on the worker thread. Skips the request if its client has gone while it queued."""
        started = time.monotonic()
        if conn.state is not State.OPEN:
            return None, started - queued_at, 0.0
        out = self._policy.infer(obs)
        return out, started - queued_at, time.monotonic() - started

    async def _handler(self, conn: ws_server.ServerConnection) -> None:
        cid = next(self._conn_ids)
        peer = _peer(conn)
        self.stats["connections"] += 1
        log.info("connect %s", _kv(conn=cid, peer=peer))
        loop = asyncio.get_running_loop()
        packer = msgpack_numpy.Packer()
        n = 0
        prev_total: float | None = None
        try:
            await conn.send(packer.pack(self._metadata))
            while True:
                start = time.monotonic()  # as OpenPI: prev_total_ms spans recv + infer + send
                message = await conn.recv()
                received = time.monotonic()
                n += 1
                self.stats["requests"] += 1
                try:
                    obs = decode_observation(message)
                    out, queue_s, infer_s = await loop.run_in_executor(self._executor, self._infer_job, obs, conn, received)
                except (BadFrameError, *self._client_errors) as e:
                    self.stats["client_errors"] += 1
                    text = _one_line(f"{type(e).__name__}: {e}")
                    log.warning("bad-request %s", _kv(conn=cid, peer=peer, n=n, error=repr(text)))
                    await conn.send(text)
                    continue
                if out is None:  # the client left while the request was queued
                    self.stats["skipped"] += 1
                    log.info("skipped %s", _kv(conn=cid, peer=peer, n=n, queue_ms=queue_s * 1e3))
                    continue
                out["server_timing"] = {"infer_ms": infer_s * 1e3}
                if prev_total is not None:
                    out["server_timing"]["prev_total_ms"] = prev_total * 1e3
                reply = packer.pack(out)
                await conn.send(reply)
                self.stats["answered"] += 1
                prev_total = time.monotonic() - start
                log.info(
                    "request %s",
                    _kv(
                        conn=cid, peer=peer, n=n, in_bytes=len(message), out_bytes=len(reply),
                        queue_ms=queue_s * 1e3, infer_ms=infer_s * 1e3, total_ms=(time.monotonic() - received) * 1e3,
                    ),
                )
        except websockets.ConnectionClosed as e:
            close = e.rcvd or e.sent  # the client's close frame, else ours (e.g. 1009), else none (dropped)
            log.info(
                "disconnect %s",
                _kv(conn=cid, peer=peer, requests=n, code=int(close.code) if close else "none", reason=repr(close.reason if close else "")),
            )
        except Exception:
            self.stats["internal_errors"] += 1
            tb = traceback.format_exc()
            log.error("internal-error %s\n%s", _kv(conn=cid, peer=peer, n=n), tb)
            try:
                await conn.send(tb)
                await conn.close(code=CloseCode.INTERNAL_ERROR, reason=INTERNAL_ERROR_REASON)
            except websockets.ConnectionClosed:
                pass

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None, ready: Callable[[int], None] | None = None) -> None:
        """Serve until `stop` is set (forever if None); then close connections (1001) and finish in-flight work."""
        stop = stop or asyncio.Event()
        connection_cls = type("Connection", (_Connection,), {"max_message_mb": self._max_message_mb})
        try:
            async with ws_server.serve(
                self._handler,
                self._host,
                self._requested_port,
                compression=None,
                max_size=self._max_size,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                process_request=self._process_request,
                create_connection=connection_cls,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                log.info(
                    "listening %s",
                    _kv(
                        host=self._host, port=self.port, max_message_mb=self._max_message_mb,
                        api_key="required" if self._api_key else "off", health=HEALTH_PATH,
                    ),
                )
                if ready is not None:
                    ready(self.port)
                await stop.wait()
                log.info("shutting down %s", _kv(open_connections=len(server.connections)))
                server.close(code=CloseCode.GOING_AWAY, reason="server shutting down")
        finally:
            self._executor.shutdown(wait=True)
            log.info("stopped %s", _kv(**self.stats))

    def serve_forever(self) -> None:
        """Blocks; SIGINT/SIGTERM shut down cleanly (a second signal exits at once)."""
        asyncio.run(self._run_until_signal())

    async def _run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: exiting without waiting for in-flight inference", signal.Signals(signum).name)
                os._exit(1)
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        await self.run(stop=stop)


class ServerThread:
    """A PolicyServer on a background thread with its own event loop (tests, notebooks).

        with ServerThread(PolicyServer(policy, host="127.0.0.1", port=0)) as st:
            client = WebsocketClientPolicy("127.0.0.1", st.port)
    """

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="pi0-server", daemon=True)

    @property
    def port(self) -> int:
        assert self.server.port is not None, "server not started"
        return self.server.port

    def _main(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.server.run(stop=self._stop, ready=lambda port: self._ready.set())

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"policy server did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError("policy server failed to start") from self._error
        return self

    def stop(self, timeout: float = 120.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"policy server did not stop within {timeout} s")

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
