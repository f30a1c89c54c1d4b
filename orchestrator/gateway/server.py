"""``multilora gateway``: the HTTP server around :class:`~orchestrator.gateway.routes.Gateway`,
and the process (config, Redis, signals, the session sweeper).

The server is the standard library's ``ThreadingHTTPServer`` (one thread per connection, HTTP/1.1
keep-alive, like :mod:`rollout.server`). :meth:`GatewayServer.stop` also closes the open
keep-alive connections, so a stopped gateway really stops answering and clients reconnect to
whichever replica (or restarted process) serves the port next — nothing is lost, since every
record lives in Redis.

The process follows the bus conventions of :mod:`events.bootstrap`: one ``ready`` line, SIGTERM /
SIGINT stop it (warm: in-flight requests finish), exit code 0 after a stop, 2 when the
configuration or the Redis server is refused at boot, 1 when Redis stays unreachable at run time
for ``2 × session_lease_s`` (the sweeper cannot do its job). The sweeper releases expired
sessions every ``sweep_interval_s``; every replica runs one (their transactions never release a
session twice).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis

from events.bootstrap import EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME, configure_logging, open_bus, redact
from events.errors import ConfigError, UnsafeRedisError
from events.heartbeat import Heartbeat
from events.metrics import start_metrics_server
from events.streams import Streams
from orchestrator.gateway.config import GatewayConfig, load_config
from orchestrator.gateway.futures_api import Futures
from orchestrator.gateway.render import error_reply
from orchestrator.gateway.routes import Gateway, Limits
from orchestrator.gateway.sessions import Sessions
from orchestrator.gateway.tenants import Tenants

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    """Tracks its open connections so :meth:`GatewayServer.stop` can close them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.stopping = False
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self) -> None:
        with self.lock:
            self.stopping = True
            for conn in list(self.connections):
                with contextlib.suppress(OSError):  # already closed by the client
                    conn.shutdown(socket.SHUT_RDWR)


def _handler_class(app: Gateway, server: list[_Server]) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to ``app`` (http.server instantiates one per connection)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out as two writes on a kept-alive connection: with Nagle's
        # algorithm the body waits for the client's delayed ACK (~40 ms on Linux) every answer
        disable_nagle_algorithm = True

        def _serve(self, method: str) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            if "chunked" in headers.get("transfer-encoding", ""):
                status, ctype, data = error_reply(411, "send a Content-Length (not chunked)")
                self.close_connection = True
            else:
                try:
                    length = int(headers.get("content-length") or 0)
                except ValueError:
                    length = -1
                if length < 0:
                    status, ctype, data = error_reply(400, "Content-Length is not a number")
                else:
                    status, ctype, data = app.handle(
                        method, self.path, headers, length, self.rfile.read
                    )
                if status == 413:  # the body was not read: the connection cannot be reused
                    self.close_connection = True
            if server[0].stopping:
                self.close_connection = True
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "1")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client went away
                self.close_connection = True

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


class GatewayServer:
    """Serves a :class:`Gateway` in background threads."""

    def __init__(self, app: Gateway) -> None:
        self.app = app
        self._http: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve; return the base URL (``port=0``: an ephemeral port)."""
        holder: list[_Server] = []
        self._http = _Server((host, port), _handler_class(self.app, holder))
        holder.append(self._http)
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.05,), name="gateway-http", daemon=True
        )
        self._thread.start()
        bound_host, bound_port = self._http.server_address[:2]
        return f"http://{bound_host!s}:{bound_port}"

    def stop(self) -> None:
        """Stop accepting, close the listening socket and every open connection."""
        if self._http is None:
            return
        self._http.shutdown()
        self._http.server_close()
        self._http.close_connections()
        self._http = None


def build(config: GatewayConfig, client: redis.Redis, streams: Streams, *, source: str) -> Gateway:
    """The app of ``config`` over ``client`` (flat parameters from here on)."""
    tenants = Tenants.from_config(config.api_keys, config.api_keys_file)
    limits = Limits(
        base_model=config.base_model,
        tokenizer_id=config.tokenizer_id or config.base_model,
        max_context_length=config.max_context_length,
        max_rank=config.max_rank,
        lora_alpha=config.lora_alpha,
        max_steps=config.max_steps,
        max_request_bytes=config.max_request_bytes,
        default_max_tokens=config.default_max_tokens,
        fwdbwd_chunk_bytes=config.fwdbwd_chunk_bytes,
        max_inflight=config.max_inflight,
    )
    sessions = Sessions(client, streams, lease_s=config.session_lease_s, source=source)
    futures = Futures(
        client,
        streams,
        max_inflight=config.max_inflight,
        long_poll_s=config.long_poll_s,
        source=source,
    )
    return Gateway(
        client, streams, tenants, limits, sessions=sessions, futures=futures, source=source
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (see the module doc)."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"multilora gateway: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.bus.log_level)
    name = config.bus.name or "gateway"
    try:
        bus = open_bus(config.bus, name)
        app = build(config, bus.client, bus.streams, source=name)
        server = GatewayServer(app)
        url = server.start(config.host, config.port)
    except (ConfigError, UnsafeRedisError, OSError, redis.RedisError) as exc:
        print(f"multilora gateway: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    port = config.bus.metrics_port
    metrics = start_metrics_server(port, bus.registry) if port else None
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    if not len(app.tenants):
        log.warning("no API keys: every request is refused (401); pass --api-key KEY=TENANT")
    log.info(
        "gateway %s ready: %s, serving %s for %s (%d tenant keys)",
        name,
        redact(config.bus.redis_url),
        url,
        config.base_model,
        len(app.tenants),
    )
    code, down_since = EXIT_OK, None
    # the gateway's liveness for `multilora status`, beaten from the sweeper's loop
    ttl_ms = int(max(15.0, 3 * config.sweep_interval_s) * 1000)
    heartbeat = Heartbeat(bus.streams, "gateway", name, ttl_ms=ttl_ms)
    try:
        heartbeat.beat(bus.client)
        while not stop.wait(config.sweep_interval_s):
            try:
                app.sessions.sweep()
                heartbeat.progress()
                heartbeat.beat(bus.client)
                down_since = None
            except redis.RedisError as exc:
                down_since = down_since or time.monotonic()
                log.warning("session sweep failed: %s", exc)
                if time.monotonic() - down_since > 2 * config.session_lease_s:
                    print(f"multilora gateway: error: Redis unreachable: {exc}", file=sys.stderr)
                    code = EXIT_RUNTIME
                    break
    finally:
        server.stop()
        with contextlib.suppress(redis.RedisError):  # Redis gone: the beat key expires anyway
            heartbeat.stopped(bus.client)
        if metrics is not None:
            metrics.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("gateway %s stopped", name)
    return code
